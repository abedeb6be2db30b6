"""Values users change with `helm upgrade --set`: good ones land where they should, bad ones are
rejected at render time with a message that names the value (and, for cross-field rules, the fix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.chart import HelmError, by_kind, render, template

SO_HIGH = "ff-facefleet-worker-high"


def scaled_object(objs: list[dict[str, Any]], name: str = SO_HIGH) -> dict[str, Any]:
    return next(o for o in by_kind(objs, "ScaledObject") if o["metadata"]["name"] == name)


def dig(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


@pytest.mark.parametrize(
    ("sets", "path", "expected"),
    [
        pytest.param(["tiers.high.scaling.minReplicas=2"], "spec.minReplicaCount", 2,
                     id="min-replicas"),
        pytest.param(["tiers.high.scaling.maxReplicas=20"], "spec.maxReplicaCount", 20,
                     id="max-replicas"),
        pytest.param(["tiers.high.scaling.jobsPerReplica=3"], "spec.triggers.0.metadata.value",
                     "3", id="jobs-per-replica-is-trigger-value"),
        pytest.param(["tiers.high.scaling.jobsPerReplica=3", "tiers.high.scaling.activationJobs=2"],
                     "spec.triggers.0.metadata.activationValue", "2", id="activation-jobs"),
        pytest.param(["tiers.high.scaling.pollingInterval=15"], "spec.pollingInterval", 15,
                     id="polling-interval"),
        pytest.param(["tiers.high.scaling.cooldownPeriod=600"], "spec.cooldownPeriod", 600,
                     id="cooldown-period"),
        pytest.param(["tiers.high.scaling.idleReplicas=0"], "spec.idleReplicaCount", 0,
                     id="idle-replicas"),
        pytest.param(["tiers.high.scaling.scaleDown.stabilizationWindowSeconds=600"],
                     "spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown."
                     "stabilizationWindowSeconds", 600, id="scale-down-window"),
        pytest.param(["tiers.high.scaling.scaleUp.pods=2", "tiers.high.scaling.scaleUp.percent=null"],
                     "spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleUp.policies",
                     [{"type": "Pods", "value": 2, "periodSeconds": 15}], id="scale-up-pods-only"),
        pytest.param(["tiers.high.scaling.scaleDown.selectPolicy=Disabled"],
                     "spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown.selectPolicy",
                     "Disabled", id="scale-down-disabled"),
        pytest.param(["tiers.high.scaling.scaleUp.percent=50", "tiers.high.scaling.scaleUp.periodSeconds=60"],
                     "spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleUp.policies.1",
                     {"type": "Percent", "value": 50, "periodSeconds": 60}, id="scale-up-percent"),
    ],
)  # fmt: skip
def test_set_lands_in_the_scaled_object(
    helm: Path, sets: list[str], path: str, expected: Any
) -> None:
    assert dig(scaled_object(render(helm, sets=sets)), path) == expected


@pytest.mark.parametrize(
    ("sets", "kind", "metadata"),
    [
        pytest.param(["tiers.standard.scaling.trigger=work"], "external",
                     {"trigger": "work", "waitObjectiveSeconds": "120"}, id="upgrade-to-work"),
        pytest.param(["tiers.standard.scaling.trigger=latency",
                      "tiers.standard.scaling.waitObjectiveSeconds=45"], "external",
                     {"trigger": "latency", "waitObjectiveSeconds": "45"},
                     id="latency-own-objective"),
        pytest.param(["tiers.standard.scaling.trigger=predictive",
                      "tiers.standard.scaling.startupSeconds=120", "scaler.push=true"],
                     "external-push",
                     {"trigger": "predictive", "waitObjectiveSeconds": "120",
                      "startupSeconds": "120"}, id="predictive-push"),
    ],
)  # fmt: skip
def test_scaler_trigger_lands_in_the_scaled_object(
    helm: Path, sets: list[str], kind: str, metadata: dict[str, str]
) -> None:
    """What `helm upgrade --reuse-values --set tiers.standard.scaling.trigger=...` renders: the
    tier's trigger becomes the scaler's, and the scaler (enabled: null) comes with it."""
    objs = render(helm, sets=sets)
    so = scaled_object(objs, "ff-facefleet-worker-standard")
    [trigger] = so["spec"]["triggers"]
    assert trigger["type"] == kind
    assert trigger["metadata"] == {
        "scalerAddress": "ff-facefleet-scaler.facefleet-test.svc:6000",
        "tier": "standard",
        **metadata,
    }
    assert "authenticationRef" not in trigger
    names = {o["metadata"]["name"] for o in by_kind(objs, "Deployment")}
    assert "ff-facefleet-scaler" in names
    # the other tiers keep their queue-length triggers
    assert scaled_object(objs)["spec"]["triggers"][0]["type"] == "rabbitmq"


def test_null_behaviour_renders_none(helm: Path) -> None:
    so = scaled_object(
        render(helm, sets=["tiers.high.scaling.scaleUp=null", "tiers.high.scaling.scaleDown=null"])
    )
    assert "advanced" not in so["spec"]


def test_grace_period_override(helm: Path) -> None:
    objs = render(helm, sets=["tiers.high.terminationGracePeriodSeconds=900"])
    dep = next(o for o in by_kind(objs, "Deployment") if o["metadata"]["name"] == SO_HIGH)
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 900


def tier_pod(objs: list[dict[str, Any]], tier: str) -> dict[str, Any]:
    """The pod spec of a tier's Deployment or ScaledJob."""
    name = f"ff-facefleet-worker-{tier}"
    w = next(
        o for o in objs
        if o["kind"] in ("Deployment", "ScaledJob") and o["metadata"]["name"] == name
    )  # fmt: skip
    spec = w["spec"]
    return (
        spec["jobTargetRef"]["template"]["spec"]
        if "jobTargetRef" in spec
        else spec["template"]["spec"]
    )


