{{/*
facefleet.workerPod: the pod template of a tier's workers, shared by the Deployment and the
ScaledJob. Call with (dict "root" $ "name" "<tier>" "tier" <tier map>).

- the init container pulls the model weights into the model volume (read-write there only);
- the worker mounts that volume read-only and is Ready only after models are loaded and warmed
  (/readyz); /healthz is liveness, guarded by a startup probe during model load;
- terminationGracePeriodSeconds comes from the tier's maxJobSeconds (facefleet.gracePeriod) so a
  SIGTERM drain finishes;
- `args`, not `command`: the image's ENTRYPOINT (tini) stays PID 1 and forwards SIGTERM;
- the data volume holds job state (FACEFLEET_DATA_ROOT) with the file store and media with file
  media; with the PostgreSQL store (FACEFLEET_STORE_URL from its Secret) and s3 media the pod
  mounts none (facefleet.dataVolume). With s3 media inputs are downloaded to, and results staged
  in, a size-limited scratch emptyDir.
- TensorRT (only when executionProviders lists tensorrt, facefleet.tensorrt): its engine and
  timing caches go to a read-write volume at /trt-cache (tiers.<tier>.tensorrt.cache: emptyDir,
  hostPath or an existing PVC), FACEFLEET_TRT_CACHE_DIR; the read-only model volume cannot hold
  them.
*/}}
{{- define "facefleet.workerPod" -}}
{{- $root := .root -}}
{{- $t := .tier -}}
{{- $grace := include "facefleet.gracePeriod" (dict "root" $root "tier" $t) | int -}}
{{- $isJob := eq $t.mode "job" -}}
{{- $s3 := include "facefleet.mediaS3" $root -}}
{{- $data := include "facefleet.dataVolume" $root -}}
{{- $fetch := $root.Values.workers.fetch -}}
{{- $trt := include "facefleet.tensorrt" $t -}}
metadata:
  labels:
    {{- include "facefleet.labels" (dict "root" $root "component" "worker" "tier" .name) | nindent 4 }}
  {{- $ann := deepCopy $root.Values.workers.podAnnotations }}
  {{- if $root.Values.secrets.create }}
  {{- $_ := set $ann "checksum/secret" (include (print $root.Template.BasePath "/common/secret.yaml") $root | sha256sum) }}
  {{- end }}
  {{- with $ann }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "facefleet.workerServiceAccount" $root }}
  # The token is only needed to set pod-deletion-cost on the worker's own pod.
  automountServiceAccountToken: {{ and $t.podDeletionCost $root.Values.rbac.create }}
  {{- if $isJob }}
  restartPolicy: Never
  {{- end }}
  terminationGracePeriodSeconds: {{ $grace }}
  {{- with $t.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  enableServiceLinks: false
  securityContext:
    {{- include "facefleet.podSecurityContext" $root | nindent 4 }}
  {{- with $root.Values.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- with $t.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $t.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $t.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  initContainers:
    - name: models-pull
      image: {{ include "facefleet.image" (dict "root" $root "image" $root.Values.image.consumer) }}
      imagePullPolicy: {{ $root.Values.image.consumer.pullPolicy }}
      args:
        - facefleet
        - models
        - pull
        - --catalog
        - {{ $root.Values.models.catalog }}
        - --dest
        - /models
        {{- with $root.Values.models.baseUrl }}
        - --base-url
        - {{ . }}
        {{- end }}
      env:
        - name: FACEFLEET_LOG_LEVEL
          value: {{ $root.Values.workers.logLevel | quote }}
      securityContext:
        {{- include "facefleet.containerSecurityContext" $root | nindent 8 }}
      resources:
        {{- toYaml $root.Values.models.pullResources | nindent 8 }}
      volumeMounts:
        - name: models
          mountPath: /models
        - name: tmp
          mountPath: /tmp
  containers:
    - name: worker
      image: {{ include "facefleet.image" (dict "root" $root "image" $root.Values.image.consumer) }}
      imagePullPolicy: {{ $root.Values.image.consumer.pullPolicy }}
      args:
        - facefleet
        - worker
        - --tier
        - {{ .name }}
        - --processor
        - {{ $t.processor }}
        - --backend
        - {{ $t.backend }}
      env:
        {{- include "facefleet.secretEnv" (dict "root" $root "name" "AMQP_URL" "key" $root.Values.secrets.keys.amqpUrl) | nindent 8 }}
        {{- if $data }}
        - name: FACEFLEET_DATA_ROOT
          value: {{ $root.Values.data.mountPath | quote }}
        {{- end }}
        {{- with include "facefleet.storeEnv" $root }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with include "facefleet.mediaEnv" $root }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- if $s3 }}
        - name: FACEFLEET_SCRATCH_DIR
          value: /scratch
        {{- end }}
        {{- with $fetch.allow }}
        - name: FACEFLEET_FETCH_ALLOW
          value: {{ join "," . | quote }}
        {{- end }}
        {{- if not (kindIs "invalid" $fetch.connectTimeoutSeconds) }}
        - name: FACEFLEET_FETCH_CONNECT_TIMEOUT_S
          value: {{ $fetch.connectTimeoutSeconds | toString | quote }}
        {{- end }}
        {{- if not (kindIs "invalid" $fetch.readTimeoutSeconds) }}
        - name: FACEFLEET_FETCH_READ_TIMEOUT_S
          value: {{ $fetch.readTimeoutSeconds | toString | quote }}
        {{- end }}
        {{- if not (kindIs "invalid" $fetch.maxRedirects) }}
        - name: FACEFLEET_FETCH_MAX_REDIRECTS
          value: {{ $fetch.maxRedirects | toString | quote }}
        {{- end }}
        - name: FACEFLEET_MODEL_DIR
          value: /models
        - name: FACEFLEET_TIERS
          value: {{ include "facefleet.tiersJson" $root | quote }}
        - name: FACEFLEET_CONCURRENCY
          value: {{ $t.prefetch | quote }}
        - name: FACEFLEET_BATCH
          value: {{ $t.batch | quote }}
        # Keeping the GPU busy: jobs in flight per slot (AMQP prefetch = concurrency x depth x
        # batch), sessions per model, dynamic batching across jobs.
        - name: FACEFLEET_PIPELINE_DEPTH
          value: {{ $t.pipelineDepth | quote }}
        - name: FACEFLEET_INSTANCES
          value: {{ $t.instances | quote }}
        - name: FACEFLEET_DYNAMIC_BATCH
          value: {{ $t.dynamicBatch | quote }}
        - name: FACEFLEET_BATCH_DELAY_MS
          value: {{ $t.batchDelayMs | toString | quote }}
        - name: FACEFLEET_DRAIN_TIMEOUT_S
          value: {{ include "facefleet.drainTimeout" (dict "root" $root "tier" $t) | quote }}
        - name: FACEFLEET_HEALTH_HOST
          value: 0.0.0.0
        - name: FACEFLEET_HEALTH_PORT
          value: "9464"
        - name: FACEFLEET_EXECUTION_PROVIDERS
          value: {{ $t.executionProviders | quote }}
        {{- if $trt }}
        - name: FACEFLEET_TRT_FP16
          value: {{ $t.tensorrt.fp16 | quote }}
        - name: FACEFLEET_TRT_CACHE_DIR
          value: /trt-cache
        {{- end }}
        - name: FACEFLEET_DEVICE_ID
          value: {{ $t.deviceId | quote }}
        - name: FACEFLEET_DELETION_COST
          value: {{ and $t.podDeletionCost $root.Values.rbac.create | quote }}
        - name: FACEFLEET_LOG_LEVEL
          value: {{ $root.Values.workers.logLevel | quote }}
        {{- if $isJob }}
        # ScaledJob mode: each Job handles jobsPerReplica jobs (the trigger's target) and exits;
        # it also exits when idle, e.g. if another Job took the message it was started for.
        - name: FACEFLEET_MAX_JOBS
          value: {{ $t.scaling.jobsPerReplica | quote }}
        - name: FACEFLEET_IDLE_EXIT_S
          value: {{ $t.scaledJob.idleExitSeconds | quote }}
        {{- end }}
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
      ports:
        - name: metrics
          containerPort: 9464
          protocol: TCP
      startupProbe:
        httpGet:
          path: /healthz
          port: metrics
        periodSeconds: 5
        failureThreshold: {{ div (add (int $root.Values.workers.startupTimeoutSeconds) 4) 5 }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        periodSeconds: 15
        timeoutSeconds: 5
        failureThreshold: 4
      readinessProbe:
        # Ready only once the models are loaded and a warm-up inference ran.
        httpGet:
          path: /readyz
          port: metrics
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: 2
      securityContext:
        {{- include "facefleet.containerSecurityContext" $root | nindent 8 }}
      resources:
        requests:
          {{- with $t.resources.requests }}{{ toYaml . | nindent 10 }}{{ end }}
          {{- if gt (int $t.gpu.count) 0 }}
          {{ $t.gpu.resource }}: {{ $t.gpu.count }}
          {{- end }}
        limits:
          {{- with $t.resources.limits }}{{ toYaml . | nindent 10 }}{{ end }}
          {{- if gt (int $t.gpu.count) 0 }}
          {{ $t.gpu.resource }}: {{ $t.gpu.count }}
          {{- end }}
      volumeMounts:
        - name: models
          mountPath: /models
          readOnly: true
        {{- if $data }}
        - name: data
          mountPath: {{ $root.Values.data.mountPath }}
        {{- end }}
        - name: tmp
          mountPath: /tmp
        {{- if $s3 }}
        - name: scratch
          mountPath: /scratch
        {{- end }}
        {{- if $trt }}
        - name: trt-cache
          mountPath: /trt-cache
        {{- end }}
  volumes:
    - name: models
      {{- if eq $root.Values.models.volume.type "pvc" }}
      persistentVolumeClaim:
        claimName: {{ include "facefleet.modelClaim" $root }}
      {{- else if eq $root.Values.models.volume.type "hostPath" }}
      hostPath:
        path: {{ $root.Values.models.volume.hostPath }}
        type: Directory
      {{- else }}
      emptyDir:
        sizeLimit: {{ $root.Values.models.volume.emptyDirSizeLimit }}
      {{- end }}
    {{- if $data }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ include "facefleet.dataClaim" $root }}
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 2Gi
    {{- if $s3 }}
    - name: scratch
      emptyDir:
        sizeLimit: {{ $root.Values.workers.scratch.sizeLimit }}
    {{- end }}
    {{- if $trt }}
    {{- $cache := $t.tensorrt.cache }}
    - name: trt-cache
      {{- if eq $cache.type "pvc" }}
      persistentVolumeClaim:
        claimName: {{ $cache.existingClaim }}
      {{- else if eq $cache.type "hostPath" }}
      hostPath:
        path: {{ $cache.hostPath }}
        type: Directory
      {{- else }}
      emptyDir:
        sizeLimit: {{ $cache.emptyDirSizeLimit }}
      {{- end }}
    {{- end }}
{{- end -}}
