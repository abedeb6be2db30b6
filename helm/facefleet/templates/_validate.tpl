{{/*
facefleet.validateValues: cross-field rules that values.schema.json cannot express. Collects every
problem and fails once; each message names the value, says why it is wrong and how to fix it.
Included by templates/validation.yaml, so `helm template`, `helm lint` and `helm upgrade` all
stop before anything reaches the cluster.
*/}}
{{- define "facefleet.validateValues" -}}
{{- $msgs := list -}}
{{- $enabled := include "facefleet.enabledTiers" . | fromJsonArray -}}
{{- if not $enabled -}}
{{- $msgs = append $msgs "tiers: no tier is enabled. Enable one, e.g. --set tiers.standard.enabled=true" -}}
{{- end -}}
{{- range $name := $enabled -}}
{{- $t := index $.Values.tiers $name -}}
{{- $s := $t.scaling -}}
{{- $p := printf "tiers.%s" $name -}}
{{- $min := int $s.minReplicas -}}
{{- $max := int $s.maxReplicas -}}
{{- if gt $min $max -}}
{{- $msgs = append $msgs (printf "%s.scaling.minReplicas (%d) is above %s.scaling.maxReplicas (%d); KEDA rejects it (min <= max). Fix: --set %s.scaling.maxReplicas=%d or lower minReplicas" $p $min $p $max $p $min) -}}
{{- end -}}
{{- if ge (float64 $s.activationJobs) (float64 $s.jobsPerReplica) -}}
{{- $msgs = append $msgs (printf "%s.scaling.activationJobs (%v) must be below %s.scaling.jobsPerReplica (%v): activation wins over the target, so a tier with that many jobs would stay at zero. Fix: --set %s.scaling.activationJobs=0" $p $s.activationJobs $p $s.jobsPerReplica $p) -}}
{{- end -}}
{{- /* The worker's AMQP prefetch: concurrency x pipeline depth x batch (consumer/worker.py). */ -}}
{{- $held := mul (int $t.prefetch) (int (default 1 $t.pipelineDepth)) (int $t.batch) -}}
{{- if lt (float64 $s.jobsPerReplica) (float64 $held) -}}
{{- $msgs = append $msgs (printf "%s.scaling.jobsPerReplica (%v) is below %s.prefetch x %s.pipelineDepth x %s.batch (%d): each busy worker holds that many unacked jobs (its AMQP prefetch), which the trigger counts, so the HPA would keep pods that get no work. Fix: --set %s.scaling.jobsPerReplica=%d" $p $s.jobsPerReplica $p $p $p $held $p $held) -}}
{{- end -}}
{{- /* Grace period >= max job time, checked on the rendered values (derived or hand-set): the
worker's drain timeout, grace - drainMarginSeconds, must cover the longest job and be positive. */ -}}
{{- $margin := int $.Values.workers.drainMarginSeconds -}}
{{- $grace := include "facefleet.gracePeriod" (dict "root" $ "tier" $t) | int -}}
{{- $drain := include "facefleet.drainTimeout" (dict "root" $ "tier" $t) | int -}}
{{- $maxJob := int $t.maxJobSeconds -}}
{{- if or (lt $drain $maxJob) (le $drain 0) -}}
{{- $derived := kindIs "invalid" $t.terminationGracePeriodSeconds -}}
{{- $why := ternary (printf "below %s.maxJobSeconds (%d)" $p $maxJob) "not above 0" (lt $drain $maxJob) -}}
{{- $fix := printf "--set %s.terminationGracePeriodSeconds=%d (at least maxJobSeconds + workers.drainMarginSeconds), or null to derive maxJobSeconds + drainMarginSeconds + 15" $p (add (max $maxJob 1) $margin) -}}
{{- if $derived -}}
{{- $fix = printf "--set %s.maxJobSeconds to the longest job time (at least 1 s)" $p -}}
{{- end -}}
{{- $msgs = append $msgs (printf "%s.terminationGracePeriodSeconds (%d%s) minus workers.drainMarginSeconds (%d) leaves a drain timeout (FACEFLEET_DRAIN_TIMEOUT_S) of %d s, %s: a draining worker would be stopped mid-job. Fix: %s" $p $grace (ternary ", derived" "" $derived) $margin $drain $why $fix) -}}
{{- end -}}
{{- $long := printf "%s-worker-%s" (include "facefleet.fullname" $) $name -}}
{{- if gt (len $long) 54 -}}
{{- $msgs = append $msgs (printf "tiers.%s: the workload name %q is %d characters; KEDA's HPA name keda-hpa-<name> must fit 63, so at most 54. Fix: a shorter tier name or --set fullnameOverride=<short>" $name $long (len $long)) -}}
{{- end -}}
{{- if eq $t.mode "job" -}}
{{- if not (kindIs "invalid" $s.idleReplicas) -}}
{{- $msgs = append $msgs (printf "%s.scaling.idleReplicas is set but %s.mode is job: ScaledJobs have no idle replica count. Fix: --set %s.scaling.idleReplicas=null" $p $p $p) -}}
{{- end -}}
{{- $strategy := $t.scaledJob.scalingStrategy -}}
{{- if has $strategy (list "accurate" "eager") -}}
{{- $msgs = append $msgs (printf "%s.scaledJob.scalingStrategy=%s: the trigger counts unacknowledged jobs, which already include the ones running Jobs hold, so %s would start a new Job for every busy one on each poll. Fix: --set %s.scaledJob.scalingStrategy=default" $p $strategy $strategy $p) -}}
{{- end -}}
{{- if and (eq $strategy "custom") (kindIs "invalid" $t.scaledJob.customScalingQueueLengthDeduction) (kindIs "invalid" $t.scaledJob.customScalingRunningJobPercentage) -}}
{{- $msgs = append $msgs (printf "%s.scaledJob.scalingStrategy=custom needs customScalingQueueLengthDeduction or customScalingRunningJobPercentage. Fix: --set %s.scaledJob.customScalingRunningJobPercentage=1" $p $p) -}}
{{- end -}}
{{- else -}}
{{- if not (kindIs "invalid" $s.idleReplicas) -}}
{{- if lt $min 1 -}}
{{- $msgs = append $msgs (printf "%s.scaling.idleReplicas (%v) needs %s.scaling.minReplicas >= 1 (KEDA: idleReplicaCount < minReplicaCount). Fix: --set %s.scaling.minReplicas=1 or idleReplicas=null" $p $s.idleReplicas $p $p) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* Scaling trigger: queueLength is KEDA's own; the others are served by `facefleet scaler`
(keda/scaling.py TRIGGERS). Checked here too so --skip-schema-validation cannot let them by. */ -}}
{{- $trigger := $s.trigger | default "queueLength" -}}
{{- if not (has $trigger (list "queueLength" "work" "latency" "predictive")) -}}
{{- $msgs = append $msgs (printf "%s.scaling.trigger=%v is not a scaling trigger: use queueLength (KEDA's rabbitmq trigger, the default) or work, latency, predictive (facefleet scaler). Fix: --set %s.scaling.trigger=work, or --set %s.scaling.trigger=queueLength" $p $trigger $p $p) -}}
{{- else if ne $trigger "queueLength" -}}
{{- if eq $t.mode "job" -}}
{{- $msgs = append $msgs (printf "%s.scaling.trigger=%s but %s.mode is job: a ScaledJob starts one Job per jobsPerReplica jobs, which only queueLength counts. Fix: --set %s.scaling.trigger=queueLength, or --set %s.mode=deployment" $p $trigger $p $p $p) -}}
{{- end -}}
{{- if not (include "facefleet.scalerEnabled" $) -}}
{{- $msgs = append $msgs (printf "%s.scaling.trigger=%s needs facefleet scaler, but scaler.enabled is false: KEDA would dial a scaler that does not exist and the tier would never scale. Fix: --set scaler.enabled=null (runs it when a tier needs it) or true, or --set %s.scaling.trigger=queueLength" $p $trigger $p) -}}
{{- end -}}
{{- if or (kindIs "invalid" $s.waitObjectiveSeconds) (le (float64 $s.waitObjectiveSeconds) 0.0) -}}
{{- $msgs = append $msgs (printf "%s.scaling.waitObjectiveSeconds (%v) must be above 0: it is the scaler's target per replica (trigger %s). Fix: --set %s.scaling.waitObjectiveSeconds=60" $p $s.waitObjectiveSeconds $trigger $p) -}}
{{- end -}}
{{- if and (eq $trigger "predictive") (or (kindIs "invalid" $s.startupSeconds) (le (float64 $s.startupSeconds) 0.0)) -}}
{{- $msgs = append $msgs (printf "%s.scaling.startupSeconds (%v) must be above 0: predictive adds the work forecast to arrive within it. Fix: --set %s.scaling.startupSeconds=90 (your pods' start-up time)" $p $s.startupSeconds $p) -}}
{{- end -}}
{{- end -}}
{{- /* TensorRT: its settings apply only with tensorrt in executionProviders (as the worker reads
them); a pvc cache needs the claim. */ -}}
{{- with $t.tensorrt -}}
{{- if include "facefleet.tensorrt" $t -}}
{{- if and (eq .cache.type "pvc") (not .cache.existingClaim) -}}
{{- $msgs = append $msgs (printf "%s.tensorrt.cache.type=pvc needs %s.tensorrt.cache.existingClaim: a ReadWriteMany PVC you create for the TensorRT caches (the chart creates none). Fix: --set %s.tensorrt.cache.existingClaim=<pvc>, or --set %s.tensorrt.cache.type=emptyDir" $p $p $p $p) -}}
{{- end -}}
{{- else -}}
{{- $unused := list -}}
{{- if .fp16 -}}
{{- $unused = append $unused (printf "%s.tensorrt.fp16=true" $p) -}}
{{- end -}}
{{- if ne .cache.type "emptyDir" -}}
{{- $unused = append $unused (printf "%s.tensorrt.cache.type=%s" $p .cache.type) -}}
{{- end -}}
{{- if $unused -}}
{{- $msgs = append $msgs (printf "%s: TensorRT is not in %s.executionProviders (%s), so the worker never uses it and no cache volume is mounted; the setting would be ignored. Fix: --set %s.executionProviders=tensorrt\\,cuda\\,cpu (an image built with TENSORRT=1), or back to the default: --set %s.tensorrt.fp16=false --set %s.tensorrt.cache.type=emptyDir" (join ", " $unused) $p $t.executionProviders $p $p $p) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $t.podDeletionCost (not $.Values.rbac.create) -}}
{{- $msgs = append $msgs (printf "%s.podDeletionCost is true but rbac.create is false: the worker could not patch its pod. Fix: --set rbac.create=true or --set %s.podDeletionCost=false" $p $p) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.scaler.tls.clientSecretName (not .Values.scaler.tls.secretName) -}}
{{- $msgs = append $msgs (printf "scaler.tls.clientSecretName (%s) is set without scaler.tls.secretName: mutual TLS needs the server's certificate and CA first. Fix: --set scaler.tls.secretName=<kubernetes.io/tls Secret with tls.crt, tls.key, ca.crt>, or --set scaler.tls.clientSecretName=" .Values.scaler.tls.clientSecretName) -}}
{{- end -}}
{{- if and .Values.secrets.create .Values.secrets.existingSecret -}}
{{- $msgs = append $msgs "secrets.create is true and secrets.existingSecret is set: choose one. Fix: --set secrets.create=false to use your Secret" -}}
{{- end -}}
{{- if and .Values.secrets.create (not .Values.secrets.existingSecret) -}}
{{- range $key := list "amqpUrl" "rabbitmqUsername" "rabbitmqPassword" -}}
{{- if not (index $.Values.secrets.values $key) -}}
{{- $msgs = append $msgs (printf "secrets.values.%s is empty but secrets.create is true. Fix: --set-string secrets.values.%s=... (or create the Secret yourself and set secrets.existingSecret)" $key $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.gateway.enabled .Values.gateway.ingress.enabled (not .Values.gateway.ingress.host) -}}
{{- $msgs = append $msgs "gateway.ingress.enabled is true but gateway.ingress.host is empty. Fix: --set gateway.ingress.host=facefleet.example.com" -}}
{{- end -}}
{{- if and .Values.tests.tier (not (has .Values.tests.tier $enabled)) -}}
{{- $msgs = append $msgs (printf "tests.tier=%s is not an enabled tier (%s). Fix: --set tests.tier=%s or leave it empty" .Values.tests.tier (join ", " $enabled) (default "" (first $enabled))) -}}
{{- end -}}
{{- /* Media store (storage.media): the URL is checked as the processes check it
(facefleet.media.open_media_store), so a typo stops the render instead of crash-looping every pod. */ -}}
{{- $m := .Values.storage.media -}}
{{- $url := $m.url -}}
{{- $s3 := include "facefleet.mediaS3" . -}}
{{- $mount := trimSuffix "/" .Values.data.mountPath -}}
{{- $mediaOk := true -}}
{{- /* Never echo a user:password@ the URL may carry. */ -}}
{{- $authority := regexReplaceAll "^[^:/]*://([^/]*).*$" $url "${1}" -}}
{{- $shown := ternary "<not shown: it carries a user or password>" $url (contains "@" $authority) -}}
{{- if $s3 -}}
{{- $rest := trimPrefix "s3://" $url -}}
{{- $bucket := regexReplaceAll "/.*$" $rest "" -}}
{{- $prefix := trimAll "/" (trimPrefix $bucket $rest) -}}
{{- if contains "@" $bucket -}}
{{- $mediaOk = false -}}
{{- $msgs = append $msgs "storage.media.url: an s3 URL carries no user or password (not shown here): the key pair goes in a Secret (storage.media.credentials.existingSecret), the endpoint in storage.media.endpoint. Fix: --set storage.media.url=s3://<bucket>/<prefix>" -}}
{{- else if or (not (regexMatch "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$" $bucket)) (regexMatch "^[0-9]{1,3}(\\.[0-9]{1,3}){3}$" $bucket) (regexMatch "\\.\\.|\\.-|-\\." $bucket) -}}
{{- $mediaOk = false -}}
{{- $msgs = append $msgs (printf "storage.media.url=%s: %q is not a valid S3 bucket name (3-63 lower-case letters, digits, '-' and '.'; a DNS name, not an IP address; no port: the endpoint goes in storage.media.endpoint). Fix: --set storage.media.url=s3://my-bucket/facefleet" $url $bucket) -}}
{{- else if or (contains ".." $prefix) (contains "//" $prefix) (regexMatch "(^|/)\\.(/|$)" $prefix) (regexMatch "[?#[:space:]]" $url) -}}
{{- $mediaOk = false -}}
{{- $msgs = append $msgs (printf "storage.media.url=%s: invalid key prefix %q (no '.' or '..' segments, no '//', query or fragment). Fix: --set storage.media.url=s3://%s/facefleet" $url $prefix $bucket) -}}
{{- end -}}
{{- $c := $m.credentials -}}
{{- if and (not $c.existingSecret) (not $c.fromServiceAccount) -}}
{{- $msgs = append $msgs (printf "storage.media.url=%s needs credentials for the object store: none are configured. Fix: --set storage.media.credentials.existingSecret=<Secret with keys %s and %s>, or use workload identity: annotate the service accounts (gateway.serviceAccount.annotations and workers.serviceAccount.annotations, e.g. eks.amazonaws.com/role-arn) and --set storage.media.credentials.fromServiceAccount=true" $shown $c.keys.accessKeyId $c.keys.secretAccessKey) -}}
{{- end -}}
{{- if and $c.existingSecret $c.fromServiceAccount -}}
{{- $msgs = append $msgs (printf "storage.media.credentials.existingSecret (%s) and storage.media.credentials.fromServiceAccount are both set: the Secret's key pair would silently win over the workload identity. Fix: --set storage.media.credentials.fromServiceAccount=false to use the Secret, or --set storage.media.credentials.existingSecret= to use the service accounts" $c.existingSecret) -}}
{{- end -}}
{{- else if $url -}}
{{- $path := trimSuffix "/" (trimPrefix "file://" $url) -}}
{{- if not (hasPrefix "file:///" $url) -}}
{{- $mediaOk = false -}}
{{- $msgs = append $msgs (printf "storage.media.url=%s: use s3://bucket/prefix (an object store) or file:///abs/path on the data volume; empty keeps media on the data volume. Fix: --set storage.media.url=s3://my-bucket/facefleet or --set storage.media.url=" $shown) -}}
{{- else if or (not (or (eq $path $mount) (hasPrefix (printf "%s/" $mount) $path))) (contains "/../" (printf "%s/" $path)) (regexMatch "[?#[:space:]]" $url) -}}
{{- $mediaOk = false -}}
{{- $msgs = append $msgs (printf "storage.media.url=%s is not on the data volume (data.mountPath %s): file media must be on the volume that gateway and workers share. Fix: --set storage.media.url= (the data volume itself), --set storage.media.url=file://%s/media, or an s3:// URL" $shown $mount $mount) -}}
{{- end -}}
{{- end -}}
{{- if not $s3 -}}
{{- $unused := list -}}
{{- range $key := list "endpoint" "region" -}}
{{- if index $m $key -}}
{{- $unused = append $unused (printf "storage.media.%s" $key) -}}
{{- end -}}
{{- end -}}
{{- if $m.credentials.existingSecret -}}
{{- $unused = append $unused "storage.media.credentials.existingSecret" -}}
{{- end -}}
{{- if $m.credentials.fromServiceAccount -}}
{{- $unused = append $unused "storage.media.credentials.fromServiceAccount" -}}
{{- end -}}
{{- if $unused -}}
{{- $msgs = append $msgs (printf "%s only apply to s3 media, but storage.media.url is %q: they would be ignored and media would stay on the data volume. Fix: --set storage.media.url=s3://bucket/prefix, or unset %s" (join ", " $unused) $shown (join ", " $unused)) -}}
{{- end -}}
{{- end -}}
{{- if $mediaOk -}}
{{- $root := include "facefleet.mediaRoot" . -}}
{{- range $key := list "source" "target" -}}
{{- $uri := include "facefleet.testUri" (dict "root" $ "key" $key) -}}
{{- if not (hasPrefix (printf "%s/" $root) $uri) -}}
{{- if $s3 -}}
{{- $msgs = append $msgs (printf "tests.%s=%s is not in the media store (%s/): the test job's inputs must be objects of the store. Fix: --set tests.%s=%s/samples/helm-test/%s.jpg, or leave it empty" $key $uri $root $key $root $key) -}}
{{- else -}}
{{- $msgs = append $msgs (printf "tests.%s=%s is not under the data volume (%s/): the worker refuses URIs outside the media store. Fix: --set tests.%s=%s/samples/helm-test/%s.jpg, or leave it empty" $key $uri $root $key $root $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* Job store (store.*): PostgreSQL only through a Secret; settings that would be ignored are
errors, as for the media store. */ -}}
{{- $st := .Values.store -}}
{{- if not (has $st.backend (list "file" "postgres")) -}}
{{- $msgs = append $msgs (printf "store.backend=%v is not a job store: use file (journals on the data volume, the default) or postgres (PostgreSQL, its URL from store.existingSecret). Fix: --set store.backend=file, or --set store.backend=postgres --set store.existingSecret=<Secret with the postgresql:// URL>" $st.backend) -}}
{{- else if eq $st.backend "postgres" -}}
{{- if not $st.existingSecret -}}
{{- $msgs = append $msgs (printf "store.backend=postgres needs store.existingSecret: the Secret whose key store.urlKey (%s) holds the postgresql://user:password@host:5432/db?sslmode=... URL (never a plain value: it carries the password; a direct or session-mode pooler URL, not transaction mode). It must exist before install: the migration hook runs first. Fix: kubectl -n %s create secret generic facefleet-store --from-literal=%s='postgresql://...' and --set store.existingSecret=facefleet-store (CloudNativePG: --set store.existingSecret=<cluster>-app --set store.urlKey=uri)" $st.urlKey .Release.Namespace $st.urlKey) -}}
{{- end -}}
{{- if and $s3 .Values.data.existingClaim -}}
{{- $msgs = append $msgs (printf "data.existingClaim (%s) is set, but with store.backend=postgres and s3 media nothing mounts the data volume: the claim would be ignored. Fix: --set data.existingClaim= (the PVC itself is left alone), or keep file media or the file store" .Values.data.existingClaim) -}}
{{- end -}}
{{- else if $st.existingSecret -}}
{{- $msgs = append $msgs (printf "store.existingSecret (%s) only applies to store.backend=postgres, but store.backend is file: it would be ignored and job state would stay on the data volume. Fix: --set store.backend=postgres, or --set store.existingSecret=" $st.existingSecret) -}}
{{- end -}}
{{- if $msgs -}}
{{- fail (printf "\n\nVALUES ERROR (facefleet chart):\n  * %s\n" (join "\n  * " $msgs)) -}}
{{- end -}}
{{- end -}}
