{{/* Names, labels and the derived values every template shares. */}}

{{- define "apar-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release fullname; kept <= 40 chars because KubeRay derives longer names (RayCluster, services, pods) from it. */}}
{{- define "apar-serve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "apar-serve.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "apar-serve.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "apar-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "apar-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
Labels of the Ray pods and of the selectors that pick them. Not app.kubernetes.io/name: KubeRay
labels Ray pods app.kubernetes.io/name=kuberay and its RayService head Service selects on that,
so a pod template must leave that key (and created-by, ray.io/*) to KubeRay.
*/}}
{{- define "apar-serve.rayPodSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
apar-serve/ray-node: "true"
{{- end -}}

{{- define "apar-serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "apar-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: apar-serve
{{- end -}}

{{- define "apar-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "apar-serve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "apar-serve.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{- define "apar-serve.workerImage" -}}
{{- $img := merge (deepCopy .Values.rayCluster.workers.image) .Values.image -}}
{{- include "apar-serve.image" $img -}}
{{- end -}}

{{- define "apar-serve.workerImagePullPolicy" -}}
{{- default .Values.image.pullPolicy .Values.rayCluster.workers.image.pullPolicy -}}
{{- end -}}

{{/* Redis names: the chart's Redis Service/StatefulSet, and the Secrets behind $APAR_REDIS_URL. */}}
{{- define "apar-serve.redisFullname" -}}
{{- printf "%s-redis" (include "apar-serve.fullname" .) -}}
{{- end -}}

{{- define "apar-serve.redisPasswordSecret" -}}
{{- default (include "apar-serve.redisFullname" .) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{- define "apar-serve.redisUrlSecret" -}}
{{- default (printf "%s-external" (include "apar-serve.redisFullname" .)) .Values.redis.external.existingSecret -}}
{{- end -}}

{{- define "apar-serve.redisUrlKey" -}}
{{- if .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecretKey -}}
{{- else -}}
redis-url
{{- end -}}
{{- end -}}

{{/* The model as the engine sees it inside the Ray pods. */}}
{{- define "apar-serve.modelPath" -}}
{{- $src := .Values.modelSource -}}
{{- if eq $src.type "pvc" -}}
{{- trimSuffix "/" (printf "%s/%s" $src.mountPath (trimPrefix "/" $src.pvc.path)) -}}
{{- else if eq $src.type "objectStorage" -}}
{{- printf "%s/%s" $src.mountPath (base (trimSuffix "/" $src.objectStorage.uri)) -}}
{{- else -}}
{{- .Values.apar.model -}}
{{- end -}}
{{- end -}}

{{/*
The Ray Serve deploy config (serveConfigV2): the same dict `cluster.config.to_serve_deploy_dict`
builds for `apar serve` from the same config, i.e. one application `cluster.app:build_app` whose
args are the whole config. Only `model` may differ (the in-pod path of a pvc/objectStorage model).
Keys Helm drops when a user sets them to null are put back as null.
*/}}
{{- define "apar-serve.serveConfig" -}}
{{- $cfg := deepCopy .Values.apar -}}
{{- $_ := set $cfg "model" (include "apar-serve.modelPath" .) -}}
{{- $nullable := dict "engine" (list "num_blocks" "max_model_len" "quantization" "speculative") "worker" (list "autoscaling_config") "grpc" (list "request_timeout_s") "redis" (list "url") -}}
{{- range $section, $keys := $nullable -}}
{{- $sec := get $cfg $section -}}
{{- range $keys -}}
{{- if not (hasKey $sec .) -}}
{{- $_ := set $sec . nil -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $grpc := dict "port" $cfg.grpc.port "grpc_servicer_functions" (list "cluster.grpc_service.add_apar_service" "cluster.grpc_service.add_health_service") -}}
{{- if not (kindIs "invalid" $cfg.grpc.request_timeout_s) -}}
{{- $_ := set $grpc "request_timeout_s" $cfg.grpc.request_timeout_s -}}
{{- end -}}
{{- $app := dict "name" $cfg.app_name "route_prefix" "/" "import_path" "cluster.app:build_app" "args" $cfg -}}
{{- $serve := dict "proxy_location" "EveryNode" "http_options" (dict "host" $cfg.http.host "port" $cfg.http.port) "grpc_options" $grpc "applications" (list $app) -}}
{{- toYaml $serve -}}
{{- end -}}

{{/* Cross-field checks the JSON schema cannot express; each fails with the offending keys. */}}
{{- define "apar-serve.validate" -}}
{{- $w := .Values.rayCluster.workers -}}
{{- if gt (int $w.minReplicas) (int $w.maxReplicas) -}}
{{- fail (printf "rayCluster.workers.minReplicas (%d) must be <= rayCluster.workers.maxReplicas (%d)" (int $w.minReplicas) (int $w.maxReplicas)) -}}
{{- end -}}
{{- if or (lt (int $w.replicas) (int $w.minReplicas)) (gt (int $w.replicas) (int $w.maxReplicas)) -}}
{{- fail (printf "rayCluster.workers.replicas (%d) must lie within minReplicas..maxReplicas (%d..%d)" (int $w.replicas) (int $w.minReplicas) (int $w.maxReplicas)) -}}
{{- end -}}
{{- if and (gt (float64 .Values.apar.worker.num_gpus) 0.0) (eq (int $w.gpus) 0) -}}
{{- fail "apar.worker.num_gpus > 0 needs GPU worker pods: set rayCluster.workers.gpus > 0" -}}
{{- end -}}
{{- if and (ne .Values.modelSource.type "image") (ne (toString (index .Values.rayCluster.head.rayStartParams "num-cpus")) "0") -}}
{{- fail "rayCluster.head.rayStartParams.num-cpus must stay \"0\" with a pvc/objectStorage model: only worker pods get the model, so no replica may run on the head" -}}
{{- end -}}
{{- if .Values.apar.redis.url -}}
{{- fail "apar.redis.url must stay null in the chart: configure Redis under redis.deploy / redis.external (the URL reaches the pods as $APAR_REDIS_URL from a Secret)" -}}
{{- end -}}
{{- end -}}

{{/* Environment of every Ray container; caches point into the /tmp emptyDir (read-only root fs). */}}
{{- define "apar-serve.rayEnv" -}}
{{- if .Values.redis.deploy }}
- name: APAR_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "apar-serve.redisPasswordSecret" . }}
      key: redis-password
# Kubernetes expands $(APAR_REDIS_PASSWORD): the password never appears in the pod spec.
- name: APAR_REDIS_URL
  value: {{ printf "redis://:$(APAR_REDIS_PASSWORD)@%s.%s.svc:%d/0" (include "apar-serve.redisFullname" .) .Release.Namespace (int .Values.redis.port) | quote }}
{{- else }}
- name: APAR_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "apar-serve.redisUrlSecret" . }}
      key: {{ include "apar-serve.redisUrlKey" . }}
{{- end }}
- name: HF_HOME
  value: /tmp/hf
- name: HF_HUB_OFFLINE
  value: "1"
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: CUDA_CACHE_PATH
  value: /tmp/.nv
- name: TRITON_CACHE_DIR
  value: /tmp/.triton
{{- $niceness := false }}
{{- range .Values.rayCluster.env }}{{ if eq .name "RAY_worker_niceness" }}{{ $niceness = true }}{{ end }}{{ end }}
{{- if not $niceness }}
# Ray starts replicas at nice 15; the engine is the pod's workload (as in `apar serve`).
- name: RAY_worker_niceness
  value: "0"
{{- end }}
{{- with .Values.rayCluster.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Writable paths of the read-only Ray containers, and the model volume (workers only: `models`). */}}
{{- define "apar-serve.rayVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: ray-logs
  mountPath: /tmp/ray
- name: dshm
  mountPath: /dev/shm
{{- if and .models (ne .root.Values.modelSource.type "image") }}
- name: models
  mountPath: {{ .root.Values.modelSource.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "apar-serve.rayVolumes" -}}
- name: tmp
  emptyDir: {}
- name: ray-logs
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- $src := .root.Values.modelSource }}
{{- if not .models }}
{{- else if eq $src.type "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ $src.pvc.claimName }}
    readOnly: true
{{- else if eq $src.type "objectStorage" }}
- name: models
  emptyDir:
    sizeLimit: {{ $src.objectStorage.sizeLimit }}
{{- end }}
{{- end -}}

{{/* objectStorage model source: copy the model directory before Ray starts. */}}
{{- define "apar-serve.modelInitContainers" -}}
{{- $src := .Values.modelSource -}}
{{- if eq $src.type "objectStorage" }}
- name: fetch-model
  image: {{ include "apar-serve.image" $src.objectStorage.image }}
  imagePullPolicy: {{ $src.objectStorage.image.pullPolicy }}
  command:
    - aws
    - s3
    - sync
    - {{ $src.objectStorage.uri | quote }}
    - {{ include "apar-serve.modelPath" . | quote }}
    - --no-progress
    {{- with $src.objectStorage.endpointUrl }}
    - --endpoint-url
    - {{ . | quote }}
    {{- end }}
  env:
    - name: HOME
      value: /tmp
  {{- with $src.objectStorage.credentialsSecret }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  resources:
    {{- toYaml $src.objectStorage.resources | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: models
      mountPath: {{ $src.mountPath }}
{{- end }}
{{- end -}}
