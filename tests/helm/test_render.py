"""`helm template` over every CI values file, each object validated against the real schemas.

Built-in kinds: kubernetes-validate (strict: unknown fields are errors) for the oldest and newest
Kubernetes versions we support. KEDA kinds: jsonschema against the v2.20.2 CRDs in
tests/helm/keda-crds (vendored), plus what the API server would do that JSON Schema does not: the CEL rule
(min <= max) and pruning of undeclared fields (a pruned field is a silently lost setting).
Then the chart's own promises, tier by tier.
"""

from __future__ import annotations

import ast
import base64
import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

import facefleet.consumer.podcost as podcost
from facefleet.settings import CommonSettings
from tests.helm.chart import (
    CHART,
    KEDA_SCHEMAS,
    NAMESPACE,
    RELEASE,
    by_kind,
    load_values,
    render,
)

K8S_VERSIONS = ("1.29.0", "1.35.0")
KEDA_KINDS = {
    "ScaledObject": "keda.sh_scaledobjects.yaml",
    "ScaledJob": "keda.sh_scaledjobs.yaml",
    "TriggerAuthentication": "keda.sh_triggerauthentications.yaml",
}
PROMETHEUS_KINDS = {"ServiceMonitor"}
FULLNAME = f"{RELEASE}-facefleet"

