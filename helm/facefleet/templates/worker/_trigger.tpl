{{/*
facefleet.rabbitmqTrigger: the RabbitMQ trigger of one tier (ScaledObject and ScaledJob).
protocol http + excludeUnacknowledged "false": the metric is the management API's `messages`
(ready + unacknowledged), so jobs being processed keep the tier active and count toward the
target. With AMQP only ready messages are visible (keda/README.md, "Why unacknowledged jobs
count"). No metricType: ScaledJob triggers must not set it, ScaledObjects default to AverageValue.
Call with (dict "root" $ "name" "<tier>" "tier" <tier map>).
*/}}
{{- define "facefleet.rabbitmqTrigger" -}}
- type: rabbitmq
  name: {{ printf "queue-%s" .name }}
  metadata:
    protocol: http
    host: {{ .root.Values.rabbitmq.managementUrl | quote }}
    vhostName: {{ .root.Values.rabbitmq.vhost | quote }}
    queueName: {{ printf "facefleet.jobs.%s" .name | quote }}
    mode: QueueLength
    value: {{ .tier.scaling.jobsPerReplica | toString | quote }}
    activationValue: {{ .tier.scaling.activationJobs | toString | quote }}
    excludeUnacknowledged: "false"
    {{- if not (kindIs "invalid" .root.Values.rabbitmq.timeoutMs) }}
    timeout: {{ .root.Values.rabbitmq.timeoutMs | toString | quote }}
    {{- end }}
  authenticationRef:
    name: {{ printf "%s-rabbitmq" (include "facefleet.fullname" .root) }}
{{- end -}}

{{/*
facefleet.scalerTrigger: the `external` (or, with scaler.push, `external-push`) trigger of a tier
whose scaling.trigger is work, latency or predictive. KEDA passes the whole metadata map to
`facefleet scaler` (keda/scaler/server.py reads tier, trigger, waitObjectiveSeconds,
startupSeconds); every value is a string, as the CRD requires. The metric is an AverageValue
target (GetMetricSpec's targetSize), so no metricType. With scaler.tls.secretName, a
TriggerAuthentication gives KEDA the CA (and with clientSecretName its client certificate).
Call with (dict "root" $ "name" "<tier>" "tier" <tier map>).
*/}}
{{- define "facefleet.scalerTrigger" -}}
{{- $s := .tier.scaling -}}
{{- $sc := .root.Values.scaler -}}
- type: {{ ternary "external-push" "external" $sc.push }}
  name: {{ printf "%s-%s" $s.trigger .name }}
  metadata:
    scalerAddress: {{ include "facefleet.scalerAddress" .root | quote }}
    tier: {{ .name | quote }}
    trigger: {{ $s.trigger | quote }}
    waitObjectiveSeconds: {{ $s.waitObjectiveSeconds | toString | quote }}
    {{- if eq $s.trigger "predictive" }}
    startupSeconds: {{ $s.startupSeconds | toString | quote }}
    {{- end }}
  {{- if $sc.tls.secretName }}
  authenticationRef:
    name: {{ printf "%s-tls" (include "facefleet.scalerName" .root) }}
  {{- end }}
{{- end -}}

{{/*
facefleet.trigger: the tier's one trigger, by tiers.<tier>.scaling.trigger.
*/}}
{{- define "facefleet.trigger" -}}
{{- if eq .tier.scaling.trigger "queueLength" -}}
{{- include "facefleet.rabbitmqTrigger" . -}}
{{- else -}}
{{- include "facefleet.scalerTrigger" . -}}
{{- end -}}
{{- end -}}
