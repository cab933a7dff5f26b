{{/* Chart name, overridable with nameOverride. */}}
{{- define "gatecast.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name of the release's objects: the release name, plus the
chart name unless the release name already contains it. 63 characters max
(DNS label); the Redis and Service suffixes are kept short.
*/}}
{{- define "gatecast.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gatecast.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "gatecast.labels" -}}
helm.sh/chart: {{ include "gatecast.chart" . }}
app.kubernetes.io/name: {{ include "gatecast.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gatecast
{{- end }}

{{/* Selector of the gateway pods (the component keeps in-chart Redis out). */}}
{{- define "gatecast.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gatecast.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* Selector of the in-chart Redis pod. */}}
{{- define "gatecast.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gatecast.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "gatecast.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gatecast.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the API key and JWT secret. */}}
{{- define "gatecast.secretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else }}
{{- include "gatecast.fullname" . }}
{{- end }}
{{- end }}

{{- define "gatecast.redis.fullname" -}}
{{- printf "%s-redis" (include "gatecast.fullname" .) }}
{{- end }}

{{/* image reference: repository:tag, or repository@digest when a digest is given. */}}
{{- define "gatecast.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "gatecast.redis.image" -}}
{{- $img := .Values.redis.inChart.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository $img.tag }}
{{- end }}
{{- end }}

{{/*
The Redis URL when it is not read from a Secret: the in-chart Redis, else
redis.url. Empty means the single-node in-process engine.
*/}}
{{- define "gatecast.redisUrl" -}}
{{- if .Values.redis.inChart.enabled }}
{{- printf "redis://%s.%s.svc:%d" (include "gatecast.redis.fullname" .) .Release.Namespace (int .Values.redis.inChart.port) }}
{{- else }}
{{- .Values.redis.url }}
{{- end }}
{{- end }}

{{/*
"true" when the chart keeps redis.url in its own Secret: an external URL
given in values (the in-chart Redis's URL has no password and stays in the
ConfigMap; redis.existingSecret is the user's Secret).
*/}}
{{- define "gatecast.redisUrlInSecret" -}}
{{- if and .Values.redis.url (not .Values.redis.inChart.enabled) (not .Values.redis.existingSecret) }}true{{ end }}
{{- end }}

{{- define "gatecast.redis.urlSecretName" -}}
{{- printf "%s-redis-url" (include "gatecast.fullname" .) }}
{{- end }}

{{/* terminationGracePeriodSeconds: explicit, else preStop + shutdown grace + 10s. */}}
{{- define "gatecast.terminationGracePeriodSeconds" -}}
{{- $min := add .Values.lifecycle.preStopSleepSeconds .Values.config.shutdownGraceSeconds }}
{{- if .Values.lifecycle.terminationGracePeriodSeconds }}
{{- if le (int .Values.lifecycle.terminationGracePeriodSeconds) (int $min) }}
{{- fail (printf "lifecycle.terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds + config.shutdownGraceSeconds (%d), or the drain is cut short by SIGKILL" (int .Values.lifecycle.terminationGracePeriodSeconds) (int $min)) }}
{{- end }}
{{- .Values.lifecycle.terminationGracePeriodSeconds }}
{{- else }}
{{- add $min 10 }}
{{- end }}
{{- end }}

{{/* Refuse configurations that would run several replicas without Redis. */}}
{{- define "gatecast.validate" -}}
{{- $redis := or .Values.redis.inChart.enabled .Values.redis.url .Values.redis.existingSecret }}
{{- if and (not $redis) (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "several replicas need Redis: set redis.url, redis.existingSecret or redis.inChart.enabled (without Redis, run replicaCount=1 with autoscaling.enabled=false)" }}
{{- end }}
{{- if gt (mul (int .Values.config.drainSpreadSeconds) 4) (mul (int .Values.config.shutdownGraceSeconds) 3) }}
{{- fail (printf "config.drainSpreadSeconds (%d) must be at most three quarters of config.shutdownGraceSeconds (%d): gatecast refuses it" (int .Values.config.drainSpreadSeconds) (int .Values.config.shutdownGraceSeconds)) }}
{{- end }}
{{- if .Values.redis.password.existingSecret }}
{{- if not (or .Values.redis.url .Values.redis.existingSecret .Values.redis.inChart.enabled) }}
{{- fail "redis.password.existingSecret needs a Redis URL (redis.url, without a password)" }}
{{- end }}
{{- if regexMatch "://[^/@]*:[^/@]*@" .Values.redis.url }}
{{- fail "redis.url holds a password (user:password@) and redis.password.existingSecret gives one too: keep one" }}
{{- end }}
{{- end }}
{{- if and .Values.redis.caBundle.secret .Values.redis.caBundle.configMap }}
{{- fail "redis.caBundle: set secret or configMap, not both" }}
{{- end }}
{{- if and .Values.auth.clientJwtSecret .Values.auth.clientJwtPublicKey }}
{{- fail "auth.clientJwtSecret (HS256) and auth.clientJwtPublicKey (RS256/ES256) are both set: gatecast accepts one, choose one" }}
{{- end }}
{{- if and .Values.register.enabled (not .Values.gatewayWorker.enabled) }}
{{- fail "register.enabled needs gatewayWorker.enabled (the Register lists the inner ports, which are on loopback without it)" }}
{{- end }}
{{- if and .Values.gatewayWorker.secretKey (lt (len .Values.gatewayWorker.secretKey) 16) }}
{{- fail "gatewayWorker.secretKey must be at least 16 bytes (gatecast refuses shorter; PHP's Gateway::$secretKey takes the same value)" }}
{{- end }}
{{- if and .Values.redis.inChart.enabled (or .Values.redis.url .Values.redis.existingSecret) }}
{{- fail "redis.inChart.enabled conflicts with redis.url / redis.existingSecret: choose one" }}
{{- end }}
{{- end }}
