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