def worker_env(pod: dict[str, Any]) -> dict[str, Any]:
    worker = next(c for c in pod["containers"] if c["name"] == "worker")
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in worker["env"]}


GPU_DEFAULTS = {
    "FACEFLEET_PIPELINE_DEPTH": "1",
    "FACEFLEET_INSTANCES": "1",
    "FACEFLEET_DYNAMIC_BATCH": "1",
    "FACEFLEET_BATCH_DELAY_MS": "2",
}


@pytest.mark.parametrize(
    ("sets", "tier", "env"),
    [
        pytest.param([], "high", GPU_DEFAULTS, id="defaults-high"),
        pytest.param([], "batch", GPU_DEFAULTS, id="defaults-batch-scaledjob"),
        pytest.param(["tiers.standard.pipelineDepth=3", "tiers.standard.scaling.jobsPerReplica=3"],
                     "standard", {**GPU_DEFAULTS, "FACEFLEET_PIPELINE_DEPTH": "3"},
                     id="standard-depth-3"),
        pytest.param(["tiers.high.pipelineDepth=4", "tiers.high.scaling.jobsPerReplica=4"], "high",
                     {**GPU_DEFAULTS, "FACEFLEET_PIPELINE_DEPTH": "4"}, id="high-depth-4"),
        pytest.param(["tiers.batch.pipelineDepth=2", "tiers.batch.scaling.jobsPerReplica=2"],
                     "batch", {**GPU_DEFAULTS, "FACEFLEET_PIPELINE_DEPTH": "2"},
                     id="batch-scaledjob-depth-2"),
        pytest.param(["tiers.high.instances=2"], "high",
                     {**GPU_DEFAULTS, "FACEFLEET_INSTANCES": "2"}, id="instances"),
        pytest.param(["tiers.standard.dynamicBatch=8", "tiers.standard.batchDelayMs=5"],
                     "standard",
                     {**GPU_DEFAULTS, "FACEFLEET_DYNAMIC_BATCH": "8",
                      "FACEFLEET_BATCH_DELAY_MS": "5"}, id="dynamic-batch-and-delay"),
        pytest.param(["tiers.high.batchDelayMs=0"], "high",
                     {**GPU_DEFAULTS, "FACEFLEET_BATCH_DELAY_MS": "0"}, id="zero-batch-delay"),
    ],
)  # fmt: skip
def test_gpu_duty_settings_reach_the_worker(
    helm: Path, sets: list[str], tier: str, env: dict[str, str]
) -> None:
    """`helm upgrade --set tiers.<tier>.pipelineDepth=...` etc. land in the tier's worker env as the
    worker reads them (facefleet.settings.WorkerSettings), and only in that tier's."""
    objs = render(helm, sets=sets)
    got = worker_env(tier_pod(objs, tier))
    assert {k: got.get(k) for k in env} == env
    for other in {"high", "standard", "batch"} - {tier}:
        other_env = worker_env(tier_pod(objs, other))
        assert {k: other_env.get(k) for k in GPU_DEFAULTS} == GPU_DEFAULTS


TRT = "tensorrt\\,cuda\\,cpu"


