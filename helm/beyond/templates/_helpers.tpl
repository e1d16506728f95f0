{{/* Names, labels and the pieces every workload shares. */}}

{{- define "beyond.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "beyond.fullname" -}}
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

{{/* "<fullname>-<component>", for a dict with "root" and "component". */}}
{{- define "beyond.componentName" -}}
{{- printf "%s-%s" (include "beyond.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "beyond.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels; call with dict "root" $ "component" "gateway". */}}
{{- define "beyond.labels" -}}
helm.sh/chart: {{ include "beyond.chart" .root }}
{{ include "beyond.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: beyond
{{- end }}

{{- define "beyond.selectorLabels" -}}
app.kubernetes.io/name: {{ include "beyond.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "beyond.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "beyond.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "beyond.secretName" -}}
{{- default (include "beyond.componentName" (dict "root" . "component" "secrets")) .Values.secrets.existingSecret }}
{{- end }}

{{- define "beyond.configName" -}}
{{- include "beyond.componentName" (dict "root" . "component" "config") }}
{{- end }}

{{- define "beyond.pvcName" -}}
{{- default (include "beyond.componentName" (dict "root" . "component" "data")) .Values.persistence.existingClaim }}
{{- end }}

{{/* image reference; call with dict "root" $ "image" .Values.image.service */}}
{{- define "beyond.image" -}}
{{- $repository := required "image.<service|torchserve>.repository is required" .image.repository }}
{{- printf "%s:%s" $repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* In-cluster URL of TorchServe (its auth proxy) for gateway and workers. */}}
{{- define "beyond.torchserveUrl" -}}
{{- printf "http://%s:%v" (include "beyond.componentName" (dict "root" . "component" "torchserve")) .Values.torchserve.servicePort }}
{{- end }}

{{/* Where the shared volume is mounted, and the folders on it. */}}
{{- define "beyond.dataMount" -}}/data{{- end }}

{{/* Pod-level bits shared by every Beyond pod (not Redis). */}}
{{- define "beyond.podSpecCommon" -}}
serviceAccountName: {{ include "beyond.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* nodeSelector, tolerations and affinity of one component's values. */}}
{{- define "beyond.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Secret-backed env of gateway and workers; call with dict "root" $ "apiKeys" bool. */}}
{{- define "beyond.secretEnv" -}}
{{- $secret := include "beyond.secretName" .root -}}
{{- if .apiKeys }}
- name: BEYOND_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: BEYOND_API_KEYS
{{- end }}
- name: BEYOND_TORCHSERVE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: BEYOND_TORCHSERVE_TOKEN
- name: BEYOND_REDIS_URL
  valueFrom:
    secretKeyRef:
{{- if and (not .root.Values.redis.enabled) .root.Values.redis.external.existingSecret }}
      name: {{ .root.Values.redis.external.existingSecret }}
      key: {{ .root.Values.redis.external.existingSecretKey }}
{{- else }}
      name: {{ $secret }}
      key: BEYOND_REDIS_URL
{{- end }}
{{- end }}

{{/* Volumes of gateway and workers: the shared data volume and scratch space. */}}
{{- define "beyond.serviceVolumes" -}}
- name: data
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "beyond.pvcName" . }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: state
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- end }}

{{- define "beyond.serviceVolumeMounts" -}}
- name: data
  mountPath: {{ include "beyond.dataMount" . }}
- name: state
  mountPath: /var/lib/beyond
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Restart pods when their configuration changes. */}}
{{- define "beyond.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}

{{/* Refuse values that would deploy a broken release (rendered from configmap.yaml). */}}
{{- define "beyond.validate" -}}
{{- range .Values.secrets.apiKeys }}
{{- if lt (len (toString .)) 16 }}
{{- fail "secrets.apiKeys: every key needs at least 16 characters (BEYOND_ENVIRONMENT=production refuses shorter ones)" }}
{{- end }}
{{- end }}
{{- if not .Values.redis.enabled }}
{{- if not (or .Values.redis.external.url .Values.redis.external.existingSecret) }}
{{- fail "redis.enabled is false: set redis.external.url or redis.external.existingSecret" }}
{{- end }}
{{- end }}
{{- if and .Values.torchserve.modelStore.fromVolume (not .Values.persistence.enabled) }}
{{- fail "torchserve.modelStore.fromVolume needs persistence.enabled" }}
{{- end }}
{{- end }}

{{/* NetworkPolicy peers: this release's gateway and worker pods. */}}
{{- define "beyond.clientPeers" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/name: {{ include "beyond.name" . }}
      app.kubernetes.io/instance: {{ .Release.Name }}
    matchExpressions:
      - key: app.kubernetes.io/component
        operator: In
        values: ["gateway", "worker"]
{{- end }}
