{{/* Chart name. */}}
{{- define "rtgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "rtgate.fullname" -}}
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

{{- define "rtgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rtgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rtgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rtgate.labels" -}}
helm.sh/chart: {{ include "rtgate.chart" . }}
{{ include "rtgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "rtgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rtgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding jwt-secret / api-keys / redis passwords. */}}
{{- define "rtgate.secretName" -}}
{{- default (include "rtgate.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{/* Name of the bundled Bitnami redis release objects. */}}
{{- define "rtgate.bundledRedisName" -}}
{{- printf "%s-redis" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of the metrics Service (admin port only; never behind the Ingress). */}}
{{- define "rtgate.metricsServiceName" -}}
{{- printf "%s-metrics" (include "rtgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Whether the metrics Service is rendered. */}}
{{- define "rtgate.metricsServiceEnabled" -}}
{{- if or .Values.metrics.service.enabled .Values.metrics.serviceMonitor.enabled }}true{{ end }}
{{- end }}

{{/* Where the PEM public key is mounted (auth.public_key_file); empty without one. */}}
{{- define "rtgate.publicKeyFile" -}}
{{- if .Values.auth.existingPublicKeySecret -}}
/etc/rtgate-keys/{{ .Values.auth.existingPublicKeySecretKey }}
{{- else if .Values.auth.publicKey -}}
/etc/rtgate/jwt-public-key.pem
{{- end -}}
{{- end }}

{{/* auth.audience as a TOML list (the value may be a string or a list). */}}
{{- define "rtgate.audience" -}}
{{- $a := .Values.auth.audience -}}
{{- if kindIs "string" $a -}}
{{- if $a }}{{ list $a | toJson }}{{ else }}[]{{ end -}}
{{- else -}}
{{- $a | default list | toJson -}}
{{- end -}}
{{- end }}

{{/* Sentinel list in effect (bundled Redis overrides an empty list). */}}
{{- define "rtgate.redisSentinels" -}}
{{- if .Values.redis.sentinels }}
{{- toJson .Values.redis.sentinels }}
{{- else if .Values.redis.bundled.enabled }}
{{- toJson (list (printf "%s:26379" (include "rtgate.bundledRedisName" .))) }}
{{- else }}[]{{- end }}
{{- end }}

{{/* "true" when a Redis address (sentinels, url or bundled) is configured. */}}
{{- define "rtgate.redisConfigured" -}}
{{- if or .Values.redis.sentinels .Values.redis.url .Values.redis.bundled.enabled .Values.redis.cluster.nodes }}true{{ end }}
{{- end }}

{{/* Duration string ("500ms", "20s", "5m", "1h") -> whole seconds, rounded up. */}}
{{- define "rtgate.durationSeconds" -}}
{{- $d := toString . -}}
{{- if not (regexMatch "^[0-9]+(ms|s|m|h)$" $d) -}}
{{- fail (printf "duration %q: write an integer followed by ms, s, m or h (e.g. \"20s\")" $d) -}}
{{- end -}}
{{- if hasSuffix "ms" $d -}}{{ div (add (trimSuffix "ms" $d | atoi) 999) 1000 }}
{{- else if hasSuffix "s" $d -}}{{ trimSuffix "s" $d | atoi }}
{{- else if hasSuffix "m" $d -}}{{ mul (trimSuffix "m" $d | atoi) 60 }}
{{- else -}}{{ mul (trimSuffix "h" $d | atoi) 3600 }}
{{- end -}}
{{- end }}

{{/* terminationGracePeriodSeconds = preStop sleep + shutdown.grace + margin. */}}
{{- define "rtgate.terminationGracePeriodSeconds" -}}
{{- add (int .Values.lifecycle.preStopSleepSeconds) (include "rtgate.durationSeconds" .Values.shutdown.grace | int) (int .Values.terminationMarginSeconds) }}
{{- end }}

{{/* Refuse configurations that render but cannot work. */}}
{{- define "rtgate.validate" -}}
{{- $kind := .Values.broker.kind }}
{{- if and (eq $kind "redis") (not (include "rtgate.redisConfigured" .)) }}
{{- fail "broker.kind=redis needs a Redis: set redis.sentinels (and redis.masterName), or redis.url, or redis.cluster.nodes, or redis.bundled.enabled=true. For a single-instance trial without Redis: --set broker.kind=memory --set replicaCount=1" }}
{{- end }}
{{- if and (eq $kind "kafka") (not .Values.kafka.brokers) }}
{{- fail "broker.kind=kafka needs kafka.brokers (bootstrap servers \"host:port\")" }}
{{- end }}
{{- if and (eq $kind "memory") (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled) }}
{{- fail "broker.kind=memory does not share rooms between instances: use replicaCount=1 without autoscaling, or broker.kind=redis/kafka" }}
{{- end }}
{{- if and .Values.auth.publicKey .Values.auth.existingPublicKeySecret }}
{{- fail "auth: set only one of publicKey and existingPublicKeySecret" }}
{{- end }}
{{- if eq (int .Values.admin.port) 8080 }}
{{- fail "admin.port must differ from 8080 (the public port)" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set only one of maxUnavailable and minAvailable (null the other)" }}
{{- end }}
{{- end }}