@pytest.mark.parametrize(
    ("sets", "volume", "fp16"),
    [
        pytest.param([], None, None, id="cuda-default-no-cache"),
        pytest.param([f"tiers.high.executionProviders={TRT}"],
                     {"emptyDir": {"sizeLimit": "10Gi"}}, "false", id="tensorrt-emptydir"),
        pytest.param([f"tiers.high.executionProviders={TRT}", "tiers.high.tensorrt.fp16=true",
                      "tiers.high.tensorrt.cache.type=hostPath",
                      "tiers.high.tensorrt.cache.hostPath=/mnt/trt"],
                     {"hostPath": {"path": "/mnt/trt", "type": "Directory"}}, "true",
                     id="tensorrt-hostpath-fp16"),
        pytest.param([f"tiers.high.executionProviders={TRT}",
                      "tiers.high.tensorrt.cache.type=pvc",
                      "tiers.high.tensorrt.cache.existingClaim=trt-cache"],
                     {"persistentVolumeClaim": {"claimName": "trt-cache"}}, "false",
                     id="tensorrt-existing-pvc"),
    ],
)  # fmt: skip
def test_tensorrt_cache_is_mounted_only_when_asked(
    helm: Path, sets: list[str], volume: dict[str, Any] | None, fp16: str | None
) -> None:
    """The TensorRT caches get a writable volume at /trt-cache (the model volume is read-only for
    workers) only on a tier whose executionProviders lists tensorrt; the other tiers get none."""
    objs = render(helm, sets=sets)
    for tier in ("high", "standard", "batch"):
        pod = tier_pod(objs, tier)
        worker = next(c for c in pod["containers"] if c["name"] == "worker")
        mounts = {m["name"]: m for m in worker["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        env = worker_env(pod)
        assert mounts["models"]["readOnly"] is True
        if tier == "high" and volume is not None:
            assert mounts["trt-cache"]["mountPath"] == "/trt-cache"
            assert not mounts["trt-cache"].get("readOnly", False)
            assert {k: v for k, v in volumes["trt-cache"].items() if k != "name"} == volume
            assert env["FACEFLEET_TRT_CACHE_DIR"] == "/trt-cache"
            assert env["FACEFLEET_TRT_FP16"] == fp16
            assert env["FACEFLEET_EXECUTION_PROVIDERS"] == "tensorrt,cuda,cpu"
        else:
            assert "trt-cache" not in mounts and "trt-cache" not in volumes
            assert "FACEFLEET_TRT_CACHE_DIR" not in env and "FACEFLEET_TRT_FP16" not in env


REJECTED = [
    # schema: types, ranges, unknown keys, enums
    pytest.param(["tiers.high.scaling.minReplicas=-1"],
                 ["/tiers/high/scaling/minReplicas", "minimum"], id="negative-min-replicas"),
    pytest.param(["tiers.high.scaling.maxReplicas=0"],
                 ["/tiers/high/scaling/maxReplicas", "minimum"], id="zero-max-replicas"),
    pytest.param(["tiers.high.scaling.jobsPerReplica=0"],
                 ["/tiers/high/scaling/jobsPerReplica", "minimum"], id="zero-target"),
    pytest.param(["tiers.high.scaling.jobsPerReplica=2.5"],
                 ["/tiers/high/scaling/jobsPerReplica"], id="fractional-target"),
    pytest.param(["tiers.high.scaling.pollingInterval=0"],
                 ["/tiers/high/scaling/pollingInterval", "minimum"], id="zero-polling-interval"),
    pytest.param(["tiers.high.scaling.cooldownPeriod=-5"],
                 ["/tiers/high/scaling/cooldownPeriod", "minimum"], id="negative-cooldown"),
    pytest.param(["tiers.high.scaling.maxReplicas=ten"],
                 ["/tiers/high/scaling/maxReplicas", "want integer"], id="wrong-type"),
    pytest.param(["tiers.high.scaling.maxReplica=5"],
                 ["/tiers/high/scaling", "'maxReplica' not allowed"], id="unknown-key-typo"),
    pytest.param(["tiers.high.gpus=2"], ["/tiers/high", "'gpus' not allowed"],
                 id="unknown-tier-key"),
    pytest.param(["gateway.replicaCount=3"], ["/gateway", "'replicaCount' not allowed"],
                 id="unknown-gateway-key"),
    pytest.param(["tiers.high.mode=cronjob"], ["/tiers/high/mode"], id="unknown-mode"),
    pytest.param(["tiers.high.scaling.scaleUp.selectPolicy=Fastest"],
                 ["/tiers/high/scaling/scaleUp"], id="bad-select-policy"),
    pytest.param(["tiers.high.scaling.scaleDown.stabilizationWindowSeconds=4000"],
                 ["/tiers/high/scaling/scaleDown"], id="window-above-hpa-limit"),
    pytest.param(["tiers.high.scaling.scaleUp.periodSeconds=0"],
                 ["/tiers/high/scaling/scaleUp"], id="zero-policy-period"),
    pytest.param(["tiers.high.scaling.idleReplicas=2"],
                 ["/tiers/high/scaling/idleReplicas"], id="idle-replicas-not-zero"),
    pytest.param(["tiers.high.backend=torch"], ["/tiers/high/backend"], id="unknown-backend"),
    pytest.param(["tiers.high.processor=deepfake"], ["/tiers/high/processor"],
                 id="unknown-processor"),
    pytest.param(["tiers.high.executionProviders=cuda;cpu"],
                 ["/tiers/high/executionProviders"], id="bad-providers"),
    pytest.param(["tiers.High_Tier.enabled=true"], ["/tiers", "High_Tier"],
                 id="invalid-tier-name"),
    pytest.param(["rabbitmq.managementUrl=http://guest:guest@rabbitmq:15672"],
                 ["/rabbitmq/managementUrl"], id="credentials-in-management-url"),
    pytest.param(["models.volume.type=nfs"], ["/models/volume/type"], id="unknown-model-volume"),
    # cross-field rules (templates/_validate.tpl): name the value and the fix
    pytest.param(["tiers.high.scaling.minReplicas=40"],
                 ["tiers.high.scaling.minReplicas (40) is above tiers.high.scaling.maxReplicas (32)",
                  "Fix: --set tiers.high.scaling.maxReplicas=40"], id="min-above-max-rejected"),
    pytest.param(["tiers.standard.scaling.activationJobs=2"],
                 ["tiers.standard.scaling.activationJobs (2) must be below "
                  "tiers.standard.scaling.jobsPerReplica (2)", "Fix:"],
                 id="activation-not-below-target"),
    pytest.param(["tiers.high.terminationGracePeriodSeconds=300"],
                 ["tiers.high.terminationGracePeriodSeconds (300) minus workers.drainMarginSeconds "
                  "(15) leaves a drain timeout (FACEFLEET_DRAIN_TIMEOUT_S) of 285 s, below "
                  "tiers.high.maxJobSeconds (600)",
                  "Fix: --set tiers.high.terminationGracePeriodSeconds=615"],
                 id="grace-below-max-job-time"),
    pytest.param(["workers.drainMarginSeconds=60", "tiers.high.terminationGracePeriodSeconds=630"],
                 ["tiers.high.terminationGracePeriodSeconds (630) minus workers.drainMarginSeconds "
                  "(60) leaves a drain timeout (FACEFLEET_DRAIN_TIMEOUT_S) of 570 s, below "
                  "tiers.high.maxJobSeconds (600)",
                  "Fix: --set tiers.high.terminationGracePeriodSeconds=660"],
                 id="grace-covers-job-but-not-job-plus-margin"),
    pytest.param(["workers.drainMarginSeconds=60",
                  "tiers.batch.terminationGracePeriodSeconds=3630"],
                 ["tiers.batch.terminationGracePeriodSeconds (3630) minus "
                  "workers.drainMarginSeconds (60) leaves a drain timeout", "of 3570 s",
                  "Fix: --set tiers.batch.terminationGracePeriodSeconds=3660"],
                 id="grace-rule-checks-scaledjob-tiers"),
    pytest.param(["workers.drainMarginSeconds=600"],
                 ["/workers/drainMarginSeconds", "maximum: got 600, want 300"],
                 id="drain-margin-above-bound"),
    pytest.param(["workers.drainMarginSeconds=-1"],
                 ["/workers/drainMarginSeconds", "minimum"], id="negative-drain-margin"),
    pytest.param(["tiers.high.prefetch=4"],
                 ["tiers.high.scaling.jobsPerReplica (1) is below tiers.high.prefetch x "
                  "tiers.high.pipelineDepth x tiers.high.batch (4)",
                  "Fix: --set tiers.high.scaling.jobsPerReplica=4"], id="target-below-prefetch"),
    pytest.param(["tiers.standard.prefetch=2", "tiers.standard.batch=8"],
                 ["tiers.standard.scaling.jobsPerReplica", "is below tiers.standard.prefetch x "
                  "tiers.standard.pipelineDepth x tiers.standard.batch (16)",
                  "Fix: --set tiers.standard.scaling.jobsPerReplica=16"],
                 id="target-below-prefetch-times-batch"),
    pytest.param(["tiers.standard.pipelineDepth=3"],
                 ["tiers.standard.scaling.jobsPerReplica (2) is below tiers.standard.prefetch x "
                  "tiers.standard.pipelineDepth x tiers.standard.batch (3)", "its AMQP prefetch",
                  "Fix: --set tiers.standard.scaling.jobsPerReplica=3"],
                 id="target-below-pipelined-prefetch"),
    pytest.param(["tiers.batch.prefetch=2", "tiers.batch.pipelineDepth=2", "tiers.batch.batch=2"],
                 ["tiers.batch.scaling.jobsPerReplica (1) is below", "(8)",
                  "Fix: --set tiers.batch.scaling.jobsPerReplica=8"],
                 id="target-below-prefetch-depth-batch-scaledjob"),
    # keeping the GPU busy: the worker's own bounds (facefleet.settings.WorkerSettings)
    pytest.param(["tiers.high.pipelineDepth=0"], ["/tiers/high/pipelineDepth", "minimum"],
                 id="depth-below-one"),
    pytest.param(["tiers.high.pipelineDepth=17"], ["/tiers/high/pipelineDepth", "maximum"],
                 id="depth-above-worker-bound"),
    pytest.param(["tiers.standard.instances=0"], ["/tiers/standard/instances", "minimum"],
                 id="zero-instances"),
    pytest.param(["tiers.batch.dynamicBatch=257"], ["/tiers/batch/dynamicBatch", "maximum"],
                 id="dynamic-batch-above-bound"),
    pytest.param(["tiers.high.batchDelayMs=-1"], ["/tiers/high/batchDelayMs", "minimum"],
                 id="negative-batch-delay"),
    pytest.param(["tiers.high.batchDelayMs=0.5"], ["/tiers/high/batchDelayMs", "want integer"],
                 id="fractional-batch-delay"),
    pytest.param(["tiers.high.pipelineDepth=deep"], ["/tiers/high/pipelineDepth", "want integer"],
                 id="depth-not-a-number"),
    # TensorRT (tiers.<tier>.tensorrt)
    pytest.param(["tiers.high.tensorrt.cache.type=nfs"], ["/tiers/high/tensorrt/cache/type"],
                 id="unknown-trt-cache-type"),
    pytest.param(["tiers.high.tensorrt.cache.existingClaim=Not_A_Name"],
                 ["/tiers/high/tensorrt/cache/existingClaim"], id="bad-trt-claim-name"),
    pytest.param(["tiers.high.tensorrt.cache.hostPath=relative/dir"],
                 ["/tiers/high/tensorrt/cache/hostPath"], id="relative-trt-host-path"),
    pytest.param(["tiers.high.tensorrt.engines=/x"],
                 ["/tiers/high/tensorrt", "'engines' not allowed"], id="unknown-trt-key"),
    pytest.param(["tiers.high.tensorrt.fp16=true"],
                 ["tiers.high.tensorrt.fp16=true: TensorRT is not in "
                  "tiers.high.executionProviders (cuda,cpu)", "would be ignored",
                  "Fix: --set tiers.high.executionProviders=tensorrt\\,cuda\\,cpu"],
                 id="trt-fp16-without-tensorrt"),
    pytest.param(["tiers.standard.tensorrt.cache.type=pvc",
                  "tiers.standard.tensorrt.cache.existingClaim=trt"],
                 ["tiers.standard.tensorrt.cache.type=pvc: TensorRT is not in "
                  "tiers.standard.executionProviders"], id="trt-cache-without-tensorrt"),
    pytest.param(["tiers.high.executionProviders=tensorrt\\,cuda\\,cpu",
                  "tiers.high.tensorrt.cache.type=pvc"],
                 ["tiers.high.tensorrt.cache.type=pvc needs "
                  "tiers.high.tensorrt.cache.existingClaim",
                  "Fix: --set tiers.high.tensorrt.cache.existingClaim=<pvc>"],
                 id="trt-pvc-without-claim"),
    pytest.param(["tiers.high.batch=0"], ["/tiers/high/batch", "minimum"], id="batch-below-one"),
    pytest.param(["tiers.standard.scaling.idleReplicas=0"],
                 ["tiers.standard.scaling.idleReplicas (0) needs tiers.standard.scaling.minReplicas >= 1"],
                 id="idle-replicas-with-min-zero"),
    pytest.param(["tiers.batch.scaling.idleReplicas=0"],
                 ["tiers.batch.scaling.idleReplicas is set but tiers.batch.mode is job"],
                 id="idle-replicas-on-scaledjob"),
    pytest.param(["tiers.batch.scaledJob.scalingStrategy=accurate"],
                 ["tiers.batch.scaledJob.scalingStrategy=accurate",
                  "Fix: --set tiers.batch.scaledJob.scalingStrategy=default"],
                 id="accurate-strategy-double-counts"),
    pytest.param(["tiers.batch.scaledJob.scalingStrategy=custom"],
                 ["tiers.batch.scaledJob.scalingStrategy=custom needs"], id="custom-without-knobs"),
    pytest.param(["tiers.high.enabled=false", "tiers.standard.enabled=false",
                  "tiers.batch.enabled=false"], ["tiers: no tier is enabled"], id="no-tier"),
    pytest.param(["tiers.standard-gpu-a100-80gb.enabled=true"], ["/tiers/standard-gpu-a100-80gb"],
                 id="incomplete-new-tier"),
    pytest.param(["secrets.create=true"],
                 ["secrets.values.amqpUrl is empty but secrets.create is true",
                  "secrets.values.rabbitmqPassword is empty"], id="created-secret-without-values"),
    pytest.param(["secrets.create=true", "secrets.existingSecret=mine"],
                 ["secrets.create is true and secrets.existingSecret is set"],
                 id="secret-both-ways"),
    pytest.param(["gateway.ingress.enabled=true"],
                 ["gateway.ingress.enabled is true but gateway.ingress.host is empty"],
                 id="ingress-without-host"),
    pytest.param(["rbac.create=false"],
                 ["tiers.high.podDeletionCost is true but rbac.create is false"],
                 id="deletion-cost-without-rbac"),
    pytest.param(["tests.tier=gold"], ["tests.tier=gold is not an enabled tier"],
                 id="test-tier-unknown"),
    pytest.param(["tests.source=file:///elsewhere/a.jpg"],
                 ["tests.source=file:///elsewhere/a.jpg is not under the data volume (file:///data/)",
                  "Fix: --set tests.source=file:///data/samples/helm-test/source.jpg"],
                 id="test-media-outside-data-root"),
    # media storage (storage.media, workers.fetch, workers.scratch)
    pytest.param(["storage.media.url=gs://bucket/prefix"],
                 ["storage.media.url=gs://bucket/prefix: use s3://bucket/prefix (an object store) "
                  "or file:///abs/path on the data volume",
                  "Fix: --set storage.media.url=s3://my-bucket/facefleet"],
                 id="media-url-unknown-scheme"),
    pytest.param(["storage.media.url=/data/media"],
                 ["storage.media.url=/data/media: use s3://bucket/prefix"],
                 id="media-url-bare-path"),
    pytest.param(["storage.media.url=s3://bucket/prefix"],
                 ["storage.media.url=s3://bucket/prefix needs credentials for the object store",
                  "Fix: --set storage.media.credentials.existingSecret=<Secret with keys "
                  "aws-access-key-id and aws-secret-access-key>",
                  "eks.amazonaws.com/role-arn) and --set "
                  "storage.media.credentials.fromServiceAccount=true"],
                 id="s3-without-credentials"),
    pytest.param(["storage.media.url=s3://bucket/prefix",
                  "gateway.serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/r"],
                 ["needs credentials for the object store",
                  "--set storage.media.credentials.fromServiceAccount=true"],
                 id="s3-annotation-without-fromServiceAccount"),
    pytest.param(["storage.media.url=s3://bucket/prefix",
                  "storage.media.credentials.existingSecret=media",
                  "storage.media.credentials.fromServiceAccount=true"],
                 ["storage.media.credentials.existingSecret (media) and "
                  "storage.media.credentials.fromServiceAccount are both set",
                  "Fix: --set storage.media.credentials.fromServiceAccount=false"],
                 id="s3-secret-and-workload-identity"),
    pytest.param(["storage.media.url=s3://My_Bucket/x", "storage.media.credentials.existingSecret=m"],
                 ['"My_Bucket" is not a valid S3 bucket name',
                  "Fix: --set storage.media.url=s3://my-bucket/facefleet"], id="s3-bad-bucket"),
    pytest.param(["storage.media.url=s3://bucket:9000/x", "storage.media.credentials.existingSecret=m"],
                 ['"bucket:9000" is not a valid S3 bucket name',
                  "the endpoint goes in storage.media.endpoint"], id="s3-port-in-url"),
    pytest.param(["storage.media.url=s3://bucket/a/../b", "storage.media.credentials.existingSecret=m"],
                 ['invalid key prefix "a/../b"', "Fix: --set storage.media.url=s3://bucket/facefleet"],
                 id="s3-dot-dot-prefix"),
    pytest.param(["storage.media.url=file:///srv/media"],
                 ["storage.media.url=file:///srv/media is not on the data volume (data.mountPath /data)",
                  "Fix: --set storage.media.url= (the data volume itself)"],
                 id="file-media-off-the-data-volume"),
    pytest.param(["storage.media.credentials.existingSecret=media"],
                 ['storage.media.credentials.existingSecret only apply to s3 media, but '
                  'storage.media.url is ""',
                  "Fix: --set storage.media.url=s3://bucket/prefix, or unset "
                  "storage.media.credentials.existingSecret"],
                 id="s3-credentials-without-s3-url"),
    pytest.param(["storage.media.endpoint=http://minio:9000", "storage.media.region=eu-west-1",
                  "storage.media.credentials.fromServiceAccount=true"],
                 ["storage.media.endpoint, storage.media.region, "
                  "storage.media.credentials.fromServiceAccount only apply to s3 media"],
                 id="s3-settings-without-s3-url"),
    pytest.param(["storage.media.url=s3://bucket/prefix", "storage.media.credentials.existingSecret=m",
                  "tests.target=file:///data/samples/helm-test/target.jpg"],
                 ["tests.target=file:///data/samples/helm-test/target.jpg is not in the media store "
                  "(s3://bucket/prefix/)",
                  "Fix: --set tests.target=s3://bucket/prefix/samples/helm-test/target.jpg"],
                 id="s3-test-media-outside-the-store"),
    pytest.param(["storage.media.url=file:///data/media",
                  "tests.source=file:///data/samples/helm-test/source.jpg"],
                 ["tests.source=file:///data/samples/helm-test/source.jpg is not under the data "
                  "volume (file:///data/media/)"],
                 id="file-test-media-outside-the-store"),
    pytest.param(["storage.media.endpoint=http://key:secret@minio:9000"],
                 ["/storage/media/endpoint", "does not match pattern"],
                 id="credentials-in-endpoint"),
    pytest.param(["storage.media.region=EU West"], ["/storage/media/region"], id="bad-region"),
    pytest.param(["storage.media.bucket=x"], ["/storage/media", "'bucket' not allowed"],
                 id="unknown-media-key"),
    pytest.param(["storage.media.credentials.existingSecret=Not_A_Name"],
                 ["/storage/media/credentials/existingSecret"], id="bad-secret-name"),
    pytest.param(["tests.source=https://example.com/a.jpg"], ["/tests/source"],
                 id="test-media-not-a-store-uri"),
    pytest.param(["workers.fetch.allow={10.0.0.0/8,a b}"], ["/workers/fetch/allow/1"],
                 id="fetch-allow-entry-with-space"),
    pytest.param(["workers.fetch.connectTimeoutSeconds=0"],
                 ["/workers/fetch/connectTimeoutSeconds", "exclusiveMinimum"],
                 id="fetch-zero-connect-timeout"),
    pytest.param(["workers.fetch.maxRedirects=-1"], ["/workers/fetch/maxRedirects", "minimum"],
                 id="fetch-negative-redirects"),
    pytest.param(["workers.scratch.sizeLimit=lots"], ["/workers/scratch/sizeLimit"],
                 id="bad-scratch-size"),
    # scaling triggers served by facefleet scaler
    pytest.param(["tiers.high.scaling.trigger=cpu"],
                 ["/tiers/high/scaling/trigger", "queueLength", "predictive"],
                 id="unknown-trigger"),
    pytest.param(["tiers.high.scaling.trigger=work", "tiers.high.scaling.waitObjectiveSeconds=0"],
                 ["/tiers/high/scaling/waitObjectiveSeconds", "minimum"],
                 id="zero-wait-objective"),
    pytest.param(["tiers.high.scaling.trigger=work", "scaler.enabled=false"],
                 ["tiers.high.scaling.trigger=work needs facefleet scaler, but scaler.enabled is "
                  "false", "Fix: --set scaler.enabled=null (runs it when a tier needs it) or "
                  "true, or --set tiers.high.scaling.trigger=queueLength"],
                 id="scaler-trigger-with-scaler-disabled"),
    pytest.param(["tiers.batch.scaling.trigger=latency"],
                 ["tiers.batch.scaling.trigger=latency but tiers.batch.mode is job",
                  "Fix: --set tiers.batch.scaling.trigger=queueLength, or --set "
                  "tiers.batch.mode=deployment"], id="scaler-trigger-on-scaledjob"),
    pytest.param(["tiers.high.scaling.trigger=work", "scaler.tls.clientSecretName=keda-client"],
                 ["scaler.tls.clientSecretName (keda-client) is set without "
                  "scaler.tls.secretName", "Fix: --set scaler.tls.secretName="],
                 id="mtls-without-server-tls"),
    pytest.param(["scaler.forecastDays=8"], ["/scaler/forecastDays", "maximum"],
                 id="forecast-days-beyond-the-stream"),
    pytest.param(["tiers.high.scaling.waitObjectiveSeconds=1.5"],
                 ["/tiers/high/scaling/waitObjectiveSeconds"], id="fractional-wait-objective"),
    pytest.param(["gateway.serviceAccount.annotations.x=1"],
                 ["/gateway/serviceAccount/annotations/x", "want string"],
                 id="non-string-sa-annotation"),
]  # fmt: skip


@pytest.mark.parametrize(("sets", "fragments"), REJECTED)
def test_bad_values_are_rejected(helm: Path, sets: list[str], fragments: list[str]) -> None:
    with pytest.raises(HelmError) as err:
        template(helm, sets=sets)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("sets", "fragments"),
    [
        pytest.param(["tiers.high.maxJobSeconds=-100"],
                     ["tiers.high.terminationGracePeriodSeconds (-70, derived) minus "
                      "workers.drainMarginSeconds (15) leaves a drain timeout "
                      "(FACEFLEET_DRAIN_TIMEOUT_S) of -85 s, not above 0",
                      "Fix: --set tiers.high.maxJobSeconds to the longest job time"],
                     id="negative-derived-drain-timeout"),
        pytest.param(["tiers.high.maxJobSeconds=0", "tiers.high.terminationGracePeriodSeconds=15"],
                     ["leaves a drain timeout (FACEFLEET_DRAIN_TIMEOUT_S) of 0 s, not above 0"],
                     id="zero-drain-timeout"),
        pytest.param(["tiers.high.scaling.trigger=cpu"],
                     ["tiers.high.scaling.trigger=cpu is not a scaling trigger",
                      "Fix: --set tiers.high.scaling.trigger=work, or --set "
                      "tiers.high.scaling.trigger=queueLength"], id="unknown-trigger-no-schema"),
        pytest.param(["tiers.high.scaling.trigger=work",
                      "tiers.high.scaling.waitObjectiveSeconds=-5"],
                     ["tiers.high.scaling.waitObjectiveSeconds (-5) must be above 0",
                      "Fix: --set tiers.high.scaling.waitObjectiveSeconds=60"],
                     id="negative-wait-objective-no-schema"),
        pytest.param(["tiers.high.scaling.trigger=predictive",
                      "tiers.high.scaling.startupSeconds=0"],
                     ["tiers.high.scaling.startupSeconds (0) must be above 0"],
                     id="zero-startup-no-schema"),
        pytest.param(["workers.drainMarginSeconds=600", "tiers.high.maxJobSeconds=10",
                      "tiers.high.terminationGracePeriodSeconds=300"],
                     ["of -300 s, below tiers.high.maxJobSeconds (10)",
                      "Fix: --set tiers.high.terminationGracePeriodSeconds=610"],
                     id="margin-above-grace"),
    ],
)  # fmt: skip
def test_grace_rule_holds_without_the_schema(
    helm: Path, sets: list[str], fragments: list[str]
) -> None:
    """The template rule (grace - drainMarginSeconds >= maxJobSeconds, and > 0) is checked on the
    rendered values on its own, even when `--skip-schema-validation` lets out-of-range values in."""
    with pytest.raises(HelmError) as err:
        template(helm, sets=sets, extra=["--skip-schema-validation"])
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_long_tier_name_is_explained(helm: Path, tmp_path: Path) -> None:
    """A tier name that would push KEDA's HPA name (keda-hpa-<workload>) past 63 characters."""
    base = yaml.safe_load((Path(__file__).parents[2] / "helm/facefleet/values.yaml").read_text())
    f = tmp_path / "long.yaml"
    f.write_text(yaml.safe_dump({
        "fullnameOverride": "facefleet-production-eu-west-1",
        "tiers": {"standard-a100-80gb": base["tiers"]["standard"]},
    }))  # fmt: skip
    with pytest.raises(HelmError) as err:
        template(helm, values_files=[str(f)])
    assert '"facefleet-production-eu-west-1-worker-standard-a100-80gb" is 56 characters' in str(
        err.value
    )
    assert "Fix: a shorter tier name" in str(err.value)
