{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "lorafleet-serving.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: RELEASE-CHART (RELEASE alone when it already contains the chart name), 63 characters at most. */}}
{{- define "lorafleet-serving.fullname" -}}
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

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "lorafleet-serving.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "lorafleet-serving.labels" -}}
helm.sh/chart: {{ include "lorafleet-serving.chart" . }}
{{ include "lorafleet-serving.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lorafleet
{{- end }}

{{/* The server pods (Service, HPA, PDB, NetworkPolicy, ServiceMonitor select these; the test pod does not match). */}}
{{- define "lorafleet-serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorafleet-serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{/* The shared-storage claim: the existing one, or the one this chart creates. */}}
{{- define "lorafleet-serving.storageClaimName" -}}
{{- .Values.storage.existingClaim | default (printf "%s-storage" (include "lorafleet-serving.fullname" .)) }}
{{- end }}

{{/* The Secret holding the API key: the existing one, or the one this chart creates. */}}
{{- define "lorafleet-serving.apiKeySecretName" -}}
{{- .Values.apiKey.existingSecret | default (printf "%s-api-key" (include "lorafleet-serving.fullname" .)) }}
{{- end }}

{{/* What the server serves as its base: a merged model folder from the registry, or a hub id. */}}
{{- define "lorafleet-serving.baseModel" -}}
{{- with .Values.base.registry }}
{{- if .name }}
{{- printf "%s/models/%s/%s" $.Values.storage.mountPath .name .version }}
{{- else }}
{{- $.Values.base.model }}
{{- end }}
{{- end }}
{{- end }}

{{/* JSON list of NAME=PATH, one per startup adapter (its registry folder), sorted by name as serving/vllm.py does. */}}
{{- define "lorafleet-serving.adapterModules" -}}
{{- $versions := dict }}
{{- range .Values.adapters }}
{{- $_ := set $versions .name .version }}
{{- end }}
{{- $modules := list }}
{{- range $name := keys $versions | sortAlpha }}
{{- $modules = append $modules (printf "%s=%s/adapters/%s/%s" $name $.Values.storage.mountPath $name (get $versions $name)) }}
{{- end }}
{{- toJson $modules }}
{{- end }}

{{/*
The server's argv as a JSON list: command first, then args. For vllm it must equal
`lorafleet serve --engine vllm --print-command ...` for the same settings (tests/test_helm.py checks it):
  vllm serve BASE --host 0.0.0.0 --port P --enable-lora [--lora-modules NAME=PATH ...] --max-loras N
      --max-lora-rank R --max-cpu-loras C [vllm.extraArgs ...]
  lorafleet serve --engine cpu --base BASE [--adapter NAME=PATH ...] --max-loras N --max-lora-rank R
      --max-cpu-loras C --host 0.0.0.0 --port P
*/}}
{{- define "lorafleet-serving.serverArgv" -}}
{{- $modules := include "lorafleet-serving.adapterModules" . | fromJsonArray }}
{{- $base := include "lorafleet-serving.baseModel" . }}
{{- $port := toString .Values.containerPort }}
{{- $lora := list "--max-loras" (toString .Values.lora.maxLoras) "--max-lora-rank" (toString .Values.lora.maxLoraRank) "--max-cpu-loras" (toString .Values.lora.maxCpuLoras) }}
{{- if eq .Values.backend "vllm" }}
{{- $argv := list "vllm" "serve" $base "--host" "0.0.0.0" "--port" $port "--enable-lora" }}
{{- if $modules }}
{{- $argv = concat $argv (list "--lora-modules") $modules }}
{{- end }}
{{- toJson (concat $argv $lora .Values.vllm.extraArgs) }}
{{- else }}
{{- $argv := list "lorafleet" "serve" "--engine" "cpu" "--base" $base }}
{{- range $modules }}
{{- $argv = concat $argv (list "--adapter" .) }}
{{- end }}
{{- toJson (concat $argv $lora (list "--host" "0.0.0.0" "--port" $port)) }}
{{- end }}
{{- end }}

{{/* The registry references the sync sidecar keeps loaded: sync.adapters, else the startup adapters' names. */}}
{{- define "lorafleet-serving.syncAdapters" -}}
{{- $refs := .Values.sync.adapters }}
{{- if not $refs }}
{{- range .Values.adapters }}
{{- $refs = append $refs .name }}
{{- end }}
{{- end }}
{{- join "," $refs }}
{{- end }}

{{/* The sync sidecar's argv as a JSON list. */}}
{{- define "lorafleet-serving.syncArgv" -}}
{{- $argv := list "lorafleet" "sync" "--storage" .Values.storage.mountPath "--target" (printf "http://127.0.0.1:%v" .Values.containerPort) }}
{{- with include "lorafleet-serving.syncAdapters" . }}
{{- $argv = concat $argv (list "--adapters" .) }}
{{- end }}
{{- $argv = concat $argv (list "--interval" .Values.sync.interval) }}
{{- if include "lorafleet-serving.routed" . }}
{{- $argv = concat $argv (list "--route-port" (toString .Values.sync.router.port) "--route-host" "0.0.0.0") }}
{{- end }}
{{- toJson $argv }}
{{- end }}

{{/* "true" when the sync sidecar routes aliases (vllm backend): the Service then targets the router's port. */}}
{{- define "lorafleet-serving.routed" -}}
{{- if and (eq .Values.backend "vllm") .Values.sync.enabled .Values.sync.router.enabled }}true{{ end }}
{{- end }}

{{/* Server resources: `resources` plus the GPU limit from vllm.gpus (vllm backend only). */}}
{{- define "lorafleet-serving.serverResources" -}}
{{- $resources := deepCopy (.Values.resources | default dict) }}
{{- if eq .Values.backend "vllm" }}
{{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" .Values.vllm.gpus) ($resources.limits | default dict)) }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
Cross-field rules JSON Schema cannot express (comparing two values, names unique within a list); every other
rule is in values.schema.json. Every problem is collected, then `fail` reports them all at once.
*/}}
{{- define "lorafleet-serving.validateValues" -}}
{{- $v := .Values }}
{{- $errors := list }}
{{- if lt (int $v.lora.maxCpuLoras) (int $v.lora.maxLoras) }}
{{- $errors = append $errors (printf "lora.maxCpuLoras (%v) must be >= lora.maxLoras (%v): vLLM keeps every GPU adapter in its CPU cache too" $v.lora.maxCpuLoras $v.lora.maxLoras) }}
{{- end }}
{{- $seen := dict }}
{{- range $v.adapters }}
{{- if hasKey $seen .name }}
{{- $errors = append $errors (printf "adapters: %q is listed twice (one version per name; load others with the sync sidecar)" .name) }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- $errors = append $errors (printf "autoscaling.minReplicas (%v) is greater than autoscaling.maxReplicas (%v)" $v.autoscaling.minReplicas $v.autoscaling.maxReplicas) }}
{{- end }}
{{- if and (include "lorafleet-serving.routed" .) (eq (int $v.sync.router.port) (int $v.containerPort)) }}
{{- $errors = append $errors (printf "sync.router.port (%v) must differ from containerPort (%v): the router and the server share the pod" $v.sync.router.port $v.containerPort) }}
{{- end }}
{{- if $errors }}
{{- fail (printf "\n\nlorafleet-serving: %d invalid value(s):\n  - %s\n" (len $errors) (join "\n  - " $errors)) }}
{{- /* Reached only under `helm lint`, whose fail() merely logs: emit a line that is not YAML so lint fails too. */}}
@invalid-values {{ join "; " $errors }}
{{- end }}
{{- end }}
