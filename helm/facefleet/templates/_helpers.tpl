{{/*
facefleet.name: the chart name, or nameOverride.
*/}}
{{- define "facefleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 30 | trimSuffix "-" -}}
{{- end -}}

{{/*
facefleet.fullname: the release-aware prefix of every resource name.
Truncated to 30 characters (not the usual 63): the longest derived name is the HPA KEDA creates,
"keda-hpa-" (9) + "<fullname>-worker-" (fullname + 8) + tier, which must stay within 63. That
leaves 16 characters for a tier name; longer ones are reported by facefleet.validateValues.
*/}}
{{- define "facefleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 30 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
facefleet.chart: chart name and version for the helm.sh/chart label.
*/}}
{{- define "facefleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
facefleet.labels: common labels of every object. Call with (dict "root" $ "component" "worker").
*/}}
{{- define "facefleet.labels" -}}
helm.sh/chart: {{ include "facefleet.chart" .root }}
{{ include "facefleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: facefleet
{{- end -}}

{{/*
facefleet.selectorLabels: immutable selector labels. Call with (dict "root" $ "component" "worker"
"tier" "high"); tier is optional.
*/}}
{{- define "facefleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "facefleet.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- with .tier }}
facefleet.io/tier: {{ . }}
{{- end }}
{{- end -}}

{{/*
facefleet.workerName: name of a tier's Deployment, ScaledObject or ScaledJob.
Call with (dict "root" $ "tier" "high").
*/}}
{{- define "facefleet.workerName" -}}
{{- printf "%s-worker-%s" (include "facefleet.fullname" .root) .tier -}}
{{- end -}}

{{/*
facefleet.image: "repository@digest" when a digest is pinned, else "repository:tag" (the tag
defaults to the appVersion). Call with (dict "root" $ "image" .Values.image.consumer).
*/}}
{{- define "facefleet.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
facefleet.secretName: the Secret with AMQP URL, management credentials and gateway secrets.
*/}}
{{- define "facefleet.secretName" -}}
{{- default (include "facefleet.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/*
facefleet.dataClaim: the data PVC's name.
*/}}
{{- define "facefleet.dataClaim" -}}
{{- default (printf "%s-data" (include "facefleet.fullname" .)) .Values.data.existingClaim -}}
{{- end -}}

{{/*
facefleet.modelClaim: the model PVC's name (models.volume.type pvc).
*/}}
{{- define "facefleet.modelClaim" -}}
{{- default (printf "%s-models" (include "facefleet.fullname" .)) .Values.models.volume.existingClaim -}}
{{- end -}}

{{/*
facefleet.workerServiceAccount: the workers' ServiceAccount.
*/}}
{{- define "facefleet.workerServiceAccount" -}}
{{- printf "%s-worker" (include "facefleet.fullname" .) -}}
{{- end -}}

{{/*
facefleet.enabledTiers: sorted names of the enabled tiers, as a JSON list (templates cannot
return lists; use `include ... | fromJsonArray`).
*/}}
{{- define "facefleet.enabledTiers" -}}
{{- $names := list -}}
{{- range $name := keys .Values.tiers | sortAlpha -}}
{{- if (index $.Values.tiers $name).enabled -}}
{{- $names = append $names $name -}}
{{- end -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{/*
facefleet.gracePeriod: a tier's terminationGracePeriodSeconds: the explicit value, or
maxJobSeconds + workers.drainMarginSeconds + 15. The worker's drain timeout is the grace minus
the margin (FACEFLEET_DRAIN_TIMEOUT_S), so the derived one is always maxJobSeconds + 15: the
longest job fits whatever the margin, with 15 s to ack it. _validate.tpl checks the result (an
explicit value included). Call with (dict "root" $ "tier" <tier map>).
*/}}
{{- define "facefleet.gracePeriod" -}}
{{- $t := .tier -}}
{{- if kindIs "invalid" $t.terminationGracePeriodSeconds -}}
{{- add (int $t.maxJobSeconds) (int .root.Values.workers.drainMarginSeconds) 15 -}}
{{- else -}}
{{- int $t.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/*
facefleet.drainTimeout: FACEFLEET_DRAIN_TIMEOUT_S of a tier's workers: the grace period minus
workers.drainMarginSeconds, so the worker gives up and exits by itself before the kubelet's
SIGKILL. Call with (dict "root" $ "tier" <tier map>).
*/}}
{{- define "facefleet.drainTimeout" -}}
{{- sub (include "facefleet.gracePeriod" . | int) (int .root.Values.workers.drainMarginSeconds) -}}
{{- end -}}

{{/*
facefleet.tensorrt: "true" when a tier's executionProviders lists tensorrt (the worker then tries
TensorRT first, and the chart mounts its cache volume and sets FACEFLEET_TRT_*), else empty.
Call with the tier map.
*/}}
{{- define "facefleet.tensorrt" -}}
{{- if has "tensorrt" (splitList "," (lower (nospace (toString .executionProviders)))) -}}true{{- end -}}
{{- end -}}

{{/*
facefleet.tiersJson: FACEFLEET_TIERS, the one description of all enabled tiers that workers,
gateway and CLI read (facefleet.settings.CommonSettings.tiers): a JSON list of
{"name", "max_job_s", "max_length", "delivery_limit"}. Keep it the only place that builds it.
*/}}
{{- define "facefleet.tiersJson" -}}
{{- $out := list -}}
{{- range $name := include "facefleet.enabledTiers" . | fromJsonArray -}}
{{- $t := index $.Values.tiers $name -}}
{{- $out = append $out (dict "name" $name "max_job_s" (int $t.maxJobSeconds) "max_length" (int $t.maxLength) "delivery_limit" (int $t.deliveryLimit)) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
facefleet.testTier: tier of the helm test job: tests.tier, else the first enabled tier that keeps
a replica running (minReplicas > 0), else the first enabled tier.
*/}}
{{- define "facefleet.testTier" -}}
{{- $enabled := include "facefleet.enabledTiers" . | fromJsonArray -}}
{{- $pick := "" -}}
{{- range $name := $enabled -}}
{{- if and (not $pick) (gt (int (index $.Values.tiers $name).scaling.minReplicas) 0) -}}
{{- $pick = $name -}}
{{- end -}}
{{- end -}}
{{- default (default (first $enabled) $pick) .Values.tests.tier -}}
{{- end -}}

{{/*
facefleet.podSecurityContext / facefleet.containerSecurityContext: non-root, read-only root
filesystem, no privilege escalation, no capabilities, RuntimeDefault seccomp. UID/GID 10001 is
the `app` user of both images (consumer/Dockerfile, producer/Dockerfile).
*/}}
{{- define "facefleet.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "facefleet.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
facefleet.secretEnv: an env entry read from the chart's Secret.
Call with (dict "root" $ "name" "AMQP_URL" "key" .Values.secrets.keys.amqpUrl).
*/}}
{{- define "facefleet.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "facefleet.secretName" .root }}
      key: {{ .key }}
{{- end -}}

{{/*
facefleet.mediaS3: "true" when storage.media.url is an s3:// URL (media in an object store), else
empty. With s3 media the gateway and the test pod mount no data volume and get no
FACEFLEET_DATA_ROOT; workers keep the volume for job state (journals) unless store.backend is
postgres (facefleet.dataVolume), and download inputs into their scratch emptyDir.
*/}}
{{- define "facefleet.mediaS3" -}}
{{- if hasPrefix "s3://" .Values.storage.media.url -}}true{{- end -}}
{{- end -}}

{{/*
facefleet.mediaRoot: the media store as the processes see it: storage.media.url without a
trailing "/", or file://<data.mountPath> when it is empty (the processes' own default).
*/}}
{{- define "facefleet.mediaRoot" -}}
{{- if .Values.storage.media.url -}}
{{- trimSuffix "/" .Values.storage.media.url -}}
{{- else -}}
{{- printf "file://%s" (trimSuffix "/" .Values.data.mountPath) -}}
{{- end -}}
{{- end -}}

{{/*
facefleet.testUri: tests.source or tests.target, default <media root>/samples/helm-test/<key>.jpg.
Call with (dict "root" $ "key" "source").
*/}}
{{- define "facefleet.testUri" -}}
{{- $set := index .root.Values.tests .key -}}
{{- default (printf "%s/samples/helm-test/%s.jpg" (include "facefleet.mediaRoot" .root) .key) $set -}}
{{- end -}}

{{/*
facefleet.mediaEnv: FACEFLEET_MEDIA_URL and, with s3 media, the standard AWS settings boto3 reads
(endpoint, region, an access key pair through secretKeyRef only) for every process that touches
media: gateway, workers, test pod. Empty with an empty storage.media.url (file media on the data
volume, the processes' default), so include it with `with`.
*/}}
{{- define "facefleet.mediaEnv" -}}
{{- $m := .Values.storage.media -}}
{{- if $m.url -}}
- name: FACEFLEET_MEDIA_URL
  value: {{ $m.url | quote }}
{{- if include "facefleet.mediaS3" . }}
{{- with $m.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $m.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $m.credentials.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $m.credentials.keys.accessKeyId }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $m.credentials.keys.secretAccessKey }}
{{- end }}
{{- end }}
{{- end -}}
{{- end -}}

{{/*
facefleet.storePostgres: "true" when job state lives in PostgreSQL (store.backend postgres), else
empty (the file store: journals under FACEFLEET_DATA_ROOT on the data volume).
*/}}
{{- define "facefleet.storePostgres" -}}
{{- if eq .Values.store.backend "postgres" -}}true{{- end -}}
{{- end -}}

{{/*
facefleet.dataVolume: "true" when anything needs the ReadWriteMany data volume, else empty. It
holds job state with the file store and media with file media; with the PostgreSQL store and s3
media nothing does: no data PVC is rendered and no pod mounts one or gets FACEFLEET_DATA_ROOT.
*/}}
{{- define "facefleet.dataVolume" -}}
{{- if not (and (include "facefleet.storePostgres" .) (include "facefleet.mediaS3" .)) -}}true{{- end -}}
{{- end -}}

{{/*
facefleet.storeEnv: FACEFLEET_STORE_URL from store.existingSecret (secretKeyRef only: the URL
carries the database password) with the PostgreSQL store; empty with the file store (the processes
default to the journals under FACEFLEET_DATA_ROOT), so include it with `with`.
*/}}
{{- define "facefleet.storeEnv" -}}
{{- if include "facefleet.storePostgres" . -}}
- name: FACEFLEET_STORE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.store.existingSecret }}
      key: {{ .Values.store.urlKey }}
{{- end -}}
{{- end -}}

{{/*
facefleet.webhooksName / facefleet.migrateName: names of the webhooks Deployment (and its
ServiceAccount, PDB, NetworkPolicy, metrics Service) and of the migration hook Job (and its
ServiceAccount).
*/}}
{{- define "facefleet.webhooksName" -}}
{{- printf "%s-webhooks" (include "facefleet.fullname" .) -}}
{{- end -}}

{{- define "facefleet.migrateName" -}}
{{- printf "%s-store-migrate" (include "facefleet.fullname" .) -}}
{{- end -}}

{{/*
facefleet.scalerEnabled: "true" when the scaler runs (scaler.enabled, or null and an enabled
tier's scaling.trigger is not queueLength), else empty.
facefleet.scalerName: the `facefleet scaler` Deployment (and its Service, ServiceAccount,
NetworkPolicy, TLS TriggerAuthentication). facefleet.scalerAddress: what KEDA dials, the
Service's in-cluster name (the KEDA operator runs in another namespace), host:port.
*/}}
{{- define "facefleet.scalerName" -}}
{{- printf "%s-scaler" (include "facefleet.fullname" .) -}}
{{- end -}}

{{- define "facefleet.scalerEnabled" -}}
{{- $on := .Values.scaler.enabled -}}
{{- if kindIs "invalid" $on -}}
{{- range $name := include "facefleet.enabledTiers" . | fromJsonArray -}}
{{- if ne ((index $.Values.tiers $name).scaling.trigger | default "queueLength") "queueLength" -}}
{{- $on = true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $on -}}true{{- end -}}
{{- end -}}

{{- define "facefleet.scalerAddress" -}}
{{- printf "%s.%s.svc:%d" (include "facefleet.scalerName" .) .Release.Namespace (int .Values.scaler.port) -}}
{{- end -}}
