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

{{- define "drover.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: drain delay + graceful timeout + margin, so
the kubelet's SIGKILL never cuts a drain short that drover would finish.
*/}}
{{- define "drover.terminationGracePeriodSeconds" -}}
{{- add .Values.drainDelay .Values.gracefulTimeout .Values.terminationGracePeriodMargin }}
{{- end }}

{{/*
Fails the render when a list of worker contexts disagrees with a numeric
`workers` (drover would refuse to start with exit code 78).
*/}}
{{- define "drover.checkContexts" -}}
{{- if kindIs "slice" .Values.workerContexts }}
{{- $n := len .Values.workerContexts }}
{{- if eq $n 0 }}
{{- fail "workerContexts is an empty list: give one item per worker, or a mapping shared by every worker" }}
{{- end }}
{{- if and (ne (toString .Values.workers) "auto") (ne (int .Values.workers) $n) }}
{{- fail (printf "workerContexts lists %d contexts but workers is %v: make them agree (a list gives one context per worker)" $n .Values.workers) }}
{{- end }}
{{- end }}
{{- end }}
