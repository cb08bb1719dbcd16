{{/* One inference server on GPU nodes: Deployment, Service and PodDisruptionBudget.
Call with (list $ "tgi" model-flag). TGI serves /generate and the Messages API, vLLM the
OpenAI API under /v1; both answer /health once the model is loaded. */}}
{{- define "unsafechain.inferenceServer" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $modelFlag := index . 2 -}}
{{- $server := index $root.Values.inference $name -}}
{{- $fullname := include "unsafechain.componentName" (list $root $name) -}}
{{- if $server.enabled }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "unsafechain.labels" (list $root $name) | nindent 4 }}
spec:
  replicas: {{ $server.replicas }}
  selector:
    matchLabels:
      {{- include "unsafechain.selectorLabels" (list $root $name) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "unsafechain.labels" (list $root $name) | nindent 8 }}
    spec:
      enableServiceLinks: false
      automountServiceAccountToken: false
      securityContext:
        {{- include "unsafechain.podSecurityContext" $root | nindent 8 }}
      {{- with $server.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $server.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $name }}
          image: {{ printf "%s:%s" $server.image.repository $server.image.tag }}
          imagePullPolicy: {{ $server.image.pullPolicy }}
          args:
            - {{ $modelFlag }}
            - {{ $server.model | quote }}
            - --port
            - {{ $server.port | quote }}
            {{- range $server.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          env:
            - name: HOME
              value: /tmp
            - name: HF_HOME
              value: /models
            - name: HUGGINGFACE_HUB_CACHE
              value: /models/hub
            {{- if $server.hubTokenSecret.name }}
            - name: HF_TOKEN
              valueFrom:
                secretKeyRef:
                  name: {{ $server.hubTokenSecret.name }}
                  key: {{ $server.hubTokenSecret.key }}
            {{- end }}
          ports:
            - name: http
              containerPort: {{ $server.port }}
              protocol: TCP
          # Downloading and loading the weights can take many minutes.
          startupProbe:
            httpGet:
              path: /health
              port: http
            periodSeconds: 10
            failureThreshold: {{ $server.startupFailureThreshold }}
          readinessProbe:
            httpGet:
              path: /health
              port: http
            periodSeconds: 10
          livenessProbe:
            httpGet:
              path: /health
              port: http
            periodSeconds: 30
            failureThreshold: 6
          resources:
            requests:
              {{- toYaml $server.resources.requests | nindent 14 }}
              nvidia.com/gpu: {{ $server.gpus }}
            limits:
              {{- with $server.resources.limits }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
              nvidia.com/gpu: {{ $server.gpus }}
          securityContext:
            {{- include "unsafechain.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            - name: models
              mountPath: /models
            - name: tmp
              mountPath: /tmp
            - name: shm
              mountPath: /dev/shm
      volumes:
        - name: models
          {{- if $server.modelCacheClaim }}
          persistentVolumeClaim:
            claimName: {{ $server.modelCacheClaim }}
          {{- else }}
          emptyDir: {}
          {{- end }}
        - name: tmp
          emptyDir:
            sizeLimit: {{ $root.Values.security.tmpSizeLimit }}
        - name: shm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $server.shmSize }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "unsafechain.labels" (list $root $name) | nindent 4 }}
spec:
  selector:
    {{- include "unsafechain.selectorLabels" (list $root $name) | nindent 4 }}
  ports:
    - name: http
      port: {{ $server.port }}
      targetPort: http
      protocol: TCP
{{- if gt (int $server.replicas) 1 }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "unsafechain.labels" (list $root $name) | nindent 4 }}
spec:
  maxUnavailable: 1
  selector:
    matchLabels:
      {{- include "unsafechain.selectorLabels" (list $root $name) | nindent 6 }}
{{- end }}
{{- end }}
{{- end -}}
