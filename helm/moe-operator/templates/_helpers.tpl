{{/* Chart name (max 63 chars). */}}
{{- define "moe-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of every object. */}}
{{- define "moe-operator.fullname" -}}
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

{{- define "moe-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels selecting the operator pods (stable across upgrades). */}}
{{- define "moe-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of every object. */}}
{{- define "moe-operator.labels" -}}
helm.sh/chart: {{ include "moe-operator.chart" . }}
{{ include "moe-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: moe-operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "moe-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moe-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "moe-operator.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end }}

{{- define "moe-operator.workerImage" -}}
{{- default (printf "ghcr.io/moe-operator/moe-worker:%s" .Chart.AppVersion) .Values.workerDefaults.image -}}
{{- end }}

{{- define "moe-operator.leaseName" -}}
{{- default (printf "%s-leader" (include "moe-operator.fullname" .)) .Values.leaderElection.leaseName | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* The Secret holding the token master key (operator/src/tokens.rs). */}}
{{- define "moe-operator.tokenKeySecret" -}}
{{- default (printf "%s-token-key" (include "moe-operator.fullname" .)) .Values.operator.tokenKeySecret | trunc 253 | trimSuffix "-" -}}
{{- end }}

{{/* The namespace watched with scope namespace. */}}
{{- define "moe-operator.watchNamespace" -}}
{{- default .Release.Namespace .Values.rbac.watchNamespace -}}
{{- end }}

{{/* Labels the operator puts on every worker pod (operator/src/resources.rs). */}}
{{- define "moe-operator.workerPodSelector" -}}
app.kubernetes.io/name: moe-worker
app.kubernetes.io/managed-by: moe-operator
{{- end }}

{{/* Runbook URL of an alert. */}}
{{- define "moe-operator.runbook" -}}
{{- printf "%s#%s" .root.Values.prometheusRule.runbookBaseUrl (lower .alert) -}}
{{- end }}

{{/* workerDefaults.resources as JSON with every quantity a string (k8s Quantity). */}}
{{- define "moe-operator.workerResourcesJson" -}}
{{- $out := dict }}
{{- range $section, $items := .Values.workerDefaults.resources }}
{{- if kindIs "map" $items }}
{{- $m := dict }}
{{- range $k, $v := $items }}
{{- $_ := set $m $k (toString $v) }}
{{- end }}
{{- $_ := set $out $section $m }}
{{- else }}
{{- $_ := set $out $section $items }}
{{- end }}
{{- end }}
{{- toJson $out -}}
{{- end }}

{{/* The operator pods' selector labels as key=value,... (MOE_OPERATOR_POD_LABELS). */}}
{{- define "moe-operator.podLabelsList" -}}
{{- $labels := include "moe-operator.selectorLabels" . | fromYaml -}}
{{- $pairs := list -}}
{{- range $k := keys $labels | sortAlpha -}}
{{- $pairs = append $pairs (printf "%s=%v" $k (get $labels $k)) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end }}

{{/* Extra peers of the workers' control port, as a JSON list (MOE_OPERATOR_CONTROL_PEERS):
networkPolicy.metricsFrom, and Prometheus when the PodMonitor is on. */}}
{{- define "moe-operator.controlPeersJson" -}}
{{- $peers := list -}}
{{- range .Values.networkPolicy.metricsFrom -}}
{{- $peers = append $peers . -}}
{{- end -}}
{{- if and .Values.metrics.podMonitor.enabled .Values.networkPolicy.prometheusPodSelector -}}
{{- $peers = append $peers (dict "namespaceSelector" (dict) "podSelector" (dict "matchLabels" .Values.networkPolicy.prometheusPodSelector)) -}}
{{- end -}}
{{- toJson $peers -}}
{{- end }}
