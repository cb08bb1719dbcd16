{{/* The chart's name, or nameOverride. */}}
{{- define "unsafechain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's base name: <release>-<chart>, or fullnameOverride. */}}
{{- define "unsafechain.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's objects: <fullname>-<component>. Call with (list $ "judge"). */}}
{{- define "unsafechain.componentName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "unsafechain.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries. Call with (list $ "judge"). */}}
{{- define "unsafechain.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
{{ include "unsafechain.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: unsafechain
{{- end -}}

{{/* Labels that select one component's pods. Call with (list $ "judge"). */}}
{{- define "unsafechain.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "unsafechain.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* The platform image, pinned: registry/repository:tag. Call with (list $ "repository-key"). */}}
{{- define "unsafechain.image" -}}
{{- $root := index . 0 -}}
{{- $image := $root.Values.image -}}
{{- $repository := index $image (index . 1) -}}
{{- if $image.registry -}}
{{- printf "%s/%s:%s" $image.registry $repository $image.tag -}}
{{- else -}}
{{- printf "%s:%s" $repository $image.tag -}}
{{- end -}}
{{- end -}}

{{/* The pod-level security context of every pod: non-root, default seccomp profile. */}}
{{- define "unsafechain.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.security.runAsUser }}
runAsGroup: {{ .Values.security.runAsUser }}
fsGroup: {{ .Values.security.runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The container-level security context of every container. */}}
{{- define "unsafechain.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The gRPC address of a service inside the cluster. Call with (list $ "judge"). */}}
{{- define "unsafechain.serviceAddress" -}}
{{- $root := index . 0 -}}
{{- $service := index $root.Values.services (index . 1) -}}
{{- printf "%s:%d" (include "unsafechain.componentName" .) (int $service.port) -}}
{{- end -}}

{{/* The stage each service serves and the worker that calls it. */}}
{{- define "unsafechain.stageService" -}}
{{- $map := dict "generate" "generation" "judge" "judge" "correct" "correction" -}}
{{- index $map . | default "" -}}
{{- end -}}

{{/* Environment variables from existing Secrets (secretEnv): API keys of the model backends. */}}
{{- define "unsafechain.secretEnv" -}}
{{- range .Values.secretEnv }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
{{- end }}
{{- end -}}

{{/* The build configuration every service and worker reads (--config): the values'
config, with the kafka section from kafka:, the remote section from the enabled services,
and the base_url of the models the bundled inference servers serve. */}}
{{- define "unsafechain.buildConfig" -}}
{{- $config := deepCopy .Values.config -}}
{{- $kafka := merge (dict "bootstrap_servers" .Values.kafka.bootstrapServers "topic_prefix" .Values.kafka.topicPrefix "version" .Values.kafka.version "partitions" (int .Values.kafka.partitions) "replication_factor" (int .Values.kafka.replicationFactor)) (deepCopy .Values.kafka.settings) -}}
{{- $security := include "unsafechain.kafkaSecurity" . | fromYaml -}}
{{- if $security -}}{{- $_ := set $kafka "security" $security -}}{{- end -}}
{{- $_ := set $config "kafka" $kafka -}}
{{- $remote := dict -}}
{{- range $name := list "generation" "judge" "correction" -}}
{{- $service := index $.Values.services $name -}}
{{- if $service.enabled -}}
{{- $client := dict "address" (include "unsafechain.serviceAddress" (list $ $name)) -}}
{{- if $.Values.tls.enabled -}}
{{- $_ := set $client "ca_file" "/etc/unsafechain/tls/ca.crt" -}}
{{- if $.Values.tls.serverName -}}{{- $_ := set $client "server_name" $.Values.tls.serverName -}}{{- end -}}
{{- if $.Values.tls.clientCertificateSecret -}}
{{- $_ := set $client "cert_file" "/etc/unsafechain/client-tls/tls.crt" -}}
{{- $_ := set $client "key_file" "/etc/unsafechain/client-tls/tls.key" -}}
{{- end -}}
{{- end -}}
{{- if $.Values.auth.clientTokenSecret.name -}}
{{- $_ := set $client "token_file" "/etc/unsafechain/client-token/token" -}}
{{- end -}}
{{- $_ := set $remote $name $client -}}
{{- end -}}
{{- end -}}
{{- if $remote -}}{{- $_ := set $config "remote" $remote -}}{{- end -}}
{{- $models := deepCopy (default dict $config.models) -}}
{{- range $server, $path := dict "tgi" "" "vllm" "/v1" -}}
{{- $inference := index $.Values.inference $server -}}
{{- if $inference.enabled -}}
{{- range $key := $inference.serves -}}
{{- if not (hasKey $models $key) -}}
{{- fail (printf "inference.%s.serves: %q is not a key of config.models" $server $key) -}}
{{- end -}}
{{- $model := index $models $key -}}
{{- $_ := set $model "base_url" (printf "http://%s:%d%s" (include "unsafechain.componentName" (list $ $server)) (int $inference.port) $path) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $_ := set $config "models" $models -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The training service's configuration (--config): its sections as the values give
them; the kubernetes executor's namespace, instance and image default to the release's. */}}
{{- define "unsafechain.trainingConfig" -}}
{{- $settings := deepCopy .Values.services.training.settings -}}
{{- if $settings.kubernetes -}}
{{- $defaults := dict "namespace" .Release.Namespace "instance" (.Release.Name | trunc 63 | trimSuffix "-") "image" (include "unsafechain.image" (list $ "trainingRepository")) -}}
{{- $_ := set $settings "kubernetes" (merge (deepCopy $settings.kubernetes) $defaults) -}}
{{- end -}}
{{- toYaml $settings -}}
{{- end -}}

{{/* The kafka.security section from kafka.tls and kafka.sasl: files where the pods mount
the Secrets, the password by the name of the variable that holds it. Empty: plaintext. */}}
{{- define "unsafechain.kafkaSecurity" -}}
{{- $tls := .Values.kafka.tls -}}
{{- $sasl := .Values.kafka.sasl -}}
{{- if or $tls.enabled $sasl.mechanism -}}
protocol: {{ ternary (ternary "SASL_SSL" "SSL" (not (empty $sasl.mechanism))) "SASL_PLAINTEXT" $tls.enabled }}
{{- if $tls.caSecret.name }}
ca_file: /etc/unsafechain/kafka-tls/ca.crt
{{- end }}
{{- if $tls.clientCertificateSecret }}
cert_file: /etc/unsafechain/kafka-client-tls/tls.crt
key_file: /etc/unsafechain/kafka-client-tls/tls.key
{{- end }}
{{- if $sasl.mechanism }}
sasl_mechanism: {{ $sasl.mechanism }}
sasl_username: {{ $sasl.username | quote }}
sasl_password_env: KAFKA_SASL_PASSWORD
{{- end }}
{{- end -}}
{{- end -}}

{{/* What a pod that talks to Kafka adds to its container: the SASL credentials'
variables. */}}
{{- define "unsafechain.kafkaEnv" -}}
{{- if .Values.kafka.sasl.mechanism }}
- name: KAFKA_SASL_USERNAME
  value: {{ .Values.kafka.sasl.username | quote }}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.passwordSecret.name }}
      key: {{ .Values.kafka.sasl.passwordSecret.key }}
{{- end }}
{{- end -}}

{{/* The Kafka TLS mounts of a pod that talks to Kafka. */}}
{{- define "unsafechain.kafkaMounts" -}}
{{- if .Values.kafka.tls.caSecret.name }}
- name: kafka-tls
  mountPath: /etc/unsafechain/kafka-tls
  readOnly: true
{{- end }}
{{- if .Values.kafka.tls.clientCertificateSecret }}
- name: kafka-client-tls
  mountPath: /etc/unsafechain/kafka-client-tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* The Kafka TLS volumes of a pod that talks to Kafka. */}}
{{- define "unsafechain.kafkaVolumes" -}}
{{- if .Values.kafka.tls.caSecret.name }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.tls.caSecret.name }}
    items:
      - key: {{ .Values.kafka.tls.caSecret.key }}
        path: ca.crt
{{- end }}
{{- if .Values.kafka.tls.clientCertificateSecret }}
- name: kafka-client-tls
  secret:
    secretName: {{ .Values.kafka.tls.clientCertificateSecret }}
{{- end }}
{{- end -}}
