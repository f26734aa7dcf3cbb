{{/* Chart name. */}}
{{- define "embedwatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart> unless the release name already contains the chart name. */}}
{{- define "embedwatch.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "embedwatch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades. */}}
{{- define "embedwatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embedwatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "embedwatch.labels" -}}
helm.sh/chart: {{ include "embedwatch.chart" . }}
{{ include "embedwatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: monitor
app.kubernetes.io/part-of: embedwatch
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "embedwatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "embedwatch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "embedwatch.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding credentials; empty when there is none. */}}
{{- define "embedwatch.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else if or .Values.secrets.kafkaSaslPassword .Values.secrets.adminToken }}
{{- include "embedwatch.fullname" . }}
{{- end }}
{{- end }}

{{/* The service's HTTP port (config.http.port, default 9108). */}}
{{- define "embedwatch.httpPort" -}}
{{- $http := (.Values.config | default dict).http | default dict }}
{{- $http.port | default 9108 | int }}
{{- end }}

{{/*
The service configuration (config.yaml): .Values.config, plus the paths of the mounted broker TLS
files when kafkaTls.enabled and the user did not set them. Never holds a secret.
*/}}
{{- define "embedwatch.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $kafka := dict }}
{{- if hasKey $cfg "kafka" }}{{ $kafka = get $cfg "kafka" }}{{ end }}
{{- if or (hasKey $kafka "sasl_password") (hasKey (get $cfg "http" | default dict) "admin_token") }}
{{- fail "config.kafka.sasl_password and config.http.admin_token are secrets: set secrets.kafkaSaslPassword / secrets.adminToken or secrets.existingSecret instead" }}
{{- end }}
{{- /* The clients read ssl_* only over SSL / SASL_SSL and sasl_* only over SASL_*: anything else
would be dropped without a word (a CA mounted for a connection that stays plaintext). */}}
{{- $protocol := $kafka.security_protocol | default "PLAINTEXT" }}
{{- if and .Values.kafkaTls.enabled (not (hasSuffix "SSL" $protocol)) }}
{{- fail (printf "kafkaTls.enabled needs config.kafka.security_protocol SSL or SASL_SSL (got %s): the mounted TLS files would be ignored" $protocol) }}
{{- end }}
{{- range $key := list "ssl_cafile" "ssl_certfile" "ssl_keyfile" "ssl_check_hostname" }}
{{- if and (hasKey $kafka $key) (not (hasSuffix "SSL" $protocol)) }}
{{- fail (printf "config.kafka.%s needs config.kafka.security_protocol SSL or SASL_SSL (got %s)" $key $protocol) }}
{{- end }}
{{- end }}
{{- range $key := list "sasl_mechanism" "sasl_username" }}
{{- if and (hasKey $kafka $key) (not (hasPrefix "SASL" $protocol)) }}
{{- fail (printf "config.kafka.%s needs config.kafka.security_protocol SASL_PLAINTEXT or SASL_SSL (got %s)" $key $protocol) }}
{{- end }}
{{- end }}
{{- if and .Values.secrets.kafkaSaslPassword (not (hasPrefix "SASL" $protocol)) }}
{{- fail (printf "secrets.kafkaSaslPassword needs config.kafka.security_protocol SASL_PLAINTEXT or SASL_SSL (got %s)" $protocol) }}
{{- end }}
{{- if .Values.kafkaTls.enabled }}
{{- $dir := .Values.kafkaTls.mountPath }}
{{- if and .Values.kafkaTls.caKey (not (hasKey $kafka "ssl_cafile")) }}
{{- $_ := set $kafka "ssl_cafile" (printf "%s/%s" $dir .Values.kafkaTls.caKey) }}
{{- end }}
{{- if and .Values.kafkaTls.certKey (not (hasKey $kafka "ssl_certfile")) }}
{{- $_ := set $kafka "ssl_certfile" (printf "%s/%s" $dir .Values.kafkaTls.certKey) }}
{{- end }}
{{- if and .Values.kafkaTls.keyKey (not (hasKey $kafka "ssl_keyfile")) }}
{{- $_ := set $kafka "ssl_keyfile" (printf "%s/%s" $dir .Values.kafkaTls.keyKey) }}
{{- end }}
{{- $_ := set $cfg "kafka" $kafka }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}
