{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "llm-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart unless the release name already holds it. */}}
{{- define "llm-worker.fullname" -}}
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

{{- define "llm-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "llm-worker.labels" -}}
helm.sh/chart: {{ include "llm-worker.chart" . }}
{{ include "llm-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llm-worker
{{- end }}

{{- define "llm-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Worker pods only (the embedded Redis shares name and instance). */}}
{{- define "llm-worker.workerSelectorLabels" -}}
{{ include "llm-worker.selectorLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "llm-worker.gatewaySelectorLabels" -}}
{{ include "llm-worker.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "llm-worker.redisSelectorLabels" -}}
{{ include "llm-worker.selectorLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "llm-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llm-worker.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Settings the chart reads from `config`, with the application's defaults. */}}
{{- define "llm-worker.jobDeadline" -}}
{{- index .Values.config "LLM_WORKER_JOB_DEADLINE_S" | default "900" }}
{{- end }}

{{- define "llm-worker.queue" -}}
{{- index .Values.config "LLM_WORKER_QUEUE" | default "llmw" }}
{{- end }}

{{- define "llm-worker.metricsPort" -}}
{{- index .Values.config "LLM_WORKER_METRICS_PORT" | default "9464" }}
{{- end }}

{{/* The Secret the chart creates for the API key and the Redis URL. */}}
{{- define "llm-worker.secretName" -}}
{{- include "llm-worker.fullname" . }}
{{- end }}

{{- define "llm-worker.apiKeySecretName" -}}
{{- default (include "llm-worker.secretName" .) .Values.apiKey.existingSecret }}
{{- end }}

{{- define "llm-worker.apiKeySecretKey" -}}
{{- if .Values.apiKey.existingSecret }}{{ .Values.apiKey.key }}{{ else }}api-key{{ end }}
{{- end }}

{{- define "llm-worker.redisSecretName" -}}
{{- default (include "llm-worker.secretName" .) .Values.redis.existingSecret }}
{{- end }}

{{- define "llm-worker.redisSecretKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.key }}{{ else }}redis-url{{ end }}
{{- end }}

{{/* The Redis env of every llm-worker container (workers and gateway): the URL from a Secret,
the Sentinel service name, and the passwords from the user's Secrets. */}}
{{- define "llm-worker.redisEnv" -}}
- name: LLM_WORKER_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "llm-worker.redisSecretName" . }}
      key: {{ include "llm-worker.redisSecretKey" . }}
{{- with .Values.redis.sentinel.master }}
- name: LLM_WORKER_REDIS_SENTINEL_MASTER
  value: {{ . | quote }}
{{- end }}
{{- with .Values.redis.sentinel.passwordSecret }}
{{- if .name }}
- name: LLM_WORKER_REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- with .Values.redis.passwordSecret }}
{{- if .name }}
- name: LLM_WORKER_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- end }}

{{/* The gateway: its object names and where its producer keys come from. */}}
{{- define "llm-worker.gatewayName" -}}
{{- printf "%s-gateway" (include "llm-worker.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The chart's Secret for the gateway's name:key pairs (apart from the workers' Secret, so
that changing producer keys restarts the gateway pods only). */}}
{{- define "llm-worker.gatewayApiKeysSecretName" -}}
{{- default (include "llm-worker.gatewayName" .) .Values.gateway.apiKeys.existingSecret }}
{{- end }}

{{- define "llm-worker.gatewayApiKeysSecretKey" -}}
{{- if .Values.gateway.apiKeys.existingSecret }}{{ .Values.gateway.apiKeys.key }}{{ else }}gateway-api-keys{{ end }}
{{- end }}

{{/* Whether the gateway gets LLM_WORKER_GATEWAY_API_KEYS at all. */}}
{{- define "llm-worker.gatewayHasApiKeys" -}}
{{- if or .Values.gateway.apiKeys.existingSecret .Values.gateway.apiKeys.value }}true{{ end }}
{{- end }}

{{/* The keys file's Secret: not part of the pod template's checksum, so a change reaches the
running pods through the kubelet's volume update, without a restart. */}}
{{- define "llm-worker.gatewayKeysFileSecretName" -}}
{{- default (printf "%s-keys-file" (include "llm-worker.gatewayName" .) | trunc 63 | trimSuffix "-") .Values.gateway.keysFile.existingSecret }}
{{- end }}

{{- define "llm-worker.gatewayKeysFileSecretKey" -}}
{{- if .Values.gateway.keysFile.existingSecret }}{{ .Values.gateway.keysFile.key }}{{ else }}keys.txt{{ end }}
{{- end }}

{{- define "llm-worker.gatewayHasKeysFile" -}}
{{- if or .Values.gateway.keysFile.existingSecret .Values.gateway.keysFile.entries }}true{{ end }}
{{- end }}

{{- define "llm-worker.gatewayKeysFilePath" -}}
{{- printf "%s/keys.txt" (trimSuffix "/" .Values.gateway.keysFile.mountPath) }}
{{- end }}

{{/* The gateway's /metrics port ("0": not served). */}}
{{- define "llm-worker.gatewayMetricsPort" -}}
{{- index .Values.config "LLM_WORKER_GATEWAY_METRICS_PORT" | default "9465" | toString }}
{{- end }}

{{- define "llm-worker.redisHost" -}}
{{- printf "%s-redis" (include "llm-worker.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Redis URL stored in the chart's Secret (empty when an existing Secret holds it). */}}
{{- define "llm-worker.redisUrl" -}}
{{- if .Values.redis.embedded.enabled }}
{{- printf "redis://%s:6379/0" (include "llm-worker.redisHost" .) }}
{{- else if not .Values.redis.existingSecret }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{/* Whether the chart must create its own Secret. */}}
{{- define "llm-worker.createSecret" -}}
{{- if or (not .Values.apiKey.existingSecret) (not .Values.redis.existingSecret) }}true{{ end }}
{{- end }}

{{/* host:port for KEDA's redis trigger. */}}
{{- define "llm-worker.kedaAddress" -}}
{{- $k := .Values.autoscaling.keda.redis }}
{{- if $k.address }}
{{- $k.address }}
{{- else if .Values.redis.embedded.enabled }}
{{- printf "%s:6379" (include "llm-worker.redisHost" .) }}
{{- else if and .Values.redis.url (not .Values.redis.existingSecret) }}
{{- $u := urlParse .Values.redis.url }}
{{- if contains ":" $u.host }}{{ $u.host }}{{ else }}{{ printf "%s:6379" $u.host }}{{ end }}
{{- end }}
{{- end }}

{{- define "llm-worker.kedaDatabaseIndex" -}}
{{- $k := .Values.autoscaling.keda.redis }}
{{- if not (kindIs "invalid" $k.databaseIndex) }}
{{- $k.databaseIndex }}
{{- else if and .Values.redis.url (not .Values.redis.existingSecret) (not .Values.redis.embedded.enabled) }}
{{- $path := trimPrefix "/" (urlParse .Values.redis.url).path }}
{{- default "0" $path }}
{{- else }}0{{ end }}
{{- end }}

{{/*
Checks that the schema cannot express; each failure names the values to change.
*/}}
{{- define "llm-worker.validate" -}}
{{- $deadline := include "llm-worker.jobDeadline" . | float64 }}
{{- $shutdownGrace := index .Values.config "LLM_WORKER_SHUTDOWN_GRACE_S" | default "300" | float64 }}
{{- if le (float64 .Values.terminationGracePeriodSeconds) (addf $shutdownGrace 10) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be greater than config.LLM_WORKER_SHUTDOWN_GRACE_S (%v) + 10: SIGTERM lets running streams finish for that long, then hands them back to the queue" .Values.terminationGracePeriodSeconds $shutdownGrace) }}
{{- end }}
{{- $leaseTtl := index .Values.config "LLM_WORKER_LEASE_TTL_S" | default "20" | float64 }}
{{- with index .Values.config "LLM_WORKER_VISIBILITY_TIMEOUT_S" }}
{{- if le (float64 .) $leaseTtl }}
{{- fail (printf "config.LLM_WORKER_VISIBILITY_TIMEOUT_S (%v) must be greater than config.LLM_WORKER_LEASE_TTL_S (%v), or every running job is delivered again before its lease shows it alive" . $leaseTtl) }}
{{- end }}
{{- end }}
{{- if hasKey .Values.config "LLM_WORKER_API_KEY" }}
{{- fail "config.LLM_WORKER_API_KEY is not allowed (a ConfigMap is not secret): set apiKey.value or apiKey.existingSecret" }}
{{- end }}
{{- if hasKey .Values.config "LLM_WORKER_REDIS_URL" }}
{{- fail "config.LLM_WORKER_REDIS_URL is not allowed: set redis.url, redis.existingSecret or redis.embedded.enabled" }}
{{- end }}
{{- if and .Values.redis.existingSecret .Values.redis.embedded.enabled }}
{{- fail "redis.existingSecret and redis.embedded.enabled are mutually exclusive: enable at most one" }}
{{- end }}
{{- if not (or .Values.redis.url .Values.redis.existingSecret .Values.redis.embedded.enabled) }}
{{- fail "no Redis configured: set redis.url, redis.existingSecret or redis.embedded.enabled" }}
{{- end }}
{{- $sentinelUrl := and .Values.redis.url (not .Values.redis.existingSecret) (not .Values.redis.embedded.enabled) (hasPrefix "sentinel://" .Values.redis.url) }}
{{- if and $sentinelUrl (not .Values.redis.sentinel.master) }}
{{- fail "redis.url is a sentinel:// URL: set redis.sentinel.master to the Sentinel service name (e.g. mymaster)" }}
{{- end }}
{{- if hasKey .Values.config "LLM_WORKER_REDIS_PASSWORD" }}
{{- fail "config.LLM_WORKER_REDIS_PASSWORD is not allowed (a ConfigMap is not secret): set redis.passwordSecret" }}
{{- end }}
{{- if hasKey .Values.config "LLM_WORKER_REDIS_SENTINEL_PASSWORD" }}
{{- fail "config.LLM_WORKER_REDIS_SENTINEL_PASSWORD is not allowed (a ConfigMap is not secret): set redis.sentinel.passwordSecret" }}
{{- end }}
{{- if and $sentinelUrl .Values.autoscaling.keda.enabled (not .Values.autoscaling.keda.redis.address) (not .Values.autoscaling.keda.redis.authSecret.addressKey) }}
{{- fail "autoscaling.keda with a sentinel:// redis.url: KEDA's redis trigger needs one host:port, set autoscaling.keda.redis.address (or authSecret.addressKey)" }}
{{- end }}
{{- if and .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}
{{- fail "autoscaling.hpa.enabled and autoscaling.keda.enabled are mutually exclusive: enable at most one (KEDA creates its own HPA)" }}
{{- end }}
{{- if hasKey .Values.config "LLM_WORKER_GATEWAY_API_KEYS" }}
{{- fail "config.LLM_WORKER_GATEWAY_API_KEYS is not allowed (a ConfigMap is not secret): set gateway.apiKeys.value or gateway.apiKeys.existingSecret" }}
{{- end }}
{{- if hasKey .Values.config "LLM_WORKER_GATEWAY_API_KEYS_FILE" }}
{{- fail "config.LLM_WORKER_GATEWAY_API_KEYS_FILE is not allowed: set gateway.keysFile.entries or gateway.keysFile.existingSecret (the chart mounts the file and sets the variable)" }}
{{- end }}
{{- if .Values.gateway.enabled }}
{{- if not (or (include "llm-worker.gatewayHasApiKeys" .) (include "llm-worker.gatewayHasKeysFile" .)) }}
{{- fail "gateway.enabled needs producer keys (the gateway will not start without them): set gateway.apiKeys.value, gateway.apiKeys.existingSecret, gateway.keysFile.entries or gateway.keysFile.existingSecret" }}
{{- end }}
{{- range $i, $line := .Values.gateway.keysFile.entries }}
{{- if not (regexMatch "^[A-Za-z0-9_.-]{1,64}:[0-9a-fA-F]{64}$" $line) }}
{{- /* Never the line itself: it may be a key pasted in place of its digest. */}}
{{- fail (printf "gateway.keysFile.entries[%d] is not name:sha256-of-key (a tenant name of 1-64 of A-Z a-z 0-9 _ . -, ':', 64 hex digits); put the key's sha256, never the key" $i) }}
{{- end }}
{{- end }}
{{- $gwPdb := .Values.gateway.podDisruptionBudget }}
{{- if and $gwPdb.enabled (not (kindIs "invalid" $gwPdb.minAvailable)) (not (kindIs "invalid" $gwPdb.maxUnavailable)) }}
{{- fail "gateway.podDisruptionBudget: set either minAvailable or maxUnavailable, not both (set the other to null)" }}
{{- end }}
{{- $gwGrace := float64 .Values.gateway.terminationGracePeriodSeconds }}
{{- $preStop := float64 .Values.gateway.preStopSleepSeconds }}
{{- $fastPath := not (has (index .Values.config "LLM_WORKER_GATEWAY_FAST_PATH" | default "true" | toString | lower | trim) (list "false" "0" "no" "off" "f" "n")) }}
{{- if and $fastPath (le $gwGrace (addf $preStop $shutdownGrace 10)) }}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%v) must be greater than gateway.preStopSleepSeconds (%v) + config.LLM_WORKER_SHUTDOWN_GRACE_S (%v) + 10: the gateway's fast path runs jobs and hands them back to the queue after that grace (or set config.LLM_WORKER_GATEWAY_FAST_PATH to \"false\")" .Values.gateway.terminationGracePeriodSeconds .Values.gateway.preStopSleepSeconds $shutdownGrace) }}
{{- else if le $gwGrace $preStop }}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%v) must be greater than gateway.preStopSleepSeconds (%v): the grace includes the preStop sleep" .Values.gateway.terminationGracePeriodSeconds .Values.gateway.preStopSleepSeconds) }}
{{- end }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set either minAvailable or maxUnavailable, not both (set the other to null)" }}
{{- end }}
{{- if .Values.autoscaling.hpa.enabled }}
{{- if gt (int .Values.autoscaling.hpa.minReplicas) (int .Values.autoscaling.hpa.maxReplicas) }}
{{- fail "autoscaling.hpa.minReplicas must not exceed autoscaling.hpa.maxReplicas" }}
{{- end }}
{{- end }}
{{- if .Values.autoscaling.keda.enabled }}
{{- $keda := .Values.autoscaling.keda }}
{{- if gt (int $keda.minReplicaCount) (int $keda.maxReplicaCount) }}
{{- fail "autoscaling.keda.minReplicaCount must not exceed autoscaling.keda.maxReplicaCount" }}
{{- end }}
{{- if lt (float64 $keda.cooldownPeriod) $deadline }}
{{- fail (printf "autoscaling.keda.cooldownPeriod (%v) must be at least config.LLM_WORKER_JOB_DEADLINE_S (%v): KEDA cannot see jobs in progress, so a shorter cooldown scales busy workers away" $keda.cooldownPeriod (include "llm-worker.jobDeadline" .)) }}
{{- end }}
{{- if and (not (include "llm-worker.kedaAddress" .)) (not $keda.redis.authSecret.addressKey) }}
{{- fail "autoscaling.keda.redis.address is required when the Redis URL comes from redis.existingSecret (or set autoscaling.keda.redis.authSecret.addressKey)" }}
{{- end }}
{{- if and .Values.redis.url (not .Values.redis.existingSecret) (not .Values.redis.embedded.enabled) (not (hasPrefix "sentinel://" .Values.redis.url)) (urlParse .Values.redis.url).userinfo (not $keda.redis.authSecret.passwordKey) }}
{{- fail "redis.url carries a password that KEDA cannot read: set autoscaling.keda.redis.authSecret.name and .passwordKey" }}
{{- end }}
{{- end }}
{{- end }}
