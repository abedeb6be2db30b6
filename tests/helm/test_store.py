"""The job store in the chart (`store`), the migration hook and the webhooks Deployment.

`store.backend: file` (the default) keeps job state in journals on the ReadWriteMany data volume,
rendered exactly as before. `store.backend: postgres` gives workers, gateway, webhooks and the
pre-install/pre-upgrade migration Job `FACEFLEET_STORE_URL` from a Secret (secretKeyRef only);
with s3 media on top nothing needs the data volume: no PVC at all, no data mount, no
FACEFLEET_DATA_ROOT. `webhooks.enabled` adds `facefleet webhooks`, a Deployment of its own.
"""

from __future__ import annotations

import base64
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from facefleet.fetch import parse_allow
from tests.helm.chart import (
    CHART,
    REPO,
    HelmError,
    by_kind,
    render,
    run_helm,
    template,
)

FULLNAME = "ff-facefleet"
EXAMPLE = CHART / "examples" / "values-cloudnativepg.yaml"
MIGRATE = f"{FULLNAME}-store-migrate"
WEBHOOKS = f"{FULLNAME}-webhooks"
HOOK_EVENTS = "pre-install,pre-upgrade"
HOOK_DELETE = "before-hook-creation,hook-succeeded"
PG_S3 = ("storage.media.url=s3://bucket/prefix", "storage.media.credentials.existingSecret=m")


@dataclass(frozen=True)
class StoreCase:
    """One way to configure job state, media and webhooks, and what must then be rendered."""

    files: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    store_secret: str | None = None  # the store URL's Secret; None: the file store
    url_key: str = "store-url"
    s3: bool = False
    webhooks: bool = False
    migrate: bool = True  # with the PostgreSQL store
    fetch_allow: str | None = None  # webhooks' FACEFLEET_FETCH_ALLOW
    service_monitor: bool = False

    @property
    def postgres(self) -> bool:
        return self.store_secret is not None

    @property
    def data_volume(self) -> bool:
        """The data PVC exists: job state (file store) or media (file media) need it."""
        return not (self.postgres and self.s3)


STORE_CASES = [
    pytest.param(StoreCase(), id="file-store-file-media-default"),
    pytest.param(StoreCase(files=("s3-media.yaml",), s3=True), id="file-store-s3-media"),
    pytest.param(
        StoreCase(sets=("webhooks.enabled=true",), webhooks=True), id="file-store-webhooks"
    ),
    pytest.param(
        StoreCase(sets=("store.backend=postgres", "store.existingSecret=pg"), store_secret="pg"),
        id="postgres-file-media-keeps-data-volume",
    ),
    pytest.param(
        StoreCase(
            files=("postgres-s3.yaml",),
            store_secret="facefleet-store",
            s3=True,
            webhooks=True,
            fetch_allow="10.30.0.0/16,hooks.internal.example.com:8443",
            service_monitor=True,
        ),
        id="postgres-s3-ci-file-no-rwx",
    ),
    pytest.param(
        StoreCase(
            files=(str(EXAMPLE),),
            store_secret="facefleet-db-app",
            url_key="uri",
            s3=True,
            webhooks=True,
        ),
        id="example-cloudnativepg",
    ),
    pytest.param(
        StoreCase(
            sets=(
                "store.backend=postgres",
                "store.existingSecret=db",
                "store.urlKey=dsn",
                "store.migrate.enabled=false",
                *PG_S3,
            ),
            store_secret="db",
            url_key="dsn",
            s3=True,
            migrate=False,
        ),
        id="postgres-s3-custom-key-migrate-off",
    ),
]


def objects(helm: Path, case: StoreCase) -> list[dict[str, Any]]:
    return render(helm, list(case.files), list(case.sets))


