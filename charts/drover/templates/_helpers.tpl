{{/*
Names, labels and the few derived values every template shares.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "drover.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: fullnameOverride, else the release
name when it already contains the chart name, else "<release>-<chart>".
Kept to 47 characters so that "<fullname>-worker-contexts" (the longest
derived name) stays within the 63 of a label value.
*/}}
{{- define "drover.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "drover.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the pods; never change them in an upgrade. */}}
{{- define "drover.selectorLabels" -}}
app.kubernetes.io/name: {{ include "drover.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The recommended app.kubernetes.io labels of every object. */}}
{{- define "drover.labels" -}}
helm.sh/chart: {{ include "drover.chart" . }}
{{ include "drover.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/part-of: drover
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "drover.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "drover.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The ConfigMap holding worker-contexts.yaml. */}}
{{- define "drover.contextsConfigMap" -}}
{{- printf "%s-worker-contexts" (include "drover.fullname" .) }}
{{- end }}

{{/* Where the contexts ConfigMap is mounted with contexts.source volume. */}}
{{- define "drover.contextsDir" -}}
/etc/drover/contexts
{{- end }}

{{/* The Secret holding the admin token. */}}
{{- define "drover.adminTokenSecret" -}}
{{- default (printf "%s-admin-token" (include "drover.fullname" .)) .Values.adminToken.existingSecret }}
{{- end }}

{{/* Where the admin token Secret is mounted, and the token file in it. */}}
{{- define "drover.adminTokenDir" -}}
/var/run/drover/admin-token
{{- end }}
{{- define "drover.adminTokenFile" -}}
{{- printf "%s/%s" (include "drover.adminTokenDir" .) .Values.adminToken.key }}
{{- end }}

{{/*
The image the pod runs. An empty image.repository fails the render: the
chart cannot know your registry, and a made-up default would only show up
later as an ImagePullBackOff.
*/}}
{{- define "drover.image" -}}
{{- if not .Values.image.repository }}
{{- fail "image.repository is empty: set it to your drover image (the release workflow publishes ghcr.io/<owner>/drover), e.g. --set image.repository=ghcr.io/<owner>/drover, or to your app image with wrap.enabled=true" }}
{{- end }}
{{- include "drover.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "drover.wrapImage" -}}
{{- if not .Values.wrap.image.repository }}
{{- fail "wrap.image.repository is empty: set it to the drover image the initContainer copies drover from" }}
{{- end }}
{{- include "drover.imageRef" (dict "image" .Values.wrap.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "drover.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (.image.tag | default .appVersion) }}
{{- end }}
{{- end }}

{{/* The drover executable in the container: on PATH, or in the wrap volume. */}}
{{- define "drover.executable" -}}
{{- if .Values.wrap.enabled }}
{{- printf "%s/drover" (.Values.wrap.path | trimSuffix "/") }}
{{- else }}
{{- print "drover" }}
{{- end }}
{{- end }}

{{/* Seconds of preStop before drover gets SIGTERM: the chart's sleep, an
external one, and a sleep given in .Values.lifecycle. */}}
{{- define "drover.preStopSeconds" -}}
{{- $fromLifecycle := 0 }}
{{- with .Values.lifecycle }}{{ with .preStop }}{{ with .sleep }}{{ $fromLifecycle = int .seconds }}{{ end }}{{ end }}{{ end }}
{{- add .Values.preStopSleep .Values.externalPreStopSeconds $fromLifecycle }}
{{- end }}

{{/* Seconds from the pod's deletion until drover is done with its drain. */}}
{{- define "drover.drainSeconds" -}}
{{- add (include "drover.preStopSeconds" . | int) .Values.drainDelay .Values.gracefulTimeout }}
{{- end }}

{{/*
terminationGracePeriodSeconds: every preStop, drain delay, graceful
timeout, and a margin of at least 1 s, so the kubelet's SIGKILL never cuts
short a drain that drover would finish. Computed, never a value.
*/}}
{{- define "drover.terminationGracePeriodSeconds" -}}
{{- add (include "drover.drainSeconds" . | int) (max 1 .Values.terminationGracePeriodMargin) }}
{{- end }}

{{/* The env names the chart sets itself: extraEnv may not set them. */}}
{{- define "drover.reservedEnv" -}}
POD_NAMESPACE DROVER_WORKERS DROVER_PORT DROVER_ADMIN_PORT DROVER_BACKLOG DROVER_BALANCE DROVER_WORKER_CONTEXTS_CONFIGMAP DROVER_WORKER_CONTEXTS_FILE DROVER_WORKER_CONTEXTS_KEY DROVER_ON_CONTEXTS_CHANGE DROVER_DRAIN_DELAY DROVER_GRACEFUL_TIMEOUT DROVER_STOP_SIGNAL DROVER_RESTART DROVER_WORKER_READY DROVER_WORKER_READY_TIMEOUT DROVER_WORKER_TIMEOUT DROVER_MAX_REQUESTS DROVER_MAX_REQUESTS_JITTER DROVER_MAX_WORKER_MEMORY DROVER_MAX_WORKER_LIFETIME DROVER_MAX_WORKER_LIFETIME_JITTER DROVER_LOG_FORMAT DROVER_LOG_LEVEL DROVER_ADMIN_TOKEN_FILE
{{- end }}

{{/*
Fails the render on values that would install but not work: contexts that
disagree with `workers`, `workers: auto` without a CPU limit, contexts with
source none, extraEnv overriding what the chart sets, wrap without command.
*/}}
{{- define "drover.checkValues" -}}
{{- if kindIs "slice" .Values.workerContexts }}
{{- $n := len .Values.workerContexts }}
{{- if eq $n 0 }}
{{- fail "workerContexts is an empty list: give one item per worker, or a mapping shared by every worker" }}
{{- end }}
{{- if and (ne (toString .Values.workers) "auto") (ne (int .Values.workers) $n) }}
{{- fail (printf "workerContexts lists %d contexts but workers is %v: make them agree (a list gives one context per worker)" $n .Values.workers) }}
{{- end }}
{{- end }}
{{- if and (eq .Values.contexts.source "none") (not (empty .Values.workerContexts)) }}
{{- fail "workerContexts is set but contexts.source is none: set contexts.source to volume or api, or remove workerContexts" }}
{{- end }}
{{- if eq (toString .Values.workers) "auto" }}
{{- $limits := (.Values.resources | default dict).limits | default dict }}
{{- if not $limits.cpu }}
{{- fail "workers: auto needs resources.limits.cpu: without a CPU limit drover would start one worker per CPU of the node, whatever the node is" }}
{{- end }}
{{- end }}
{{- $reserved := splitList " " (include "drover.reservedEnv" .) }}
{{- range .Values.extraEnv }}
{{- if has .name $reserved }}
{{- fail (printf "extraEnv sets %s, which the chart sets itself: use the chart's value for it (drainDelay, gracefulTimeout, contexts.source, ...), so that terminationGracePeriodSeconds stays computed from the real settings" .name) }}
{{- end }}
{{- end }}
{{- if and .Values.wrap.enabled (not .Values.command) }}
{{- fail "wrap.enabled needs command: the app image's command, which drover runs as each worker (drover cannot read the image's ENTRYPOINT)" }}
{{- end }}
{{- end }}