VALUES_FILES = [
    pytest.param("defaults.yaml", id="defaults"),
    pytest.param("one-tier.yaml", id="one-tier-only"),
    pytest.param("all-scale-to-zero.yaml", id="all-scale-to-zero"),
    pytest.param("batch-scaledjob.yaml", id="batch-as-scaledjob"),
    pytest.param("mig.yaml", id="mig-tier"),
    pytest.param("existing-secret.yaml", id="existing-secret"),
    pytest.param("ingress.yaml", id="ingress-on"),
    pytest.param("s3-media.yaml", id="s3-media"),
    pytest.param("postgres-s3.yaml", id="postgres-s3-webhooks"),
    pytest.param("scaler-work.yaml", id="scaler-work-predictive-mtls"),
    pytest.param(str(CHART / "examples" / "values-cloudnativepg.yaml"), id="example-cloudnativepg"),
]


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    if not KEDA_SCHEMAS.is_dir():
        pytest.fail(f"KEDA CRDs not found in {KEDA_SCHEMAS}")
    crd = yaml.safe_load((KEDA_SCHEMAS / KEDA_KINDS[kind]).read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def pruned_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields a structural-schema API server would drop (not declared, not preserved)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or path == "/metadata":
        return []
    out: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                out += pruned_fields(value, props[key], f"{path}/{key}")
            elif isinstance(extra, dict):
                out += pruned_fields(value, extra, f"{path}/{key}")
            elif extra is not True:
                out.append(f"{path}/{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            out += pruned_fields(item, schema["items"], f"{path}/{i}")
    return out


# The one CEL rule of the KEDA CRDs (ScaledObject `spec`), verbatim; test_cel_rule_is_the_crds
# fails when the CRDs in tests/helm/keda-crds (vendored) say anything else, so cel_min_le_max must follow.
CEL_MIN_LE_MAX = (
    "!has(self.minReplicaCount) || self.minReplicaCount <= "
    "(has(self.maxReplicaCount) ? self.maxReplicaCount : 100)"
)


def cel_min_le_max(spec: dict[str, Any]) -> bool:
    """The ScaledObject CRD's CEL rule CEL_MIN_LE_MAX, evaluated by hand (JSON Schema tools
    ignore CEL)."""
    if "minReplicaCount" not in spec:
        return True
    return bool(spec["minReplicaCount"] <= spec.get("maxReplicaCount", 100))


def pod_specs(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for o in objs:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "Deployment":
            out.append((name, o["spec"]["template"]["spec"]))
        elif o["kind"] == "ScaledJob":
            out.append((name, o["spec"]["jobTargetRef"]["template"]["spec"]))
        elif o["kind"] == "Job":
            out.append((name, o["spec"]["template"]["spec"]))
        elif o["kind"] == "Pod":
            out.append((name, o["spec"]))
    return out


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def workloads(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Tier name -> its Deployment or ScaledJob."""
    out = {}
    for o in objs:
        if o["kind"] in ("Deployment", "ScaledJob") and "facefleet.io/tier" in o["metadata"].get(
            "labels", {}
        ):
            out[o["metadata"]["labels"]["facefleet.io/tier"]] = o
    return out


def worker_container(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    pod = (
        spec["jobTargetRef"]["template"]["spec"]
        if "jobTargetRef" in spec
        else spec["template"]["spec"]
    )
    return next(c for c in pod["containers"] if c["name"] == "worker")


def enabled_tiers(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in values["tiers"].items() if t["enabled"]}


# --- schema validation ------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_builtin_objects_match_kubernetes_schemas(helm: Path, values_file: str) -> None:
    objs = render(helm, [values_file])
    checked = 0
    for o in objs:
        if o["kind"] in KEDA_KINDS or o["kind"] in PROMETHEUS_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{o['kind']}/{o['metadata']['name']} (k8s {version}): {exc.message}")
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_keda_objects_match_crds(helm: Path, values_file: str) -> None:
    objs = [o for o in render(helm, [values_file]) if o["kind"] in KEDA_KINDS]
    assert by_kind(objs, "TriggerAuthentication"), "no TriggerAuthentication rendered"
    for o in objs:
        label = f"{o['kind']}/{o['metadata']['name']}"
        schema = crd_schema(o["kind"])
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(o), key=str)
        assert not errors, f"{label}: {[e.message for e in errors]}"
        assert not pruned_fields(o, schema), f"{label}: fields the API server would prune"
        if o["kind"] == "ScaledObject":
            assert cel_min_le_max(o["spec"]), f"{label}: CEL rule min <= max violated"


def test_crd_checks_can_fail() -> None:
    """The three KEDA checks above reject what they should (so a pass means something)."""
    so_schema = crd_schema("ScaledObject")
    bad_type = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {
            "scaleTargetRef": {"name": "x"},
            "triggers": [{"type": "rabbitmq", "metadata": {"value": 5}}],
        },
    }
    assert list(jsonschema.Draft7Validator(so_schema).iter_errors(bad_type))
    assert pruned_fields({"spec": {"scaleTargetRef": {"name": "x"}, "typo": 1}}, so_schema) == [
        "/spec/typo"
    ]
    assert not cel_min_le_max({"minReplicaCount": 5, "maxReplicaCount": 2})
    assert not cel_min_le_max({"minReplicaCount": 101})


def cel_rules(schema: Any, path: str = "") -> dict[str, list[str]]:
    """Schema path -> the `rule` of every x-kubernetes-validations entry below it."""
    out: dict[str, list[str]] = {}
    if isinstance(schema, dict):
        if "x-kubernetes-validations" in schema:
            out[path] = [v["rule"] for v in schema["x-kubernetes-validations"]]
        for key, value in schema.items():
            out.update(cel_rules(value, f"{path}/{key}"))
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            out.update(cel_rules(value, f"{path}/{i}"))
    return out


def test_cel_rule_is_the_crds() -> None:
    """cel_min_le_max re-implements CEL_MIN_LE_MAX by hand: a changed or added CEL rule in the
    CRDs must fail here, not pass unnoticed."""
    found = {kind: cel_rules(crd_schema(kind)) for kind in KEDA_KINDS}
    assert found == {
        "ScaledObject": {"/properties/spec": [CEL_MIN_LE_MAX]},
        "ScaledJob": {},
        "TriggerAuthentication": {},
    }
    # The hand evaluation agrees with the rule's four cases (has min?, has max?).
    assert cel_min_le_max({})
    assert cel_min_le_max({"maxReplicaCount": 0})
    assert cel_min_le_max({"minReplicaCount": 100}) and not cel_min_le_max({"minReplicaCount": 101})
    assert cel_min_le_max({"minReplicaCount": 3, "maxReplicaCount": 3})
    assert not cel_min_le_max({"minReplicaCount": 4, "maxReplicaCount": 3})


# --- the chart's promises ---------------------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_each_tier_scales_on_its_own_queue(helm: Path, values_file: str) -> None:
    objs = render(helm, [values_file])
    values = load_values(values_file)
    tiers = enabled_tiers(values)
    wl = workloads(objs)
    assert set(wl) == set(tiers)
    auth_names = {o["metadata"]["name"] for o in by_kind(objs, "TriggerAuthentication")}
    scaled = {o["metadata"]["name"]: o for o in by_kind(objs, "ScaledObject")}
    for name, tier in tiers.items():
        s = tier["scaling"]
        w = wl[name]
        expected_kind = "ScaledJob" if tier["mode"] == "job" else "Deployment"
        assert w["kind"] == expected_kind, name
        if expected_kind == "Deployment":
            assert "replicas" not in w["spec"], f"{name}: spec.replicas fights the HPA"
            so = scaled[w["metadata"]["name"]]
            assert so["spec"]["scaleTargetRef"] == {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": w["metadata"]["name"],
            }
            assert len(f"keda-hpa-{so['metadata']['name']}") <= 63
            assert so["spec"]["cooldownPeriod"] == s["cooldownPeriod"]
            if s.get("idleReplicas") is None:
                assert "idleReplicaCount" not in so["spec"]
            else:
                assert so["spec"]["idleReplicaCount"] == s["idleReplicas"]
            spec, triggers = so["spec"], so["spec"]["triggers"]
        else:
            spec, triggers = w["spec"], w["spec"]["triggers"]
            assert spec["rollout"] == {"strategy": "gradual"}
            assert spec["scalingStrategy"]["strategy"] == tier["scaledJob"]["scalingStrategy"]
            assert all("metricType" not in t for t in triggers)
            env = env_of(worker_container(w))
            assert env["FACEFLEET_MAX_JOBS"] == str(s["jobsPerReplica"])
        assert spec["minReplicaCount"] == s["minReplicas"]
        assert spec["maxReplicaCount"] == s["maxReplicas"]
        assert spec["pollingInterval"] == s["pollingInterval"]
        [trigger] = triggers
        meta = trigger["metadata"]
        if s["trigger"] != "queueLength":
            check_scaler_trigger(objs, values, name, trigger)
            continue
        assert trigger["type"] == "rabbitmq"
        assert meta["queueName"] == f"facefleet.jobs.{name}"
        assert meta["protocol"] == "http", "AMQP would not count unacknowledged jobs"
        assert meta["excludeUnacknowledged"] == "false"
        assert meta["mode"] == "QueueLength"
        assert float(meta["value"]) == s["jobsPerReplica"]
        assert float(meta["activationValue"]) == s["activationJobs"]
        assert "@" not in meta["host"], "credentials belong in the TriggerAuthentication"
        assert meta["host"] == values["rabbitmq"]["managementUrl"]
        assert trigger["authenticationRef"]["name"] in auth_names


def check_scaler_trigger(
    objs: list[dict[str, Any]], values: dict[str, Any], name: str, trigger: dict[str, Any]
) -> None:
    """An `external`/`external-push` trigger: it dials the scaler's Service, its metadata is what
    keda/scaling.py's params_from_metadata parses to the tier's values, and TLS material comes
    only from Secrets through a TriggerAuthentication."""
    from facefleet.keda.scaling import params_from_metadata

    s = values["tiers"][name]["scaling"]
    sc = values["scaler"]
    assert trigger["type"] == ("external-push" if sc["push"] else "external")
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "the CRD wants string metadata"
    [svc] = [o for o in by_kind(objs, "Service") if o["metadata"]["name"] == f"{FULLNAME}-scaler"]
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert meta["scalerAddress"] == f"{FULLNAME}-scaler.{NAMESPACE}.svc:{port}"
    assert meta["tier"] == name
    params = params_from_metadata(meta)
    assert params.trigger == s["trigger"]
    assert params.wait_objective_s == s["waitObjectiveSeconds"]
    if s["trigger"] == "predictive":
        assert params.startup_s == s["startupSeconds"]
    auth = trigger.get("authenticationRef")
    if not sc["tls"]["secretName"]:
        assert auth is None
        return
    [ta] = [o for o in by_kind(objs, "TriggerAuthentication")
            if o["metadata"]["name"] == auth["name"]]  # fmt: skip
    refs = {r["parameter"]: (r["name"], r["key"]) for r in ta["spec"]["secretTargetRef"]}
    expected = {"caCert": (sc["tls"]["secretName"], "ca.crt")}
    if sc["tls"]["clientSecretName"]:
        client = sc["tls"]["clientSecretName"]
        expected |= {"tlsClientCert": (client, "tls.crt"), "tlsClientKey": (client, "tls.key")}
    assert refs == expected


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_scaler_runs_when_a_tier_needs_it(
    helm: Path, values_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scaler Deployment exists iff a tier uses it (scaler.enabled null) and its environment
    is what `facefleet scaler` reads: parsed here by the product's own ScalerSettings."""
    from facefleet.settings import ScalerSettings

    objs = render(helm, [values_file])
    values = load_values(values_file)
    needed = any(t["scaling"]["trigger"] != "queueLength" for t in enabled_tiers(values).values())
    on = values["scaler"]["enabled"]
    deps = [o for o in by_kind(objs, "Deployment") if o["metadata"]["name"] == f"{FULLNAME}-scaler"]
    assert bool(deps) == (needed if on is None else on)
    if not deps:
        assert not [o for o in objs if o["metadata"]["name"].startswith(f"{FULLNAME}-scaler")]
        return
    [dep] = deps
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["args"] == ["facefleet", "scaler"]
    env = env_of(c)
    assert env["AMQP_URL"]["secretKeyRef"]["key"] == values["secrets"]["keys"]["amqpUrl"]
    for key, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("AMQP_URL", "amqp://u:p@rabbitmq:5672/%2F")
    settings = ScalerSettings.load()
    assert settings.scaler_host == "0.0.0.0"
    assert settings.scaler_port == values["scaler"]["port"]
    assert settings.scaler_forecast_days == values["scaler"]["forecastDays"]
    assert settings.management_url == values["rabbitmq"]["managementUrl"].rstrip("/")
    assert [t.name for t in settings.tiers()] == sorted(enabled_tiers(values))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": settings.scaler_port, "metrics": settings.health_port}
    tls = values["scaler"]["tls"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    if tls["secretName"]:
        assert settings.scaler_tls_cert is not None and settings.scaler_tls_key is not None
        mount = mounts[str(settings.scaler_tls_cert.parent)]
        assert mount["readOnly"] is True
        vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert vol["secret"]["secretName"] == tls["secretName"]
        assert (settings.scaler_tls_client_ca is not None) is bool(tls["clientSecretName"])
    else:
        assert settings.scaler_tls_cert is None and "FACEFLEET_SCALER_TLS_CLIENT_CA" not in env
    if values["networkPolicy"]["enabled"]:
        [np] = [o for o in by_kind(objs, "NetworkPolicy")
                if o["metadata"]["name"] == f"{FULLNAME}-scaler"]  # fmt: skip
        grpc_rule = next(r for r in np["spec"]["ingress"]
                         if r["ports"] == [{"port": settings.scaler_port, "protocol": "TCP"}])  # fmt: skip
        assert grpc_rule["from"] == values["scaler"]["kedaFrom"]


@pytest.mark.parametrize(
    ("sets", "pdb", "monitor"),
    [
        pytest.param([], True, True, id="scaler-work-has-both"),
        pytest.param(["scaler.podDisruptionBudget=false"], False, True, id="pdb-off"),
        pytest.param(["serviceMonitor.enabled=false"], True, False, id="monitor-off"),
        pytest.param(
            [
                "scaler.enabled=false",
                "tiers.high.scaling.trigger=queueLength",
                "tiers.standard.scaling.trigger=queueLength",
            ],
            False,
            False,
            id="no-scaler-neither",
        ),
    ],
)
def test_scaler_disruption_budget_and_monitor(
    helm: Path, sets: list[str], pdb: bool, monitor: bool
) -> None:
    """Like the gateway's: one scaler pod evicted at a time, its /metrics (9466) scraped."""
    objs = render(helm, ["scaler-work.yaml"], sets)
    name = f"{FULLNAME}-scaler"
    [budget] = [o for o in by_kind(objs, "PodDisruptionBudget")
                if o["metadata"]["name"] == name] or [None]  # fmt: skip
    [sm] = [o for o in by_kind(objs, "ServiceMonitor")
            if o["metadata"]["name"] == name] or [None]  # fmt: skip
    assert (budget is not None, sm is not None) == (pdb, monitor)
    deps = [o for o in by_kind(objs, "Deployment") if o["metadata"]["name"] == name]
    if budget is not None:
        [dep] = deps
        assert budget["spec"]["maxUnavailable"] == 1
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    if sm is not None:
        [svc] = [o for o in by_kind(objs, "Service") if o["metadata"]["name"] == name]
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        [endpoint] = sm["spec"]["endpoints"]
        [port] = [p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"]]
        assert (endpoint["path"], port["port"]) == ("/metrics", 9466)


def expected_policies(rules: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, kind in (("pods", "Pods"), ("percent", "Percent")):
        if rules.get(key) is not None:
            out.append({"type": kind, "value": rules[key], "periodSeconds": rules["periodSeconds"]})
    return out


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_hpa_behaviour_follows_values(helm: Path, values_file: str) -> None:
    objs = render(helm, [values_file])
    tiers = enabled_tiers(load_values(values_file))
    wl = workloads(objs)
    scaled = {o["metadata"]["name"]: o for o in by_kind(objs, "ScaledObject")}
    for name, tier in tiers.items():
        if tier["mode"] != "deployment":
            continue
        so = scaled[wl[name]["metadata"]["name"]]
        s = tier["scaling"]
        behavior = so["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
        behavior = behavior.get("behavior")
        if s.get("scaleUp") is None and s.get("scaleDown") is None:
            assert behavior is None, f"{name}: null/null must leave the HPA on legacy defaults"
            continue
        for direction in ("scaleUp", "scaleDown"):
            rules = s.get(direction)
            if rules is None:
                assert direction not in behavior
                continue
            got = behavior[direction]
            assert got["stabilizationWindowSeconds"] == rules["stabilizationWindowSeconds"]
            assert got["selectPolicy"] == rules["selectPolicy"]
            assert got.get("policies", []) == expected_policies(rules)


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_workers_follow_the_runtime_contract(helm: Path, values_file: str) -> None:
    objs = render(helm, [values_file])
    values = load_values(values_file)
    tiers = enabled_tiers(values)
    margin = values["workers"]["drainMarginSeconds"]
    for name, w in workloads(objs).items():
        tier = tiers[name]
        spec = w["spec"]
        pod = (
            spec["jobTargetRef"]["template"]["spec"]
            if "jobTargetRef" in spec
            else spec["template"]["spec"]
        )
        worker = worker_container(w)
        assert worker["args"] == [
            "facefleet", "worker", "--tier", name,
            "--processor", tier["processor"], "--backend", tier["backend"],
        ]  # fmt: skip
        grace = pod["terminationGracePeriodSeconds"]
        derived = tier["maxJobSeconds"] + margin + 15
        assert grace == (tier["terminationGracePeriodSeconds"] or derived)
        assert grace >= tier["maxJobSeconds"] + margin
        env = env_of(worker)
        assert env["AMQP_URL"]["secretKeyRef"]["key"] == values["secrets"]["keys"]["amqpUrl"]
        assert env["FACEFLEET_DRAIN_TIMEOUT_S"] == str(grace - margin)
        assert env["FACEFLEET_CONCURRENCY"] == str(tier["prefetch"])
        assert env["FACEFLEET_BATCH"] == str(tier["batch"])
        assert env["FACEFLEET_PIPELINE_DEPTH"] == str(tier["pipelineDepth"])
        assert env["FACEFLEET_INSTANCES"] == str(tier["instances"])
        assert env["FACEFLEET_DYNAMIC_BATCH"] == str(tier["dynamicBatch"])
        assert env["FACEFLEET_BATCH_DELAY_MS"] == str(tier["batchDelayMs"])
        # The AMQP prefetch the worker takes (concurrency x depth x batch) fits the trigger target.
        held = tier["prefetch"] * tier["pipelineDepth"] * tier["batch"]
        assert tier["scaling"]["jobsPerReplica"] >= held
        assert env["FACEFLEET_MODEL_DIR"] == "/models"
        no_data_volume = values["store"]["backend"] == "postgres" and values["storage"]["media"][
            "url"
        ].startswith("s3://")
        assert env.get("FACEFLEET_DATA_ROOT") == (
            None if no_data_volume else values["data"]["mountPath"]
        )
        assert env["FACEFLEET_HEALTH_HOST"] == "0.0.0.0"
        assert env["FACEFLEET_HEALTH_PORT"] == "9464"
        assert env["FACEFLEET_DELETION_COST"] == str(tier["podDeletionCost"]).lower()
        assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        # FACEFLEET_TIERS parses with the product's own settings code.
        specs = CommonSettings(FACEFLEET_TIERS=env["FACEFLEET_TIERS"]).tiers()
        assert [s.name for s in specs] == sorted(tiers)
        mine = next(s for s in specs if s.name == name)
        assert (mine.max_job_s, mine.max_length, mine.delivery_limit) == (
            tier["maxJobSeconds"], tier["maxLength"], tier["deliveryLimit"],
        )  # fmt: skip
        # Model volume: written by the init container, read-only for the worker.
        [init] = pod["initContainers"]
        assert init["image"] == worker["image"]
        assert init["args"][:3] == ["facefleet", "models", "pull"]
        assert init["args"][init["args"].index("--dest") + 1] == "/models"
        if values["models"]["baseUrl"]:
            assert init["args"][-2:] == ["--base-url", values["models"]["baseUrl"]]
        assert {m["mountPath"]: m.get("readOnly", False) for m in worker["volumeMounts"]}[
            "/models"
        ] is True
        volume = next(v for v in pod["volumes"] if v["name"] == "models")
        kind = values["models"]["volume"]["type"]
        assert {"pvc": "persistentVolumeClaim"}.get(kind, kind) in volume
        # Probes and GPU.
        assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
        gpu = tier["gpu"]
        if gpu["count"]:
            assert worker["resources"]["limits"][gpu["resource"]] == gpu["count"]
        assert pod.get("priorityClassName") == (tier["priorityClassName"] or None)
        assert pod.get("tolerations", []) == tier["tolerations"]
        assert pod["automountServiceAccountToken"] is tier["podDeletionCost"]


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_pods_are_locked_down(helm: Path, values_file: str) -> None:
    for label, pod in pod_specs(render(helm, [values_file])):
        assert pod["securityContext"]["runAsNonRoot"] is True, label
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c["securityContext"]
            where = f"{label}/{c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["runAsNonRoot"] is True, where
            assert "memory" in c["resources"]["limits"], where


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_selectors_and_ports_line_up(helm: Path, values_file: str) -> None:
    objs = render(helm, [values_file])
    pods = [(o["spec"]["template"]["metadata"]["labels"], o["spec"]["template"]["spec"])
            for o in by_kind(objs, "Deployment")]  # fmt: skip

    def matching(selector: dict[str, str]) -> list[dict[str, Any]]:
        return [spec for labels, spec in pods if selector.items() <= labels.items()]

    for pdb in by_kind(objs, "PodDisruptionBudget"):
        assert matching(pdb["spec"]["selector"]["matchLabels"]), pdb["metadata"]["name"]
    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    for svc in services.values():
        targets = {p["targetPort"] for p in svc["spec"]["ports"]}
        specs = matching(svc["spec"]["selector"])
        assert specs or svc["spec"].get("clusterIP") == "None", svc["metadata"]["name"]
        for spec in specs:
            names = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
            assert targets <= names, svc["metadata"]["name"]
    for sm in by_kind(objs, "ServiceMonitor"):
        selected = [s for s in services.values()
                    if sm["spec"]["selector"]["matchLabels"].items()
                    <= s["metadata"]["labels"].items()]  # fmt: skip
        assert selected, sm["metadata"]["name"]
        ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= ports
    for np in by_kind(objs, "NetworkPolicy"):
        specs = matching(np["spec"]["podSelector"]["matchLabels"])
        open_ports = {p["port"] for rule in np["spec"].get("ingress", []) for p in rule["ports"]}
        container_ports = {p["containerPort"] for s in specs for c in s["containers"]
                           for p in c.get("ports", [])}  # fmt: skip
        assert open_ports <= container_ports or not specs, np["metadata"]["name"]


@pytest.mark.parametrize(
    "sets",
    [
        pytest.param(["workers.drainMarginSeconds=60"], id="margin-60"),
        pytest.param(["workers.drainMarginSeconds=0"], id="margin-0"),
        pytest.param(["workers.drainMarginSeconds=300", "tiers.high.maxJobSeconds=10",
                      "tiers.standard.maxJobSeconds=1"], id="margin-300-short-jobs"),
    ],
)  # fmt: skip
def test_derived_drain_timeout_covers_the_longest_job(helm: Path, sets: list[str]) -> None:
    """Whatever workers.drainMarginSeconds is, a derived grace period leaves the worker a drain
    timeout (grace - margin) of at least maxJobSeconds: the grace grows with the margin."""
    given = dict(s.split("=") for s in sets)
    margin = int(given["workers.drainMarginSeconds"])
    max_job = {
        name: int(given.get(f"tiers.{name}.maxJobSeconds", tier["maxJobSeconds"]))
        for name, tier in enabled_tiers(load_values()).items()
    }
    wl = workloads(render(helm, sets=sets))
    assert set(wl) == set(max_job)
    for name, w in wl.items():
        spec = w["spec"]
        pod = spec["jobTargetRef"]["template"] if "jobTargetRef" in spec else spec["template"]
        grace = pod["spec"]["terminationGracePeriodSeconds"]
        drain = int(env_of(worker_container(w))["FACEFLEET_DRAIN_TIMEOUT_S"])
        assert grace == max_job[name] + margin + 15, name
        assert drain == grace - margin, name
        assert drain >= max_job[name] and drain > 0, (name, drain)


def test_role_allows_only_patch_on_pods(helm: Path) -> None:
    objs = render(helm, ["defaults.yaml"])
    [role] = by_kind(objs, "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]
    [binding] = by_kind(objs, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{FULLNAME}-worker", "namespace": NAMESPACE}
    ]
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
    assert not by_kind(render(helm, ["one-tier.yaml"]), "Role"), "no Role when no tier needs it"


# kubernetes.client.CoreV1Api method prefix -> the RBAC verb it needs.
CLIENT_VERBS = {"read_": "get", "list_": "list", "patch_": "patch", "replace_": "update",
                "create_": "create", "delete_": "delete"}  # fmt: skip


def test_role_verbs_are_what_podcost_calls(helm: Path) -> None:
    """The Role grants the verbs of the API calls consumer/podcost.py makes, no more: it reaches
    the API only through its PodPatcher protocol (mypy-checked), and only its own module calls
    those methods."""
    members = {n for n in vars(podcost.PodPatcher) if n.endswith("_namespaced_pod")}
    source = Path(podcost.__file__).read_text()
    called = {
        node.func.attr
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr.endswith("_namespaced_pod")
    }
    assert called == members == {"patch_namespaced_pod"}
    verbs = {v for prefix, v in CLIENT_VERBS.items() for m in called if m.startswith(prefix)}
    [role] = by_kind(render(helm, ["defaults.yaml"]), "Role")
    [rule] = role["rules"]
    assert set(rule["verbs"]) == verbs


@pytest.mark.parametrize(
    ("values_file", "secret_names", "created"),
    [
        pytest.param("defaults.yaml", {FULLNAME}, False, id="default-secret-expected"),
        pytest.param(
            "existing-secret.yaml",
            {"facefleet-prod-credentials"},
            False,
            id="existing-secret-referenced",
        ),
        pytest.param("ingress.yaml", {FULLNAME}, True, id="chart-created-secret"),
        pytest.param(
            "s3-media.yaml", {FULLNAME, "facefleet-media-s3"}, False, id="s3-media-key-pair"
        ),
        pytest.param(
            "postgres-s3.yaml",
            {FULLNAME, "facefleet-media-s3", "facefleet-store"},
            False,
            id="postgres-store-url",
        ),
    ],
)
def test_secrets_stay_in_secrets(
    helm: Path, values_file: str, secret_names: set[str], created: bool
) -> None:
    objs = render(helm, [values_file])
    secrets = by_kind(objs, "Secret")
    assert [s["metadata"]["name"] for s in secrets] == ([FULLNAME] if created else [])
    referenced = set()
    for _, pod in pod_specs(objs):
        for c in pod["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add(ref["name"])
    for auth in by_kind(objs, "TriggerAuthentication"):
        referenced |= {r["name"] for r in auth["spec"]["secretTargetRef"]}
    assert referenced == secret_names
    if created:
        # Values left empty are generated (or, like webhookSecret, unused here).
        plain = {k: v for k, v in load_values(values_file)["secrets"]["values"].items() if v}
        [secret] = secrets
        decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert set(plain.values()) <= set(decoded.values())
        others = yaml.safe_dump_all([o for o in objs if o["kind"] != "Secret"])
        for value in plain.values():
            assert value not in others, "a secret value leaked outside the Secret"


def test_test_hook_submits_to_a_warm_tier(helm: Path) -> None:
    objs = render(helm, ["defaults.yaml"])
    [pod] = by_kind(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = env_of(pod["spec"]["containers"][0])
    assert env["TIER"] == "high"  # the first enabled tier with minReplicas > 0
    script = pod["spec"]["containers"][0]["args"][-1]
    assert 'facefleet submit --tier "$TIER"' in script and "--wait --json" in script
    assert env["SOURCE_URI"].startswith("file:///data/")
    [pod] = by_kind(render(helm, ["all-scale-to-zero.yaml"]), "Pod")
    assert env_of(pod["spec"]["containers"][0])["TIER"] == "batch"  # none warm: first enabled


def test_priority_classes_and_notes(helm: Path) -> None:
    classes = {
        o["metadata"]["name"]: o for o in by_kind(render(helm, ["defaults.yaml"]), "PriorityClass")
    }
    assert set(classes) == {"facefleet-high", "facefleet-standard", "facefleet-batch"}
    assert classes["facefleet-batch"]["preemptionPolicy"] == "Never"
    assert classes["facefleet-batch"]["value"] < 0 < classes["facefleet-high"]["value"]
    assert not by_kind(render(helm, ["existing-secret.yaml"]), "PriorityClass")


def test_scale_up_defaults_drain_the_reference_spike() -> None:
    """Defaults of `high` against the agreed scenario, with a crude capacity bound: arrivals jump
    10 -> 200 jobs/min of 6 s jobs, 90 s pod start-up; the ~300 jobs that pile up meanwhile must
    be gone within 5 minutes. (The simulator in keda/ models it exactly; this guards the numbers.)
    """
    tier = load_values()["tiers"]["high"]
    s = tier["scaling"]
    per_pod_per_min = tier["prefetch"] * 60 / 6
    backlog, arrivals, window_min, startup_min = 300, 200, 5.0, 1.5
    # pods reachable: the HPA adds max(pods, percent) per period from 1 replica
    replicas, t = s["minReplicas"], 0.0
    while replicas < s["maxReplicas"] and t < 60:
        step = max(
            s["scaleUp"]["pods"] or 0, math.ceil(replicas * (s["scaleUp"]["percent"] or 0) / 100)
        )
        replicas = min(s["maxReplicas"], replicas + step)
        t += s["scaleUp"]["periodSeconds"]
    assert replicas == s["maxReplicas"], "max not reachable within a minute"
    useful_min = window_min - startup_min - (t + s["pollingInterval"]) / 60
    surplus = s["maxReplicas"] * per_pod_per_min - arrivals
    assert surplus * useful_min >= backlog, (surplus, useful_min)


def test_fullname_truncation_keeps_hpa_names_valid(helm: Path) -> None:
    long_release = "a" * 53
    from tests.helm.chart import CHART, run_helm

    out = run_helm(helm, "template", long_release, str(CHART))
    for o in yaml.safe_load_all(out):
        if o and o["kind"] == "ScaledObject":
            assert len("keda-hpa-" + o["metadata"]["name"]) <= 63
            assert len(o["metadata"]["name"]) <= 54
    assert json.dumps(out)  # rendered, no failure
