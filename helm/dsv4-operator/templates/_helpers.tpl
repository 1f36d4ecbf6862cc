{{/* Chart name, truncated to the 63 characters Kubernetes allows in a label. */}}
{{- define "dsv4-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "dsv4-operator.fullname" -}}
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

{{- define "dsv4-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dsv4-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "dsv4-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dsv4-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dsv4
{{- end }}

{{- define "dsv4-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dsv4-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dsv4-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The operator's permissions, the same list for the ClusterRole (all namespaces) and each Role
(watchNamespaces). Only what the operator calls: its own resource (+ status, scale, finalizers for
ownerReferences), the objects it renders (Deployment, Service, ConfigMap, PodDisruptionBudget), events
it posts, pods it reads (to find the pods whose /metrics it scrapes); PodMonitors only with rbac.monitoring,
KEDA ScaledObjects only with rbac.keda. No Secrets at all: the runtime pod references the API-key Secret
(env secretKeyRef) and the kubelet resolves it; the operator never reads Secret data.
*/}}
{{- define "dsv4-operator.rules" -}}
- apiGroups: ["serving.dsv4.dev"]
  resources: ["dsv4endpoints"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["serving.dsv4.dev"]
  resources: ["dsv4endpoints/status", "dsv4endpoints/scale"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["serving.dsv4.dev"]
  resources: ["dsv4endpoints/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# ReplicaSets and their events: why pods cannot be created (quota, a missing PriorityClass) for Degraded
- apiGroups: ["apps"]
  resources: ["replicasets"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch", "list"]
{{- if .Values.rbac.monitoring }}
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors", "podmonitors"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
{{- end }}
{{- if .Values.rbac.keda }}
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
{{- end }}
{{- end }}