def named(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next((o for o in by_kind(objs, kind) if o["metadata"]["name"] == name), None)


def pod_of(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]
    if obj["kind"] == "Pod":
        return spec
    tpl = spec["jobTargetRef"]["template"] if obj["kind"] == "ScaledJob" else spec["template"]
    pod: dict[str, Any] = tpl["spec"]
    return pod


def component_pods(objs: list[dict[str, Any]], component: str) -> dict[str, dict[str, Any]]:
    """Pod specs of one component (worker, gateway, webhooks, store-migrate, test), by object."""
    return {
        f"{o['kind']}/{o['metadata']['name']}": pod_of(o)
        for o in objs
        if o["kind"] in ("Deployment", "ScaledJob", "Job", "Pod")
        and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
    }


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def mounts(c: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}


def volumes(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod.get("volumes", [])}


def main_container(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["containers"][0]
    return container


# --- volumes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", STORE_CASES)
def test_data_volume_only_where_something_needs_it(helm: Path, case: StoreCase) -> None:
    objs = objects(helm, case)
    pvcs = {p["metadata"]["name"] for p in by_kind(objs, "PersistentVolumeClaim")}
    assert pvcs == ({f"{FULLNAME}-data"} if case.data_volume else set())
    # Who needs the data volume: workers for job state (file store) or media (file media), the
    # gateway and the test pod for file media, webhooks for job state (file store).
    needs = {
        "worker": case.data_volume,
        "gateway": not case.s3,
        "test": not case.s3,
        "webhooks": not case.postgres,
        "store-migrate": False,
    }
    seen = set()
    for component, expected in needs.items():
        for label, pod in component_pods(objs, component).items():
            seen.add(component)
            c = main_container(pod)
            env = env_of(c)
            claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes(pod).values()
                      if "persistentVolumeClaim" in v}  # fmt: skip
            if expected:
                assert env["FACEFLEET_DATA_ROOT"] == "/data", label
                assert mounts(c)["data"] == "/data", label
                assert claims == {f"{FULLNAME}-data"}, label
            else:
                assert "FACEFLEET_DATA_ROOT" not in env, label
                assert "data" not in mounts(c) and "data" not in volumes(pod), label
                assert not claims, f"{label}: no ReadWriteMany claim"
            assert mounts(c)["tmp"] == "/tmp", label
    assert {"worker", "gateway", "test"} <= seen
    assert ("webhooks" in seen) is case.webhooks
    assert ("store-migrate" in seen) is (case.postgres and case.migrate)


@pytest.mark.parametrize("case", STORE_CASES)
def test_workers_keep_models_and_scratch(helm: Path, case: StoreCase) -> None:
    """Without the data volume a worker still has its model volume (per pod by default), its
    scratch emptyDir (s3 media) and /tmp."""
    for label, pod in component_pods(objects(helm, case), "worker").items():
        worker = next(c for c in pod["containers"] if c["name"] == "worker")
        assert mounts(worker)["models"] == "/models", label
        assert "emptyDir" in volumes(pod)["models"], label
        assert ("scratch" in volumes(pod)) is case.s3, label
        assert (env_of(worker).get("FACEFLEET_SCRATCH_DIR") == "/scratch") is case.s3, label


# --- the store URL --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", STORE_CASES)
def test_store_url_comes_from_the_secret(helm: Path, case: StoreCase) -> None:
    objs = objects(helm, case)
    components = ["worker", "gateway", "webhooks", "store-migrate"]
    for component in components:
        for label, pod in component_pods(objs, component).items():
            for c in pod.get("initContainers", []) + pod["containers"]:
                env = env_of(c)
                if case.postgres and c["name"] != "models-pull":
                    assert env["FACEFLEET_STORE_URL"] == {
                        "secretKeyRef": {"name": case.store_secret, "key": case.url_key}
                    }, f"{label}/{c['name']}"
                else:
                    assert "FACEFLEET_STORE_URL" not in env, f"{label}/{c['name']}"
    # The helm test pod submits and follows events through the broker: no store.
    for label, pod in component_pods(objs, "test").items():
        assert "FACEFLEET_STORE_URL" not in env_of(main_container(pod)), label
    text = template(helm, list(case.files), list(case.sets))
    assert "postgresql://" not in text, "a store URL must never be a plain value"


# --- migration hook -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", STORE_CASES)
def test_migration_hook_job(helm: Path, case: StoreCase) -> None:
    objs = objects(helm, case)
    job = named(objs, "Job", MIGRATE)
    sa = named(objs, "ServiceAccount", MIGRATE)
    if not (case.postgres and case.migrate):
        assert job is None and sa is None
        return
    assert job is not None and sa is not None
    for obj in (job, sa):
        ann = obj["metadata"]["annotations"]
        assert ann["helm.sh/hook"] == HOOK_EVENTS, obj["kind"]
        assert ann["helm.sh/hook-delete-policy"] == HOOK_DELETE, obj["kind"]
    # The hook's own ServiceAccount is created first: the chart's do not exist yet on install.
    weight = {
        o["kind"]: int(o["metadata"]["annotations"]["helm.sh/hook-weight"]) for o in (job, sa)
    }
    assert weight["ServiceAccount"] < weight["Job"]
    assert sa["automountServiceAccountToken"] is False
    spec = job["spec"]
    assert spec["backoffLimit"] == 3 and spec["activeDeadlineSeconds"] == 240
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == MIGRATE
    assert pod["automountServiceAccountToken"] is False
    [c] = pod["containers"]
    assert c["args"] == ["facefleet", "store", "migrate"]
    assert c["image"].startswith("ghcr.io/facefleet/producer:")
    assert c["resources"]["limits"]["memory"] == "256Mi"
    assert set(env_of(c)) == {"FACEFLEET_STORE_URL", "FACEFLEET_LOG_LEVEL"}, "no broker, no keys"
    # The default-deny NetworkPolicy covers the hook's pod (it needs no ingress).
    [deny] = [n for n in by_kind(objs, "NetworkPolicy") if n["metadata"]["name"].endswith("-deny")]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert deny["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_helm_runs_the_migration_as_a_hook(helm: Path) -> None:
    """helm itself files the Job and its ServiceAccount under HOOKS (run before the release's
    objects), not under MANIFEST."""
    out = run_helm(helm, "install", "ff", str(CHART), "--dry-run=client", "-n", "demo",
                   "-f", str(REPO / "helm" / "ci" / "postgres-s3.yaml"))  # fmt: skip
    hooks, manifest = (
        out[out.index("HOOKS:") : out.index("MANIFEST:")],
        out[out.index("MANIFEST:") :],
    )
    for path in ("store/migrate-job.yaml", "store/migrate-serviceaccount.yaml"):
        assert f"# Source: facefleet/templates/{path}" in hooks, path
        assert path not in manifest, path


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        pytest.param(["store.migrate.backoffLimit=0", "store.migrate.activeDeadlineSeconds=60",
                      "store.migrate.resources.limits.memory=1Gi"],
                     {"backoffLimit": 0, "activeDeadlineSeconds": 60, "memory": "1Gi"},
                     id="hook-settings"),
    ],
)  # fmt: skip
def test_migration_hook_settings_land(
    helm: Path, sets: list[str], expected: dict[str, Any]
) -> None:
    objs = render(helm, sets=["store.backend=postgres", "store.existingSecret=pg", *sets])
    job = named(objs, "Job", MIGRATE)
    assert job is not None
    assert job["spec"]["backoffLimit"] == expected["backoffLimit"]
    assert job["spec"]["activeDeadlineSeconds"] == expected["activeDeadlineSeconds"]
    [c] = job["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["memory"] == expected["memory"]


# --- webhooks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", STORE_CASES)
def test_webhooks_deployment(helm: Path, case: StoreCase) -> None:
    objs = objects(helm, case)
    dep = named(objs, "Deployment", WEBHOOKS)
    others = [named(objs, kind, WEBHOOKS) for kind in
              ("ServiceAccount", "PodDisruptionBudget", "NetworkPolicy")]  # fmt: skip
    if not case.webhooks:
        assert dep is None and others == [None, None, None]
        assert named(objs, "ServiceMonitor", WEBHOOKS) is None
        return
    assert dep is not None and None not in others
    sa, pdb, netpol = others
    assert sa is not None and pdb is not None and netpol is not None
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == WEBHOOKS and pod["automountServiceAccountToken"] is False
    assert sa["automountServiceAccountToken"] is False
    [c] = pod["containers"]
    assert c["args"] == ["facefleet", "webhooks"]
    assert c["image"].startswith("ghcr.io/facefleet/producer:")
    env = env_of(c)
    assert env["AMQP_URL"] == {"secretKeyRef": {"name": FULLNAME, "key": "amqp-url"}}
    assert env["FACEFLEET_WEBHOOK_SECRET"] == {
        "secretKeyRef": {"name": FULLNAME, "key": "webhook-secret"}
    }
    assert env["FACEFLEET_HEALTH_HOST"] == "0.0.0.0" and env["FACEFLEET_HEALTH_PORT"] == "9464"
    assert env.get("FACEFLEET_FETCH_ALLOW") == case.fetch_allow
    if case.fetch_allow:
        assert len(parse_allow(case.fetch_allow)) == len(case.fetch_allow.split(","))
    assert not {k for k in env if k.startswith("AWS_")}, "webhooks touch no media"
    [port] = c["ports"]
    assert (port["name"], port["containerPort"]) == ("metrics", 9464)
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "webhooks"
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    assert netpol["spec"]["podSelector"]["matchLabels"] == selector
    [rule] = netpol["spec"]["ingress"]
    assert rule["ports"] == [{"port": 9464, "protocol": "TCP"}]
    assert rule["from"][0] == {"podSelector": {}}
    monitor = named(objs, "ServiceMonitor", WEBHOOKS)
    assert (monitor is not None) is case.service_monitor
    if monitor is not None:
        svc = named(objs, "Service", f"{WEBHOOKS}-metrics")
        assert svc is not None and svc["spec"]["selector"] == selector
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


TEST_WHSEC = "whsec_" + base64.b64encode(b"k" * 32).decode()


WEBHOOK_CASES = [
    p for p in STORE_CASES if isinstance(p.values[0], StoreCase) and p.values[0].webhooks
]


@pytest.mark.parametrize("case", WEBHOOK_CASES)
def test_webhooks_env_is_accepted_by_the_product(
    helm: Path, case: StoreCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rendered environment, with a test secret where the Secret would be, is one the
    product's own WebhookSettings accepts: health on the probed port, on all interfaces."""
    settings_module = importlib.import_module("facefleet.settings")
    webhook_settings = getattr(settings_module, "WebhookSettings", None)
    if webhook_settings is None:
        pytest.skip("facefleet.settings.WebhookSettings not there yet")
    dep = named(objects(helm, case), "Deployment", WEBHOOKS)
    assert dep is not None
    env = env_of(main_container(dep["spec"]["template"]["spec"]))
    for name in list(os.environ):
        if name.startswith(("FACEFLEET_", "AWS_")) or name == "AMQP_URL":
            monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("FACEFLEET_WEBHOOK_SECRET", TEST_WHSEC)
    settings = webhook_settings.load()
    assert (settings.health_host, settings.health_port) == ("0.0.0.0", 9464)
    assert settings.fetch_allow == (case.fetch_allow or "")
    drain = webhook_settings.model_fields["webhook_drain_timeout_s"].default
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain, "POSTs in flight must finish before SIGKILL"


@pytest.mark.parametrize(
    ("sets", "replicas", "pdb"),
    [
        pytest.param(["webhooks.enabled=true"], 2, True, id="defaults"),
        pytest.param(["webhooks.enabled=true", "webhooks.replicas=5",
                      "webhooks.podDisruptionBudget=false"], 5, False, id="replicas-no-pdb"),
    ],
)  # fmt: skip
def test_webhooks_settings_land(helm: Path, sets: list[str], replicas: int, pdb: bool) -> None:
    objs = render(helm, sets=sets)
    dep = named(objs, "Deployment", WEBHOOKS)
    assert dep is not None and dep["spec"]["replicas"] == replicas
    assert (named(objs, "PodDisruptionBudget", WEBHOOKS) is not None) is pdb


WHSEC = re.compile(r"^whsec_([A-Za-z0-9+/]+={0,2})( whsec_[A-Za-z0-9+/]+={0,2})*$")


@pytest.mark.parametrize(
    ("sets", "given"),
    [
        pytest.param([], None, id="generated"),
        pytest.param(["secrets.values.webhookSecret=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
                     "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", id="given"),
        pytest.param([f"secrets.values.webhookSecret={TEST_WHSEC} "
                      "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
                     f"{TEST_WHSEC} whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", id="rotation-two"),
    ],
)  # fmt: skip
def test_chart_created_secret_holds_the_webhook_secret(
    helm: Path, sets: list[str], given: str | None
) -> None:
    base = ["secrets.create=true", "secrets.values.amqpUrl=amqp://u:p@rabbitmq:5672/%2F",
            "secrets.values.rabbitmqUsername=keda", "secrets.values.rabbitmqPassword=pw"]  # fmt: skip
    [secret] = by_kind(render(helm, sets=[*base, "webhooks.enabled=true", *sets]), "Secret")
    value = base64.b64decode(secret["data"]["webhook-secret"]).decode()
    match = WHSEC.match(value)
    assert match, value
    assert len(base64.b64decode(match[1])) >= 24, "Standard Webhooks: 24..64 key bytes"
    if given:
        assert value == given
    # Without webhooks the chart's Secret is as before: no webhook key.
    [secret] = by_kind(render(helm, sets=base), "Secret")
    assert "webhook-secret" not in secret["data"]


# --- validation -----------------------------------------------------------------------------------


REJECTED = [
    pytest.param(["store.backend=postgres"],
                 ["store.backend=postgres needs store.existingSecret",
                  "key store.urlKey (store-url) holds the postgresql://",
                  "session-mode", "Fix: kubectl -n facefleet-test create secret generic "
                  "facefleet-store --from-literal=store-url='postgresql://...' and --set "
                  "store.existingSecret=facefleet-store"],
                 id="postgres-without-secret"),
    pytest.param(["store.backend=postgres", "store.urlKey=uri"],
                 ["store.urlKey (uri)", "--from-literal=uri="], id="postgres-without-secret-key"),
    pytest.param(["store.backend=mysql"], ["/store/backend", "'file', 'postgres'"],
                 id="unknown-backend-schema"),
    pytest.param(["store.existingSecret=pg"],
                 ["store.existingSecret (pg) only applies to store.backend=postgres",
                  "Fix: --set store.backend=postgres, or --set store.existingSecret="],
                 id="store-secret-with-file-store"),
    pytest.param(["store.backend=postgres", "store.existingSecret=pg", "data.existingClaim=old",
                  *PG_S3],
                 ["data.existingClaim (old) is set, but with store.backend=postgres and s3 media "
                  "nothing mounts the data volume", "Fix: --set data.existingClaim="],
                 id="unused-existing-claim"),
    pytest.param(["store.existingSecret=Not_A_Name"], ["/store/existingSecret"],
                 id="bad-store-secret-name"),
    pytest.param(["store.urlKey=a b"], ["/store/urlKey"], id="bad-url-key"),
    pytest.param(["store.url=postgresql://u:p@h/db"], ["/store", "'url' not allowed"],
                 id="no-plain-store-url"),
    pytest.param(["store.migrate.backoffLimit=-1"], ["/store/migrate/backoffLimit", "minimum"],
                 id="negative-backoff"),
    pytest.param(["store.migrate.activeDeadlineSeconds=0"],
                 ["/store/migrate/activeDeadlineSeconds", "minimum"], id="zero-deadline"),
    pytest.param(["webhooks.replicas=0"], ["/webhooks/replicas", "minimum"],
                 id="zero-webhooks-replicas"),
    pytest.param(["webhooks.fetch.allow={10.0.0.0/8,a b}"], ["/webhooks/fetch/allow/1"],
                 id="webhooks-allow-entry-with-space"),
    pytest.param(["webhooks.replicaCount=3"], ["/webhooks", "'replicaCount' not allowed"],
                 id="unknown-webhooks-key"),
    pytest.param(["secrets.values.webhookSecret=hunter2"], ["/secrets/values/webhookSecret"],
                 id="webhook-secret-not-whsec"),
    pytest.param(["webhooks.terminationGracePeriodSeconds=0"],
                 ["/webhooks/terminationGracePeriodSeconds", "minimum"], id="zero-webhooks-grace"),
]  # fmt: skip


@pytest.mark.parametrize(("sets", "fragments"), REJECTED)
def test_bad_values_are_rejected(helm: Path, sets: list[str], fragments: list[str]) -> None:
    with pytest.raises(HelmError) as err:
        template(helm, sets=sets)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_backend_is_explained_without_the_schema(helm: Path) -> None:
    """The template rule names the fix even when --skip-schema-validation lets the value in."""
    with pytest.raises(HelmError) as err:
        template(helm, sets=["store.backend=mysql"], extra=["--skip-schema-validation"])
    message = str(err.value)
    assert "store.backend=mysql is not a job store: use file" in message, message
    assert "Fix: --set store.backend=file, or --set store.backend=postgres" in message


# --- defaults and examples ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets",
    [
        pytest.param(["store.backend=file"], id="file-store-explicit"),
        pytest.param(["webhooks.enabled=false", "store.migrate.enabled=false"],
                     id="webhooks-and-migrate-off"),
        pytest.param(["store.urlKey=uri", "webhooks.replicas=4"], id="unused-settings"),
    ],
)  # fmt: skip
def test_default_values_render_as_before(helm: Path, sets: list[str]) -> None:
    """The file store and no webhooks are the defaults, rendered as before this feature (the
    plain manifests in keda/manifests pin the defaults byte for byte:
    test_chart_files.py::test_plain_manifests_match_the_chart)."""
    default = template(helm)
    assert template(helm, sets=sets) == default
    manifests = "".join(p.read_text() for p in (REPO / "keda" / "manifests").glob("*.yaml"))
    for text in (default, manifests):
        for word in ("FACEFLEET_STORE_URL", "webhook", "store-migrate", "helm.sh/hook: pre-"):
            assert word not in text, word
        assert "kind: PersistentVolumeClaim" in text


def test_example_values_are_installable(helm: Path) -> None:
    out = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(EXAMPLE))
    assert "0 chart(s) failed" in out and "[WARNING]" not in out, out
    objs = render(helm, [str(EXAMPLE)])
    assert not by_kind(objs, "PersistentVolumeClaim")
    assert named(objs, "Deployment", WEBHOOKS) is not None
    assert named(objs, "Job", MIGRATE) is not None


# --- notes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "expected", "absent"),
    [
        pytest.param([], [], ["PostgreSQL", "webhook", "store migrate"], id="defaults"),
        pytest.param(["store.backend=postgres", "store.existingSecret=pg", *PG_S3],
                     ["Job state lives in PostgreSQL", "key store-url of Secret pg",
                      "create secret generic pg \\\n    --from-literal=store-url='postgresql://",
                      "session-mode pooler", "runs as hook Job ff-facefleet-store-migrate",
                      "no data PVC is rendered"],
                     ["webhook"], id="postgres-s3"),
        pytest.param(["store.backend=postgres", "store.existingSecret=pg",
                      "store.migrate.enabled=false"],
                     ["run `facefleet store migrate` yourself"],
                     ["no data PVC", "hook Job"], id="postgres-migrate-off"),
        pytest.param(["webhooks.enabled=true"],
                     ['--from-literal=webhook-secret="whsec_$(openssl rand -base64 32)"',
                      "Webhooks: Deployment ff-facefleet-webhooks (2 replicas)",
                      "key webhook-secret of Secret ff-facefleet"],
                     ["PostgreSQL"], id="webhooks"),
    ],
)  # fmt: skip
def test_notes_say_where_job_state_lives(
    helm: Path, sets: list[str], expected: list[str], absent: list[str]
) -> None:
    args = ["install", "ff", str(CHART), "--dry-run=client", "-n", "demo"]
    for s in sets:
        args += ["--set", s]
    out = run_helm(helm, *args)
    notes = out[out.index("NOTES:") :]
    for text in expected:
        assert text in notes, notes
    for text in absent:
        assert text not in notes, notes
