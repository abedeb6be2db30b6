"""Generate helm/facefleet/values.schema.json: strict on every key of ours.

The schema is written here, in Python, rather than by hand in JSON because (1) the tier block is
defined once and referenced by every tier, and (2) allowed values come from the code that
consumes them (guideline: declare allowed values once): backends and log levels from the
`Literal` types in facefleet.settings, processors from consumer.processors.PROCESSORS and the tier
name pattern from facefleet.wire. A test (tests/helm/test_chart_files.py) fails when the
committed file differs from what this script produces.

Usage: ``python helm/tools/gen_schema.py [--check]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "helm" / "facefleet" / "values.schema.json"

if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from facefleet.consumer.processors import PROCESSORS  # noqa: E402
from facefleet.keda.scaling import TRIGGERS  # noqa: E402
from facefleet.settings import CommonSettings, ScalerSettings, WorkerSettings  # noqa: E402
from facefleet.wire import TIER_PATTERN  # noqa: E402

# tiers.<tier>.scaling.trigger: KEDA's own rabbitmq trigger, or a mode of `facefleet scaler`
# (keda/scaling.py TRIGGERS, the names the scaler accepts as trigger metadata).
SCALING_TRIGGERS = ("queueLength", *TRIGGERS)

Schema = dict[str, Any]

# WorkerSettings.providers() accepts these names (its mapping is local to the method).
EXECUTION_PROVIDERS = ("tensorrt", "cuda", "cpu")
# HPA API limits (autoscaling/v2 HPAScalingRules), enforced here because the KEDA CRD only
# describes them in prose and a bad value fails at runtime when KEDA creates the HPA.
MAX_STABILIZATION_S = 3600
MAX_PERIOD_S = 1800
# workers.drainMarginSeconds only has to cover what a worker does after its drain deadline: stop
# its jobs, wait at most 10 s for them (consumer/worker.py `_drain`) and close the connection.
# Every second more is added to every worker pod's grace period (node drains, spot notice), so a
# larger value is a mistake, not a preference.
MAX_DRAIN_MARGIN_S = 300
# Job store backends (facefleet.stores.open_job_store): file:/// journals or postgresql://.
STORE_BACKENDS = ("file", "postgres")
# Standard Webhooks signing secrets: `whsec_` + the base64 of the key bytes; several separated by
# spaces or commas during a rotation (FACEFLEET_WEBHOOK_SECRET).
_WHSEC = r"whsec_[A-Za-z0-9+/]+={0,2}"
WEBHOOK_SECRET_PATTERN = rf"^({_WHSEC}([ ,]+{_WHSEC})*)?$"


def field_bounds(model: type[Any], field: str) -> Schema:
    """JSON Schema bounds of a numeric settings field, from its pydantic constraints (gt, ge, lt,
    le), so the chart accepts exactly what the process accepts."""
    names = {
        "gt": "exclusiveMinimum",
        "ge": "minimum",
        "lt": "exclusiveMaximum",
        "le": "maximum",
    }
    out: Schema = {}
    for constraint in model.model_fields[field].metadata:
        for attr, key in names.items():
            value = getattr(constraint, attr, None)
            if value is not None:
                out[key] = value
    return out


def literal_choices(model: type[Any], field: str) -> list[str]:
    annotation = model.model_fields[field].annotation
    return [str(choice) for choice in get_args(annotation)]


def obj(properties: Schema, required: list[str] | None = None, **extra: Any) -> Schema:
    """A closed object: unknown keys are errors (a typo in --set must not pass silently)."""
    out: Schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = required
    out.update(extra)
    return out


def integer(
    minimum: int | None = None, maximum: int | None = None, nullable: bool = False
) -> Schema:
    out: Schema = {"type": ["integer", "null"] if nullable else "integer"}
    if minimum is not None:
        out["minimum"] = minimum
    if maximum is not None:
        out["maximum"] = maximum
    return out


def string(**extra: Any) -> Schema:
    return {"type": "string", **extra}


def boolean() -> Schema:
    return {"type": "boolean"}


def free_map(description: str) -> Schema:
    """Kubernetes structures passed through verbatim (tolerations, affinity...)."""
    return {"type": "object", "description": description}


QUANTITY = {"type": ["string", "integer", "number"]}
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?)?$"

# A Kubernetes object name or empty (existingClaim, existingSecret...).
OPTIONAL_NAME = string(pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$", maxLength=253)

RESOURCE_LIST = {"type": "object", "additionalProperties": QUANTITY}
RESOURCES = obj(
    {"requests": RESOURCE_LIST, "limits": RESOURCE_LIST},
    required=["requests"],
)


def service_account() -> Schema:
    """A ServiceAccount the chart creates: extra annotations only (workload identity)."""
    return obj({"annotations": {"type": "object", "additionalProperties": {"type": "string"}}})


def hpa_rules() -> Schema:
    rules = obj(
        {
            "stabilizationWindowSeconds": integer(0, MAX_STABILIZATION_S),
            "selectPolicy": string(enum=["Max", "Min", "Disabled"]),
            "pods": {"type": ["integer", "null"], "exclusiveMinimum": 0},
            "percent": {"type": ["integer", "null"], "exclusiveMinimum": 0},
            "periodSeconds": integer(1, MAX_PERIOD_S),
        },
        required=["stabilizationWindowSeconds", "selectPolicy", "periodSeconds"],
    )
    return {"oneOf": [{"type": "null"}, rules]}


def tier_schema() -> Schema:
    providers = "|".join(EXECUTION_PROVIDERS)
    return obj(
        {
            "enabled": boolean(),
            "mode": string(enum=["deployment", "job"]),
            "maxJobSeconds": integer(1),
            "maxLength": integer(1),
            "deliveryLimit": integer(1),
            "terminationGracePeriodSeconds": integer(1, nullable=True),
            "prefetch": integer(1, 64),
            "batch": integer(1, 256),
            # The worker's GPU-duty settings, bounded as WorkerSettings bounds them.
            "pipelineDepth": {"type": "integer", **field_bounds(WorkerSettings, "pipeline_depth")},
            "instances": {"type": "integer", **field_bounds(WorkerSettings, "instances")},
            "dynamicBatch": {"type": "integer", **field_bounds(WorkerSettings, "dynamic_batch")},
            # Whole ms: `--set` passes 0.5 as a string (the worker takes any number in range).
            "batchDelayMs": {"type": "integer", **field_bounds(WorkerSettings, "batch_delay_ms")},
            "podDeletionCost": boolean(),
            "processor": string(enum=sorted(PROCESSORS)),
            "backend": string(enum=literal_choices(WorkerSettings, "backend")),
            "executionProviders": string(pattern=f"^({providers})(,({providers}))*$"),
            "tensorrt": obj(
                {
                    "fp16": boolean(),
                    "cache": obj(
                        {
                            "type": string(enum=["emptyDir", "hostPath", "pvc"]),
                            "emptyDirSizeLimit": string(pattern=QUANTITY_PATTERN),
                            "hostPath": string(pattern="^/.+"),
                            "existingClaim": OPTIONAL_NAME,
                        },
                        required=["type", "emptyDirSizeLimit", "hostPath", "existingClaim"],
                    ),
                },
                required=["fp16", "cache"],
            ),
            "deviceId": integer(0),
            "gpu": obj(
                {
                    "resource": string(pattern=r"^[a-z0-9.-]+/[a-zA-Z0-9._-]+$"),
                    "count": integer(0),
                },
                required=["resource", "count"],
            ),
            "resources": RESOURCES,
            "priorityClassName": string(),
            "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
            "tolerations": {"type": "array", "items": {"type": "object"}},
            "affinity": free_map("Pod affinity, verbatim."),
            "scaling": obj(
                {
                    "minReplicas": integer(0),
                    "maxReplicas": integer(1),
                    "idleReplicas": {"type": ["integer", "null"], "enum": [0, None]},
                    # Integers: `--set` passes 2.5 as a string, and jobs are whole.
                    "jobsPerReplica": integer(1),
                    "activationJobs": integer(0),
                    "pollingInterval": integer(1),
                    "cooldownPeriod": integer(0),
                    "trigger": string(enum=list(SCALING_TRIGGERS)),
                    # Whole seconds (as jobsPerReplica: `--set` passes 45.5 as a string); the
                    # scaler (keda.scaling.params_from_metadata) takes any number above 0.
                    "waitObjectiveSeconds": integer(1),
                    "startupSeconds": integer(1),
                    "scaleUp": hpa_rules(),
                    "scaleDown": hpa_rules(),
                },
                required=[
                    "minReplicas",
                    "maxReplicas",
                    "jobsPerReplica",
                    "activationJobs",
                    "pollingInterval",
                    "cooldownPeriod",
                ],
            ),
            "scaledJob": obj(
                {
                    "scalingStrategy": string(enum=["default", "custom", "accurate", "eager"]),
                    "customScalingQueueLengthDeduction": integer(nullable=True),
                    "customScalingRunningJobPercentage": {
                        "type": ["number", "null"],
                        "minimum": 0,
                        "maximum": 1,
                    },
                    "successfulJobsHistoryLimit": integer(0),
                    "failedJobsHistoryLimit": integer(0),
                    "idleExitSeconds": integer(1),
                },
                required=["scalingStrategy"],
            ),
        },
        required=[
            "enabled",
            "mode",
            "maxJobSeconds",
            "maxLength",
            "deliveryLimit",
            "prefetch",
            "batch",
            "pipelineDepth",
            "instances",
            "dynamicBatch",
            "batchDelayMs",
            "podDeletionCost",
            "processor",
            "backend",
            "executionProviders",
            "tensorrt",
            "deviceId",
            "gpu",
            "resources",
            "scaling",
            "scaledJob",
        ],
    )


def image_schema() -> Schema:
    return obj(
        {
            "repository": string(minLength=1),
            "tag": string(),
            "digest": string(pattern=r"^(sha256:[a-f0-9]{64})?$"),
            "pullPolicy": string(enum=["Always", "IfNotPresent", "Never"]),
        },
        required=["repository", "tag", "pullPolicy"],
    )


def build() -> Schema:
    k8s_name = string(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", maxLength=63)
    optional_name = OPTIONAL_NAME
    secret_key = string(pattern=r"^[-._a-zA-Z0-9]+$")
    tier_pattern = TIER_PATTERN.pattern
    # Joined with "," into FACEFLEET_FETCH_ALLOW (workers and webhooks).
    fetch_allow = {"type": "array", "items": string(pattern=r"^[^,\s]+$")}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "facefleet chart values",
        "description": "Generated by helm/tools/gen_schema.py; edit that file, not this one.",
        **obj(
            {
                "nameOverride": string(),
                "fullnameOverride": string(maxLength=30),
                "image": obj(
                    {
                        "consumer": image_schema(),
                        "producer": image_schema(),
                        "pullSecrets": {"type": "array", "items": k8s_name},
                    },
                    required=["consumer", "producer"],
                ),
                "rabbitmq": obj(
                    {
                        # No user:password@ (credentials come from the Secret); a path must end
                        # with "/" because KEDA reads the last path segment as the vhost.
                        "managementUrl": string(pattern=r"^https?://[^/@\s]+(/([^/\s]+/)*)?$"),
                        "vhost": string(minLength=1),
                        "timeoutMs": integer(1, nullable=True),
                    },
                    required=["managementUrl", "vhost"],
                ),
                "secrets": obj(
                    {
                        "existingSecret": optional_name,
                        "create": boolean(),
                        "keys": obj(
                            {
                                k: secret_key
                                for k in (
                                    "amqpUrl",
                                    "rabbitmqUsername",
                                    "rabbitmqPassword",
                                    "apiKeys",
                                    "tokenSecret",
                                    "webhookSecret",
                                )
                            }
                        ),
                        "values": obj(
                            {
                                "amqpUrl": string(pattern=r"^(amqps?://.+)?$"),
                                "rabbitmqUsername": string(),
                                "rabbitmqPassword": string(),
                                "apiKeys": string(),
                                "tokenSecret": string(),
                                # Standard Webhooks secret: whsec_ + base64 of the key bytes.
                                "webhookSecret": string(pattern=WEBHOOK_SECRET_PATTERN),
                            }
                        ),
                    },
                    required=["create", "keys"],
                ),
                "data": obj(
                    {
                        "mountPath": string(pattern=r"^/[^:]*[^/]$"),
                        "existingClaim": optional_name,
                        "storageClassName": string(),
                        "size": string(pattern=QUANTITY_PATTERN),
                    },
                    required=["mountPath", "size"],
                ),
                "store": obj(
                    {
                        # Also checked in templates/_validate.tpl (with --skip-schema-validation).
                        "backend": string(enum=list(STORE_BACKENDS)),
                        "existingSecret": optional_name,
                        "urlKey": secret_key,
                        "migrate": obj(
                            {
                                "enabled": boolean(),
                                "backoffLimit": integer(0),
                                "activeDeadlineSeconds": integer(1),
                                "resources": RESOURCES,
                            },
                            required=["enabled"],
                        ),
                    },
                    required=["backend", "urlKey", "migrate"],
                ),
                "storage": obj(
                    {
                        "media": obj(
                            {
                                # Checked in templates/_validate.tpl (messages that name the fix).
                                "url": string(),
                                # No user:password@ (credentials come from a Secret or the pods'
                                # identity), no path, query or fragment: boto3 takes a base URL.
                                "endpoint": string(pattern=r"^(https?://[^/@\s?#]+/?)?$"),
                                "region": string(pattern=r"^([a-z0-9-]+)?$"),
                                "credentials": obj(
                                    {
                                        "existingSecret": optional_name,
                                        "keys": obj(
                                            {
                                                "accessKeyId": secret_key,
                                                "secretAccessKey": secret_key,
                                            },
                                            required=["accessKeyId", "secretAccessKey"],
                                        ),
                                        "fromServiceAccount": boolean(),
                                    },
                                    required=["keys"],
                                ),
                            },
                            required=["url", "credentials"],
                        )
                    },
                    required=["media"],
                ),
                "models": obj(
                    {
                        "catalog": string(pattern="^/"),
                        "baseUrl": string(pattern=r"^(https?://\S+)?$"),
                        "volume": obj(
                            {
                                "type": string(enum=["emptyDir", "hostPath", "pvc"]),
                                "emptyDirSizeLimit": string(),
                                "hostPath": string(pattern="^/.+"),
                                "existingClaim": optional_name,
                                "storageClassName": string(),
                                "size": string(),
                            },
                            required=["type"],
                        ),
                        "pullResources": RESOURCES,
                    },
                    required=["catalog", "volume"],
                ),
                "workers": obj(
                    {
                        "logLevel": string(enum=literal_choices(CommonSettings, "log_level")),
                        "startupTimeoutSeconds": integer(5),
                        "drainMarginSeconds": integer(0, MAX_DRAIN_MARGIN_S),
                        "podDisruptionBudget": boolean(),
                        "podAnnotations": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "serviceAccount": service_account(),
                        "fetch": obj(
                            {
                                # Joined with "," into FACEFLEET_FETCH_ALLOW; the worker parses
                                # each entry at start (facefleet.fetch.parse_allow). Whole seconds,
                                # as every *Seconds value (`--set` passes 2.5 as a string).
                                "allow": fetch_allow,
                                "connectTimeoutSeconds": {
                                    "type": ["integer", "null"],
                                    **field_bounds(WorkerSettings, "fetch_connect_timeout_s"),
                                },
                                "readTimeoutSeconds": {
                                    "type": ["integer", "null"],
                                    **field_bounds(WorkerSettings, "fetch_read_timeout_s"),
                                },
                                "maxRedirects": {
                                    "type": ["integer", "null"],
                                    **field_bounds(WorkerSettings, "fetch_max_redirects"),
                                },
                            }
                        ),
                        "scratch": obj({"sizeLimit": string(pattern=QUANTITY_PATTERN)}),
                    }
                ),
                "tiers": {
                    "type": "object",
                    "minProperties": 1,
                    "propertyNames": {"pattern": tier_pattern},
                    "additionalProperties": {"$ref": "#/$defs/tier"},
                },
                "priorityClasses": obj(
                    {
                        "create": boolean(),
                        "classes": {
                            "type": "object",
                            "propertyNames": k8s_name,
                            "additionalProperties": obj(
                                {
                                    "value": integer(-2147483648, 1000000000),
                                    "preemptionPolicy": string(
                                        enum=["PreemptLowerPriority", "Never"]
                                    ),
                                    "description": string(),
                                },
                                required=["value", "preemptionPolicy"],
                            ),
                        },
                    }
                ),
                "rbac": obj({"create": boolean()}),
                "gateway": obj(
                    {
                        "enabled": boolean(),
                        "replicas": integer(1),
                        "resources": RESOURCES,
                        "service": obj(
                            {
                                "type": string(enum=["ClusterIP", "NodePort", "LoadBalancer"]),
                                "port": integer(1, 65535),
                            }
                        ),
                        "ingress": obj(
                            {
                                "enabled": boolean(),
                                "className": string(),
                                "host": string(),
                                "annotations": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                                "tlsSecretName": optional_name,
                            }
                        ),
                        "podDisruptionBudget": boolean(),
                        "serviceAccount": service_account(),
                        "nodeSelector": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "tolerations": {"type": "array", "items": {"type": "object"}},
                        "affinity": free_map("Pod affinity, verbatim."),
                    }
                ),
                "webhooks": obj(
                    {
                        "enabled": boolean(),
                        "replicas": integer(1),
                        "resources": RESOURCES,
                        "podDisruptionBudget": boolean(),
                        "terminationGracePeriodSeconds": integer(1),
                        "fetch": obj({"allow": fetch_allow}),
                        "nodeSelector": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "tolerations": {"type": "array", "items": {"type": "object"}},
                        "affinity": free_map("Pod affinity, verbatim."),
                    }
                ),
                "scaler": obj(
                    {
                        # null: run it when an enabled tier's trigger needs it.
                        "enabled": {"type": ["boolean", "null"]},
                        "replicas": integer(1),
                        "port": integer(1, 65535),
                        "push": boolean(),
                        "podDisruptionBudget": boolean(),
                        "forecastDays": {
                            "type": "integer",
                            **field_bounds(ScalerSettings, "scaler_forecast_days"),
                        },
                        "tls": obj(
                            {"secretName": optional_name, "clientSecretName": optional_name}
                        ),
                        "kedaFrom": {"type": "array", "items": {"type": "object"}},
                        "resources": RESOURCES,
                        "nodeSelector": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "tolerations": {"type": "array", "items": {"type": "object"}},
                        "affinity": free_map("Pod affinity, verbatim."),
                    }
                ),
                "networkPolicy": obj(
                    {
                        "enabled": boolean(),
                        "metricsFrom": {"type": "array", "items": {"type": "object"}},
                        "gatewayFrom": {"type": "array", "items": {"type": "object"}},
                    }
                ),
                "serviceMonitor": obj(
                    {
                        "enabled": boolean(),
                        "interval": string(pattern=r"^[0-9]+(ms|s|m|h)$"),
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    }
                ),
                "monitoring": obj(
                    {
                        "dashboards": obj(
                            {
                                "enabled": boolean(),
                                "labels": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                                "annotations": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                            }
                        ),
                        "prometheusRules": obj(
                            {
                                "enabled": boolean(),
                                "labels": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                                # keys are tier names; a tier not listed gets the default
                                "waitObjectiveSeconds": {
                                    "type": "object",
                                    "propertyNames": {"pattern": tier_pattern},
                                    "additionalProperties": integer(1),
                                },
                                "defaultWaitObjectiveSeconds": integer(1),
                            }
                        ),
                    }
                ),
                "tests": obj(
                    {
                        # Empty: derived from the media store; inside it: _validate.tpl.
                        "source": string(pattern=r"^((file:///|s3://)\S+)?$"),
                        "target": string(pattern=r"^((file:///|s3://)\S+)?$"),
                        "tier": string(pattern=f"^({tier_pattern.strip('^$')})?$"),
                        "timeoutSeconds": integer(60),
                    }
                ),
            },
            required=["image", "rabbitmq", "secrets", "data", "models", "workers", "tiers"],
        ),
        "$defs": {"tier": tier_schema()},
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = SCHEMA_PATH.read_text() if SCHEMA_PATH.exists() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is stale: run python helm/tools/gen_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(SCHEMA_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
