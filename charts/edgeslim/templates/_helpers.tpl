{{/* Helpers are prefixed with the chart name so a parent chart's helpers cannot clash. */}}

{{/* The chart name, unless overridden. */}}
{{- define "edgeslim.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name of every namespaced object; 63 characters at most (DNS label). */}}
{{- define "edgeslim.fullname" -}}
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

{{- define "edgeslim.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "edgeslim.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edgeslim.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "edgeslim.labels" -}}
helm.sh/chart: {{ include "edgeslim.chart" . }}
{{ include "edgeslim.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "edgeslim.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "edgeslim.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "edgeslim.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Image of the Jobs and Deployments the operator creates: repository:tag, the tag
defaulting to the chart's appVersion. Call with (dict "image" .Values.x.image "root" $).
*/}}
{{- define "edgeslim.componentImage" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* compressor.command as one shell-quoted string: settings.py splits it with shlex. */}}
{{- define "edgeslim.compressorCommand" -}}
{{- include "edgeslim.shellJoin" .Values.compressor.command }}
{{- end }}

{{- define "edgeslim.servingCommand" -}}
{{- include "edgeslim.shellJoin" .Values.serving.command }}
{{- end }}

{{/* A list as one shell-quoted string; the operator splits it with shlex. */}}
{{- define "edgeslim.shellJoin" -}}
{{- $parts := list }}
{{- range . }}
{{- $parts = append $parts (squote .) }}
{{- end }}
{{- join " " $parts }}
{{- end }}

{{/*
Reading Secrets named by spec.source.credentialsSecret: `get` only (never list or
watch, so the operator cannot enumerate them), optionally only the names in
rbac.secrets.names. The operator reads one to fetch a result's manifest.json and
to delete artifacts on cleanup; compressor and serving pods get theirs through
secretKeyRef, which the kubelet resolves without the operator.
*/}}
{{- define "edgeslim.secretRule" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
  {{- with .Values.rbac.secrets.names }}
  resourceNames:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
