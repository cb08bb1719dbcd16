{{/* One gRPC service: its Deployment, Service, PodDisruptionBudget and ServiceMonitor.
Call with (list $ "judge"). The training service reads its own configuration. */}}
{{- define "unsafechain.grpcService" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $service := index $root.Values.services $name -}}
{{- $fullname := include "unsafechain.componentName" (list $root $name) -}}
{{- $configMap := ternary $fullname (include "unsafechain.componentName" (list $root "config")) (eq $name "training") -}}
{{- if $service.enabled }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "unsafechain.labels" (list $root $name) | nindent 4 }}
spec:
  replicas: {{ $service.replicas }}
  {{- if eq $name "training" }}
  # One replica owns the run records on its state volume.
  strategy:
    type: Recreate
  {{- end }}
  selector:
    matchLabels:
      {{- include "unsafechain.selectorLabels" (list $root $name) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "unsafechain.labels" (list $root $name) | nindent 8 }}
      annotations:
        checksum/config: {{ include "unsafechain.configText" (list $root $name) | sha256sum }}
    spec:
      enableServiceLinks: false
      automountServiceAccountToken: {{ eq $name "training" }}
      {{- if eq $name "training" }}
      serviceAccountName: {{ $fullname }}
      {{- end }}
      {{- with $root.Values.image.pullSecrets }}
      imagePullSecrets:
        {{- range . }}
        - name: {{ . }}
        {{- end }}
      {{- end }}
      terminationGracePeriodSeconds: {{ add (int $service.gracePeriodSeconds) 5 }}
      securityContext:
        {{- include "unsafechain.podSecurityContext" $root | nindent 8 }}
      {{- with $service.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $service.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $name }}
          image: {{ include "unsafechain.image" (list $root "repository") }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: ["serve", {{ $name | quote }}, "--config", "/etc/unsafechain/config.yaml"]
          env:
            - name: UNSAFECHAIN_PORT
              value: {{ $service.port | quote }}
            - name: UNSAFECHAIN_METRICS_PORT
              value: {{ $root.Values.metrics.port | quote }}
            - name: UNSAFECHAIN_GRACE_PERIOD
              value: {{ $service.gracePeriodSeconds | quote }}
            {{- if $root.Values.tls.enabled }}
            - name: UNSAFECHAIN_TLS_CERT_FILE
              value: /etc/unsafechain/tls/tls.crt
            - name: UNSAFECHAIN_TLS_KEY_FILE
              value: /etc/unsafechain/tls/tls.key
            {{- if $root.Values.tls.requireClientCertificates }}
            - name: UNSAFECHAIN_TLS_CLIENT_CA_FILE
              value: /etc/unsafechain/tls/ca.crt
            {{- end }}
            {{- end }}
            {{- if $root.Values.auth.tokensSecret.name }}
            - name: UNSAFECHAIN_AUTH_TOKENS_FILE
              value: /etc/unsafechain/tokens/tokens
            {{- end }}
            # Caches of tokenizers and templates go to the writable /tmp.
            - name: HOME
              value: /tmp
            - name: HF_HOME
              value: /tmp/huggingface
            {{- include "unsafechain.secretEnv" $root | nindent 12 }}
            {{- range $key, $value := $service.env }}
            - name: {{ $key }}
              value: {{ $value | quote }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $service.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $root.Values.metrics.port }}
              protocol: TCP
          {{- $probe := include "unsafechain.grpcProbe" (list $root $service) }}
          startupProbe:
            {{- $probe | nindent 12 }}
            periodSeconds: 10
            failureThreshold: {{ $service.startupFailureThreshold }}
          readinessProbe:
            {{- $probe | nindent 12 }}
            periodSeconds: 10
            failureThreshold: 3
          livenessProbe:
            {{- $probe | nindent 12 }}
            periodSeconds: 20
            failureThreshold: 6
          resources:
            {{- toYaml $service.resources | nindent 12 }}
          securityContext:
            {{- include "unsafechain.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            - name: config
              mountPath: /etc/unsafechain/config.yaml
              subPath: config.yaml
              readOnly: true
            - name: tmp
              mountPath: /tmp
            {{- if $root.Values.tls.enabled }}
            - name: tls
              mountPath: /etc/unsafechain/tls
              readOnly: true
            {{- end }}
            {{- if $root.Values.auth.tokensSecret.name }}
            - name: tokens
              mountPath: /etc/unsafechain/tokens
              readOnly: true
            {{- end }}
            {{- if eq $name "training" }}
            - name: state
              mountPath: {{ $service.stateMountPath }}
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ $configMap }}
        - name: tmp
          emptyDir:
            sizeLimit: {{ $root.Values.security.tmpSizeLimit }}
        {{- if $root.Values.tls.enabled }}
        - name: tls
          secret:
            secretName: {{ $root.Values.tls.secretName }}
        {{- end }}
        {{- if $root.Values.auth.tokensSecret.name }}
        - name: tokens
          secret:
            secretName: {{ $root.Values.auth.tokensSecret.name }}
            items:
              - key: {{ $root.Values.auth.tokensSecret.key }}
                path: tokens
        {{- end }}
        {{- if eq $name "training" }}
        - name: state
          {{- if $service.stateClaim }}
          persistentVolumeClaim:
            claimName: {{ $service.stateClaim }}
          {{- else }}
          emptyDir: {}
          {{- end }}
        {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "unsafechain.labels" (list $root $name) | nindent 4 }}
spec:
  type: {{ $service.serviceType }}
  selector:
    {{- include "unsafechain.selectorLabels" (list $root $name) | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $service.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ $root.Values.metrics.port }}
      targetPort: metrics
      protocol: TCP
{{- if and $service.podDisruptionBudget.enabled (gt (int $service.replicas) 1) }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "unsafechain.labels" (list $root $name) | nindent 4 }}
spec:
  maxUnavailable: {{ $service.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "unsafechain.selectorLabels" (list $root $name) | nindent 6 }}
{{- end }}
{{- if $root.Values.metrics.serviceMonitor.enabled }}
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "unsafechain.labels" (list $root $name) | nindent 4 }}
    {{- with $root.Values.metrics.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "unsafechain.selectorLabels" (list $root $name) | nindent 6 }}
  endpoints:
    - port: metrics
      path: /metrics
      interval: {{ $root.Values.metrics.serviceMonitor.interval }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The probe of a gRPC service: kubelet's native gRPC probe on grpc.health.v1 with
service "" (the overall status); kubelet's gRPC probe speaks plaintext only, so with TLS
on it is a TCP probe of the gRPC port. Call with (list $ service-values). */}}
{{- define "unsafechain.grpcProbe" -}}
{{- $root := index . 0 -}}
{{- $service := index . 1 -}}
{{- if $root.Values.tls.enabled -}}
tcpSocket:
  port: {{ $service.port }}
{{- else -}}
grpc:
  port: {{ $service.port }}
  service: ""
{{- end -}}
{{- end -}}

{{/* The configuration text a component reads, for the checksum that restarts its pods
when it changes. Call with (list $ "judge"). */}}
{{- define "unsafechain.configText" -}}
{{- $root := index . 0 -}}
{{- if eq (index . 1) "training" -}}
{{- include "unsafechain.trainingConfig" $root -}}
{{- else -}}
{{- include "unsafechain.buildConfig" $root -}}
{{- end -}}
{{- end -}}
