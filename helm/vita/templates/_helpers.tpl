{{/* Names ------------------------------------------------------------------------------------------------------- */}}

{{- define "vita.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vita.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries (Kubernetes' recommended app.kubernetes.io/* set); components add their own. */}}
{{- define "vita.chartLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vita
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* The labels of an object of the release as a whole (ServiceAccount, Secrets, monitoring): name and instance too,
so `-l app.kubernetes.io/instance=<release>` finds every object of the release. */}}
{{- define "vita.labels" -}}
{{ include "vita.chartLabels" . }}
app.kubernetes.io/name: {{ include "vita.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one component: include "vita.selectorLabels" (list $ "llm-generator") */}}
{{- define "vita.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "vita.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "vita.componentLabels" -}}
{{ include "vita.chartLabels" (index . 0) }}
{{ include "vita.selectorLabels" . }}
{{- end -}}

{{/* The five vita services: values key, `vita serve` service, llm role, and the Redis pool (stream and group). */}}
{{- define "vita.components" -}}
orchestrator: {key: orchestrator, service: orchestrator, role: "", pool: ""}
audio-encoder: {key: audioEncoder, service: audio-encoder, role: "", pool: audio-encoder}
vision-encoder: {key: visionEncoder, service: vision-encoder, role: "", pool: vision-encoder}
llm-generator: {key: llmGenerator, service: llm, role: generator, pool: "llm:generator"}
llm-monitor: {key: llmMonitor, service: llm, role: monitor, pool: "llm:monitor"}
{{- end -}}

{{- define "vita.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "vita.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "vita.image" -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) .Values.image.tag -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* Redis ------------------------------------------------------------------------------------------------------ */}}

{{/* The user's own Redis Secret, if any: redis.external.existingSecret (keys redis-url, redis-password) or
redis.bundled.existingSecret (the password alone, under redis.bundled.existingSecretPasswordKey). */}}
{{- define "vita.redisExistingSecret" -}}
{{- if eq .Values.redis.mode "external" -}}
{{- .Values.redis.external.existingSecret -}}
{{- else -}}
{{- .Values.redis.bundled.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* The bundled Redis with the password from the user's Secret: no redis-url to read, the services build it. */}}
{{- define "vita.bundledRedisExistingSecret" -}}
{{- if and (eq .Values.redis.mode "bundled") .Values.redis.bundled.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "vita.redisSecretName" -}}
{{- default (printf "%s-redis-auth" (include "vita.fullname" .)) (include "vita.redisExistingSecret" .) -}}
{{- end -}}

{{- define "vita.redisPasswordKey" -}}
{{- if and (eq .Values.redis.mode "bundled") .Values.redis.bundled.existingSecret -}}
{{- .Values.redis.bundled.existingSecretPasswordKey | default "redis-password" -}}
{{- else -}}
redis-password
{{- end -}}
{{- end -}}

{{- define "vita.redisHost" -}}
{{- if eq .Values.redis.mode "bundled" -}}
{{- printf "%s-redis.%s.svc" (include "vita.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "redis.external.host is required when redis.mode is external" .Values.redis.external.host -}}
{{- end -}}
{{- end -}}

{{- define "vita.redisPort" -}}
{{- if eq .Values.redis.mode "bundled" -}}6379{{- else -}}{{ .Values.redis.external.port }}{{- end -}}
{{- end -}}

{{- define "vita.redisDb" -}}
{{- if eq .Values.redis.mode "bundled" -}}0{{- else -}}{{ .Values.redis.external.db }}{{- end -}}
{{- end -}}

{{- define "vita.redisCluster" -}}
{{- and (eq .Values.redis.mode "external") .Values.redis.external.cluster -}}
{{- end -}}

{{- define "vita.redisTLS" -}}
{{- and (eq .Values.redis.mode "external") .Values.redis.external.tls -}}
{{- end -}}

{{/* The bundled Redis password: from values, else the one already in the cluster, else a new random one. */}}
{{- define "vita.bundledRedisPassword" -}}
{{- if .Values.redis.bundled.password -}}
{{- .Values.redis.bundled.password -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (printf "%s-redis-auth" (include "vita.fullname" .)) -}}
{{- if and $existing (index $existing.data "redis-password") -}}
{{- index $existing.data "redis-password" | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Checksums in pod annotations, so that `helm upgrade` with changed credentials rolls the pods that read them
(environment variables and files read once at start-up). The services: everything secrets.yaml renders. */}}
{{- define "vita.secretsChecksum" -}}
{{- include (print .Template.BasePath "/secrets.yaml") . | sha256sum -}}
{{- end -}}

{{/* The bundled Redis: only its password (a new API token must not restart the bus). With
redis.bundled.existingSecret the chart never reads the password: the checksum is of the Secret's name and key (another
Secret rolls Redis; a changed password in the same Secret is not seen by Helm: `kubectl rollout restart`). */}}
{{- define "vita.redisPasswordChecksum" -}}
{{- if .Values.redis.bundled.existingSecret -}}
{{- printf "existingSecret %s %s" .Values.redis.bundled.existingSecret (include "vita.redisPasswordKey" .) | sha256sum -}}
{{- else -}}
{{- include "vita.bundledRedisPassword" . | sha256sum -}}
{{- end -}}
{{- end -}}

{{- define "vita.apiTokensSecretName" -}}
{{- default (printf "%s-api-tokens" (include "vita.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The service processes ------------------------------------------------------------------------------------- */}}

{{/* Flags every service takes (services/vita/runtime/args.py); include "vita.commonArgs" $ */}}
{{- define "vita.commonArgs" -}}
- --host
- 0.0.0.0
- --grpc-port
- {{ int64 .Values.ports.grpc | quote }}
- --metrics-port
- {{ int64 .Values.ports.metrics | quote }}
- --prefix
- {{ .Values.bus.prefix | quote }}
- --reclaim-idle-ms
- {{ int64 .Values.bus.reclaimIdleMs | quote }}
- --backlog-limit
- {{ int64 .Values.bus.backlogLimit | quote }}
- --lease-ttl-s
- {{ .Values.bus.leaseTtlS | quote }}
- --log-level
- {{ .Values.logging.level }}
{{- if .Values.logging.plain }}
- --plain-logs
{{- end }}
{{- if .Values.otlp.endpoint }}
- --otlp-endpoint
- {{ .Values.otlp.endpoint | quote }}
{{- end }}
{{- if eq .Values.model.source "pvc" }}
- --model
- {{ .Values.model.mountPath | quote }}
{{- end }}
{{- end -}}

{{/* `vita serve ...` argv after the `vita` command: include "vita.args" (list $ "llm-generator") */}}
{{- define "vita.args" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $c := get (fromYaml (include "vita.components" $root)) $name -}}
{{- $v := get $root.Values $c.key -}}
- serve
- {{ $c.service }}
{{- if eq $name "orchestrator" }}
- --default-max-tokens
- {{ int64 $v.defaultMaxTokens | quote }}
- --encode-timeout
- {{ $v.encodeTimeout | quote }}
- --token-timeout
- {{ $v.tokenTimeout | quote }}
- --drain-delay-s
- {{ $v.drainDelaySeconds | quote }}
{{- if $root.Values.auth.enabled }}
- --api-tokens
- /etc/vita/auth/tokens
{{- end }}
{{- if $root.Values.tls.enabled }}
- --tls-cert
- /etc/vita/tls/tls.crt
- --tls-key
- /etc/vita/tls/tls.key
{{- if $root.Values.tls.mutual }}
- --tls-client-ca
- /etc/vita/tls/ca.crt
{{- end }}
- --health-port
- {{ int64 $root.Values.ports.health | quote }}
{{- end }}
{{- if $root.Values.auth.rateLimit }}
- --rate-limit
- {{ $root.Values.auth.rateLimit | quote }}
{{- end }}
{{- if $root.Values.auth.rateBurst }}
- --rate-burst
- {{ int64 $root.Values.auth.rateBurst | quote }}
{{- end }}
{{- if $root.Values.auth.maxSessionsPerToken }}
- --max-sessions-per-token
- {{ int64 $root.Values.auth.maxSessionsPerToken | quote }}
{{- end }}
{{- else if $c.role }}
- --role
- {{ $c.role }}
- --backend
- {{ $root.Values.llm.backend }}
- --max-batch
- {{ int64 $v.maxBatch | quote }}
{{- if $v.maxSeqLen }}
- --max-seq-len
- {{ int64 $v.maxSeqLen | quote }}
{{- end }}
{{- if eq $root.Values.llm.backend "torch" }}
- {{ ternary "--enable-chunked-prefill" "--no-enable-chunked-prefill" (ne $v.enableChunkedPrefill false) }}
- --max-num-batched-tokens
- {{ int64 $v.maxNumBatchedTokens | quote }}
- {{ ternary "--enable-prefix-caching" "--no-enable-prefix-caching" (ne $v.enablePrefixCaching false) }}
- {{ ternary "--engine-process" "--no-engine-process" (ne $v.engineProcess false) }}
- --device
- {{ $v.device | default "cpu" | quote }}
- --dtype
- {{ $v.dtype | default "auto" | quote }}
{{- if $v.enforceEager }}
- --enforce-eager
{{- end }}
{{- end }}
{{- if eq $root.Values.llm.backend "triton" }}
- --triton-url
- {{ printf "%s-triton:%v" (include "vita.fullname" $root) $root.Values.triton.ports.grpc | quote }}
- --triton-model
- {{ $root.Values.triton.model | quote }}
{{- end }}
{{- else }}
- --max-batch
- {{ int64 $v.maxBatch | quote }}
- --device
- {{ $v.device | quote }}
- --dtype
- {{ $v.dtype }}
{{- if $v.kserve.enabled }}
- --kserve-port
- {{ int64 $root.Values.ports.kserve | quote }}
{{- end }}
{{- end }}
{{- if and (hasKey $v "threads") $v.threads }}
- --threads
- {{ int64 $v.threads | quote }}
{{- end }}
{{ include "vita.commonArgs" $root }}
{{- range $v.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "vita.env" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: VITA_HOME
  value: /var/lib/vita
- name: HOME
  value: /var/lib/vita
- name: REDIS_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ include "vita.redisSecretName" . }}, key: {{ include "vita.redisPasswordKey" . | quote }}}}
{{- if eq (include "vita.bundledRedisExistingSecret" .) "true" }}
# The bundled Redis with the user's password Secret: the URL from REDIS_PASSWORD above (the kubelet expands
# $(REDIS_PASSWORD); `kubectl describe` shows the reference, not the password).
- name: VITA_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:%s/%s" (include "vita.redisHost" .) (include "vita.redisPort" .) (include "vita.redisDb" .) | quote }}
{{- else }}
- name: REDIS_USERNAME
  valueFrom: {secretKeyRef: {name: {{ include "vita.redisSecretName" . }}, key: redis-username, optional: true}}
- name: VITA_REDIS_URL
  valueFrom: {secretKeyRef: {name: {{ include "vita.redisSecretName" . }}, key: redis-url}}
{{- end }}
{{- if eq (include "vita.redisCluster" .) "true" }}
- name: VITA_REDIS_CLUSTER
  value: "1"
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ include "vita.otelAttributes" . | quote }}
{{- end -}}

{{- define "vita.otelAttributes" -}}
{{- $attrs := list "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.pod.name=$(POD_NAME)" -}}
{{- range $k, $v := .Values.otlp.resourceAttributes -}}
{{- $attrs = append $attrs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $attrs -}}
{{- end -}}

{{- define "vita.envFrom" -}}
{{- if or .Values.secretEnv .Values.existingSecretEnv }}
envFrom:
  - secretRef:
      name: {{ default (printf "%s-env" (include "vita.fullname" .)) .Values.existingSecretEnv }}
{{- end }}
{{- end -}}

{{/* The vita container of one component: include "vita.container" (list $ "llm-generator") */}}
{{- define "vita.container" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $c := get (fromYaml (include "vita.components" $root)) $name -}}
{{- $v := get $root.Values $c.key -}}
{{- $gpu := $v -}}
{{- if and $c.role (eq $root.Values.llm.backend "triton") -}}
{{- $gpu = omit $v "device" -}}{{- /* the workers then run no model on a device */ -}}
{{- end -}}
{{- include "vita.gpuCheck" (list $c.key $gpu $root) -}}
- name: {{ eq (include "vita.isKServe" .) "true" | ternary "kserve-container" $name }}
  image: {{ include "vita.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["vita"]
  args:
    {{- include "vita.args" . | nindent 4 }}
  env:
    {{- include "vita.env" $root | nindent 4 }}
  {{- include "vita.envFrom" $root | nindent 2 }}
  ports:
    - {name: grpc, containerPort: {{ $root.Values.ports.grpc }}, protocol: TCP}
    - {name: metrics, containerPort: {{ $root.Values.ports.metrics }}, protocol: TCP}
    {{- if and (hasKey $v "kserve") $v.kserve.enabled }}
    - {name: h2c, containerPort: {{ $root.Values.ports.kserve }}, protocol: TCP}
    {{- end }}
    {{- if and (eq $name "orchestrator") $root.Values.tls.enabled }}
    - {name: health, containerPort: {{ $root.Values.ports.health }}, protocol: TCP}
    {{- end }}
  # gRPC health (grpc.health.v1, services/vita/runtime/server.py and readiness.py): SERVING only once the model is
  # loaded, NOT_SERVING while draining. Startup and liveness ask "" (the process: a Redis outage must not restart
  # every pod); readiness asks `readiness`, which also follows the bus (NOT_SERVING while Redis does not answer).
  {{- $probePort := $root.Values.ports.grpc }}
  {{- if and (eq $name "orchestrator") $root.Values.tls.enabled }}
  {{- $probePort = $root.Values.ports.health }}
  {{- end }}
  startupProbe:
    grpc: {port: {{ $probePort }}}
    periodSeconds: {{ $v.startupProbe.periodSeconds }}
    failureThreshold: {{ $v.startupProbe.failureThreshold }}
  readinessProbe:
    grpc: {port: {{ $probePort }}, service: readiness}
    periodSeconds: 10
    failureThreshold: 2
  livenessProbe:
    grpc: {port: {{ $probePort }}}
    periodSeconds: 20
    timeoutSeconds: 5
    failureThreshold: 3
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - {name: tmp, mountPath: /tmp}
    - {name: vita-home, mountPath: /var/lib/vita}
    {{- if and (eq $name "orchestrator") $root.Values.auth.enabled }}
    - {name: api-tokens, mountPath: /etc/vita/auth, readOnly: true}
    {{- end }}
    {{- if and (eq $name "orchestrator") $root.Values.tls.enabled }}
    - {name: tls, mountPath: /etc/vita/tls, readOnly: true}
    {{- end }}
    {{- if eq $root.Values.model.source "pvc" }}
    - name: model
      mountPath: {{ $root.Values.model.mountPath }}
      readOnly: true
      {{- with $root.Values.model.pvc.subPath }}
      subPath: {{ . }}
      {{- end }}
    {{- end }}
{{- end -}}

{{/* Pod spec fields shared by Deployments and InferenceService predictors: include "vita.podFields" (list $ name) */}}
{{- define "vita.podFields" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $c := get (fromYaml (include "vita.components" $root)) $name -}}
{{- $v := get $root.Values $c.key -}}
serviceAccountName: {{ include "vita.serviceAccountName" $root }}
automountServiceAccountToken: false
terminationGracePeriodSeconds: 30
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "vita.scheduling" (list $root $name $v) }}
volumes:
  - name: tmp
    emptyDir: {sizeLimit: 1Gi}
  - name: vita-home
    emptyDir: {sizeLimit: 4Gi}
  {{- if and (eq $name "orchestrator") $root.Values.auth.enabled }}
  - name: api-tokens
    secret:
      secretName: {{ include "vita.apiTokensSecretName" $root }}
      defaultMode: 0440
      items: [{key: tokens, path: tokens}]
  {{- end }}
  {{- if and (eq $name "orchestrator") $root.Values.tls.enabled }}
  - name: tls
    secret:
      secretName: {{ $root.Values.tls.secretName }}
      defaultMode: 0440
  {{- end }}
  {{- if eq $root.Values.model.source "pvc" }}
  - name: model
    persistentVolumeClaim:
      claimName: {{ required "model.pvc.claimName is required when model.source is pvc" $root.Values.model.pvc.claimName }}
      readOnly: true
  {{- end }}
{{- end -}}

{{/* Where a pod runs: include "vita.scheduling" (list $ "component" $values) with $values the component's values
(nodeSelector, tolerations, affinity, topologySpreadConstraints, priorityClassName). A spread constraint without a
labelSelector gets the component's own selector labels (what it almost always means: spread this component's pods). */}}
{{- define "vita.scheduling" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $v := index . 2 -}}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- range . }}
  {{- $tsc := deepCopy . }}
  {{- if not (hasKey $tsc "labelSelector") }}
  {{- $_ := set $tsc "labelSelector" (dict "matchLabels" (fromYaml (include "vita.selectorLabels" (list $root $name)))) }}
  {{- end }}
  - {{- toYaml $tsc | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* A pod that asks for a GPU: `<key>.device: cuda...` needs a `nvidia.com/gpu` limit (without one the device plugin
gives the container no GPU and the service fails at start-up) and the CUDA image (the cpu variant's torch has no
CUDA). Extended resources also need requests equal to limits, which the API server checks only at apply time.
include "vita.gpuCheck" (list "audioEncoder" $values $root) */}}
{{- define "vita.gpuCheck" -}}
{{- $key := index . 0 -}}
{{- $v := index . 1 -}}
{{- $root := index . 2 -}}
{{- $limits := $v.resources.limits | default dict -}}
{{- $requests := $v.resources.requests | default dict -}}
{{- if and (hasKey $requests "nvidia.com/gpu") (hasKey $limits "nvidia.com/gpu") -}}
{{- if ne (toString (index $requests "nvidia.com/gpu")) (toString (index $limits "nvidia.com/gpu")) -}}
{{- fail (printf "%s.resources: requests and limits of nvidia.com/gpu differ (%v, %v); Kubernetes needs them equal" $key (index $requests "nvidia.com/gpu") (index $limits "nvidia.com/gpu")) -}}
{{- end -}}
{{- end -}}
{{- if and (hasKey $v "device") (hasPrefix "cuda" (toString $v.device)) -}}
{{- if not (index $limits "nvidia.com/gpu") -}}
{{- fail (printf "%s.device is %s but %s.resources.limits has no nvidia.com/gpu: the pod would get no GPU" $key $v.device $key) -}}
{{- end -}}
{{- if and (eq $root.Values.image.variant "cpu") (not $root.Values.image.tag) -}}
{{- fail (printf "%s.device is %s but image.variant is cpu (torch without CUDA): set image.variant: cuda" $key $v.device) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Whether a component runs as a KServe InferenceService rather than a Deployment. */}}
{{- define "vita.isKServe" -}}
{{- $root := index . 0 -}}
{{- $c := get (fromYaml (include "vita.components" $root)) (index . 1) -}}
{{- $v := get $root.Values $c.key -}}
{{- if and (hasKey $v "kserve") $v.kserve.enabled -}}true{{- end -}}
{{- end -}}

{{/* The workload KEDA / the HPA scale: the Deployment, or the Deployment KServe makes for the predictor. */}}
{{- define "vita.scaleTargetName" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- if include "vita.isKServe" . -}}
{{- printf "%s-%s-predictor" (include "vita.fullname" $root) $name -}}
{{- else -}}
{{- printf "%s-%s" (include "vita.fullname" $root) $name -}}
{{- end -}}
{{- end -}}
