"""Media storage in the chart (`storage.media`): file media on the data volume (the default,
rendered exactly as before) or s3 media in an object store, where the gateway and the test pod
mount no data volume, workers keep it for job state and get a scratch emptyDir, and credentials
come from a Secret (secretKeyRef only) or the pods' workload identity.

The rendered environment is loaded with the product's own settings code (facefleet.settings,
facefleet.media, facefleet.fetch), so the chart cannot hand a process something it refuses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from facefleet.fetch import parse_allow
from facefleet.media import open_media_store
from facefleet.settings import ProducerSettings, WorkerSettings
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
ROLE_ARN = "arn:aws:iam::123456789012:role/facefleet-media"
IRSA = "eks.amazonaws.com/role-arn"
AWS_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_ONLY_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", *AWS_SECRET_ENV)
SCRATCH = "/scratch"


@dataclass(frozen=True)
class MediaCase:
    """One way to configure media, and what every pod must then look like."""

    files: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    media_url: str | None = None  # FACEFLEET_MEDIA_URL; None: not set (the processes' default)
    s3: bool = False
    endpoint: str | None = None
    region: str | None = None
    secret: str | None = None  # the key pair's Secret; None: no AWS_ACCESS_KEY_ID at all
    secret_keys: tuple[str, str] = ("aws-access-key-id", "aws-secret-access-key")
    scratch_limit: str = "20Gi"
    fetch_env: dict[str, str] = field(default_factory=dict)
    sa_annotations: dict[str, str] = field(default_factory=dict)


MEDIA_CASES = [
    pytest.param(MediaCase(), id="file-default"),
    pytest.param(
        MediaCase(
            sets=(
                "workers.fetch.allow={10.0.0.0/8,minio.internal:9000}",
                "workers.fetch.readTimeoutSeconds=45",
                "workers.fetch.maxRedirects=0",
            ),
            fetch_env={
                "FACEFLEET_FETCH_ALLOW": "10.0.0.0/8,minio.internal:9000",
                "FACEFLEET_FETCH_READ_TIMEOUT_S": "45",
                "FACEFLEET_FETCH_MAX_REDIRECTS": "0",
            },
        ),
        id="file-media-fetch-settings-by-set",
    ),
    pytest.param(
        MediaCase(sets=("storage.media.url=file:///data/media",), media_url="file:///data/media"),
        id="file-explicit-on-data-volume",
    ),
    pytest.param(
        MediaCase(
            files=("s3-media.yaml",),
            media_url="s3://facefleet-media/prod",
            s3=True,
            endpoint="http://minio.storage.svc:9000",
            region="eu-west-1",
            secret="facefleet-media-s3",
            scratch_limit="50Gi",
            fetch_env={
                "FACEFLEET_FETCH_ALLOW": "10.20.0.0/16,files.internal.example.com:8443",
                "FACEFLEET_FETCH_CONNECT_TIMEOUT_S": "5",
                "FACEFLEET_FETCH_READ_TIMEOUT_S": "30",
                "FACEFLEET_FETCH_MAX_REDIRECTS": "2",
            },
        ),
        id="s3-ci-file-secret-endpoint-region-fetch",
    ),
    pytest.param(
        MediaCase(
            sets=(
                "storage.media.url=s3://bucket/prefix",
                "storage.media.credentials.existingSecret=x",
            ),
            media_url="s3://bucket/prefix",
            s3=True,
            secret="x",
        ),
        id="s3-upgrade-style-set",
    ),
    pytest.param(
        MediaCase(
            sets=(
                "storage.media.url=s3://bucket",
                "storage.media.credentials.existingSecret=media",
                "storage.media.credentials.keys.accessKeyId=AK",
                "storage.media.credentials.keys.secretAccessKey=SK",
                "workers.scratch.sizeLimit=8Gi",
            ),
            media_url="s3://bucket",
            s3=True,
            secret="media",
            secret_keys=("AK", "SK"),
            scratch_limit="8Gi",
        ),
        id="s3-bucket-root-custom-keys",
    ),
    pytest.param(
        MediaCase(
            sets=(
                "storage.media.url=s3://bucket/prefix",
                "storage.media.region=us-east-1",
                "storage.media.credentials.fromServiceAccount=true",
                f"gateway.serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn={ROLE_ARN}",
                f"workers.serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn={ROLE_ARN}",
            ),
            media_url="s3://bucket/prefix",
            s3=True,
            region="us-east-1",
            sa_annotations={IRSA: ROLE_ARN},
        ),
        id="s3-workload-identity",
    ),
]


def objects(helm: Path, case: MediaCase) -> list[dict[str, Any]]:
    return render(helm, list(case.files), list(case.sets))


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]
    if obj["kind"] == "Pod":
        return spec
    template: dict[str, Any] = (
        spec["jobTargetRef"]["template"] if obj["kind"] == "ScaledJob" else spec["template"]
    )
    pod: dict[str, Any] = template["spec"]
    return pod


def named(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in by_kind(objs, kind) if o["metadata"]["name"] == name)


def gateway_pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return pod_spec(named(objs, "Deployment", f"{FULLNAME}-gateway"))


def worker_pods(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: pod_spec(o)
        for o in objs
        if o["kind"] in ("Deployment", "ScaledJob")
        and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "worker"
    }


def submit_pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The `helm test` pod."""
    [pod] = by_kind(objs, "Pod")
    return pod_spec(pod)


def container(pod: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    return next(c for c in pod["containers"] if name is None or c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def mounts(c: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}


def volumes(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod.get("volumes", [])}


def check_media_env(env: dict[str, Any], case: MediaCase) -> None:
    """FACEFLEET_MEDIA_URL and the AWS variables one media-touching process must get."""
    assert env.get("FACEFLEET_MEDIA_URL") == case.media_url
    assert env.get("AWS_ENDPOINT_URL") == case.endpoint
    assert env.get("AWS_REGION") == case.region
    assert env.get("AWS_DEFAULT_REGION") == case.region
    if case.secret is None:
        assert not set(AWS_SECRET_ENV) & set(env)
    else:
        for name, key in zip(AWS_SECRET_ENV, case.secret_keys, strict=True):
            assert env[name] == {"secretKeyRef": {"name": case.secret, "key": key}}, name
    if not case.s3:
        assert not set(S3_ONLY_ENV) & set(env)


def plain_env(env: dict[str, Any]) -> dict[str, str]:
    """The literal values of an env (secretKeyRef and fieldRef entries left out)."""
    return {k: v for k, v in env.items() if isinstance(v, str)}


def load_settings(
    monkeypatch: pytest.MonkeyPatch, cls: type[ProducerSettings] | type[WorkerSettings], env: Any
) -> Any:
    """The settings object the product builds from this rendered env (literal values only)."""
    for name in list(os.environ):
        if name.startswith(("FACEFLEET_", "AWS_")) or name in ("AMQP_URL", "POD_NAME"):
            monkeypatch.delenv(name, raising=False)
    for name, value in plain_env(env).items():
        monkeypatch.setenv(name, value)
    return cls.load()


# --- every media configuration, pod by pod ------------------------------------------------------


@pytest.mark.parametrize("case", MEDIA_CASES)
def test_gateway_mounts_the_data_volume_only_with_file_media(helm: Path, case: MediaCase) -> None:
    objs = objects(helm, case)
    pod = gateway_pod(objs)
    gateway = container(pod, "gateway")
    env = env_of(gateway)
    check_media_env(env, case)
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes(pod).values()
              if "persistentVolumeClaim" in v}  # fmt: skip
    if case.s3:
        assert "FACEFLEET_DATA_ROOT" not in env
        assert "data" not in mounts(gateway) and not claims, "s3 media: no data volume"
    else:
        assert env["FACEFLEET_DATA_ROOT"] == "/data"
        assert mounts(gateway)["data"] == "/data"
        assert claims == {f"{FULLNAME}-data"}
    assert mounts(gateway)["tmp"] == "/tmp"
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("case", MEDIA_CASES)
def test_gateway_env_is_accepted_by_the_product(
    helm: Path, case: MediaCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = env_of(container(gateway_pod(objects(helm, case)), "gateway"))
    settings = load_settings(monkeypatch, ProducerSettings, env)
    store = settings.media_store()
    assert store.url == (case.media_url or "file:///data").rstrip("/")


@pytest.mark.parametrize("case", MEDIA_CASES)
def test_workers_keep_job_state_and_get_scratch_with_s3(helm: Path, case: MediaCase) -> None:
    pods = worker_pods(objects(helm, case))
    assert len(pods) == 3, sorted(pods)  # high, standard (Deployments), batch (ScaledJob)
    for name, pod in pods.items():
        worker = container(pod, "worker")
        env = env_of(worker)
        check_media_env(env, case)
        # Job state stays on the (ReadWriteMany) data volume whatever the media store.
        assert env["FACEFLEET_DATA_ROOT"] == "/data", name
        assert mounts(worker)["data"] == "/data", name
        assert volumes(pod)["data"]["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-data"
        if case.s3:
            assert env["FACEFLEET_SCRATCH_DIR"] == SCRATCH, name
            assert mounts(worker)["scratch"] == SCRATCH, name
            assert volumes(pod)["scratch"] == {
                "name": "scratch",
                "emptyDir": {"sizeLimit": case.scratch_limit},
            }, name
        else:
            assert "FACEFLEET_SCRATCH_DIR" not in env, name
            assert "scratch" not in volumes(pod) and "scratch" not in mounts(worker), name
        fetch = {k: v for k, v in env.items() if k.startswith("FACEFLEET_FETCH_")}
        assert fetch == case.fetch_env, name
        # The model-pull init container touches no media.
        [init] = pod["initContainers"]
        assert not {"FACEFLEET_MEDIA_URL", *S3_ONLY_ENV} & set(env_of(init)), name


@pytest.mark.parametrize("case", MEDIA_CASES)
def test_worker_env_is_accepted_by_the_product(
    helm: Path, case: MediaCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, pod in worker_pods(objects(helm, case)).items():
        env = env_of(container(pod, "worker"))
        settings = load_settings(monkeypatch, WorkerSettings, env)
        assert settings.media_store().url == (case.media_url or "file:///data").rstrip("/")
        assert len(parse_allow(settings.fetch_allow)) == len(
            [e for e in case.fetch_env.get("FACEFLEET_FETCH_ALLOW", "").split(",") if e]
        ), name
        if case.s3:
            assert settings.scratch_dir == Path(SCRATCH)


@pytest.mark.parametrize("case", MEDIA_CASES)
def test_test_pod_submits_from_the_media_store(helm: Path, case: MediaCase) -> None:
    objs = objects(helm, case)
    pod = submit_pod(objs)
    submit = container(pod)
    env = env_of(submit)
    check_media_env(env, case)
    root = (case.media_url or "file:///data").rstrip("/")
    assert env["SOURCE_URI"] == f"{root}/samples/helm-test/source.jpg"
    assert env["TARGET_URI"] == f"{root}/samples/helm-test/target.jpg"
    script = submit["args"][-1]
    if case.s3:
        assert "FACEFLEET_DATA_ROOT" not in env and "data" not in volumes(pod)
        assert "[ ! -f" not in script, "objects are not files: no local check"
    else:
        assert env["FACEFLEET_DATA_ROOT"] == "/data" and "data" in volumes(pod)
        assert "[ ! -f" in script
    identity = case.s3 and case.secret is None
    assert pod.get("serviceAccountName") == (f"{FULLNAME}-worker" if identity else None)
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("case", MEDIA_CASES)
def test_service_accounts_carry_the_workload_identity(helm: Path, case: MediaCase) -> None:
    objs = objects(helm, case)
    for name in (f"{FULLNAME}-gateway", f"{FULLNAME}-worker"):
        sa = named(objs, "ServiceAccount", name)
        assert sa["metadata"].get("annotations", {}) == case.sa_annotations, name
        assert sa["automountServiceAccountToken"] is False, name


@pytest.mark.parametrize("case", MEDIA_CASES)
def test_data_pvc_stays_for_job_state(helm: Path, case: MediaCase) -> None:
    """With s3 media and the file job store (the default) the ReadWriteMany data PVC is still
    rendered: workers keep job state on it (with the PostgreSQL store it goes: test_store.py)."""
    [pvc] = [p for p in by_kind(objects(helm, case), "PersistentVolumeClaim")
             if p["metadata"]["name"] == f"{FULLNAME}-data"]  # fmt: skip
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_default_values_render_as_before(helm: Path) -> None:
    """Without storage.media nothing changes: no media variable, no AWS variable, no scratch, no
    fetch setting in any pod (keda/manifests, rendered with the defaults, pins the rest byte for
    byte: tests/helm/test_chart_files.py::test_plain_manifests_match_the_chart)."""
    text = template(helm)
    for word in (
        "FACEFLEET_MEDIA_URL",
        "AWS_",
        "FACEFLEET_SCRATCH_DIR",
        "FACEFLEET_FETCH_",
        "scratch",
        "eks.amazonaws.com",
    ):
        assert word not in text, word
    manifests = "".join(p.read_text() for p in (REPO / "keda" / "manifests").glob("*.yaml"))
    assert "FACEFLEET_MEDIA_URL" not in manifests and "scratch" not in manifests


# --- notes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "expected", "absent"),
    [
        pytest.param([], ["kubectl cp source.jpg <pod>:/data/samples/helm-test/source.jpg"],
                     ["aws s3 cp", "Media live in"], id="file-media"),
        pytest.param(["storage.media.url=s3://bucket/prefix",
                      "storage.media.endpoint=http://minio:9000",
                      "storage.media.credentials.existingSecret=media-keys"],
                     ["Media live in s3://bucket/prefix (endpoint http://minio:9000)",
                      "create secret generic media-keys",
                      "--from-literal=aws-access-key-id=ACCESS_KEY_ID",
                      "aws s3 cp source.jpg s3://bucket/prefix/samples/helm-test/source.jpg "
                      "--endpoint-url http://minio:9000"],
                     ["kubectl cp"], id="s3-secret"),
        pytest.param(["storage.media.url=s3://bucket/prefix",
                      "storage.media.credentials.fromServiceAccount=true"],
                     ["Credentials come from the pods' workload identity",
                      "ff-facefleet-gateway and ff-facefleet-worker"],
                     ["aws-access-key-id", "kubectl cp"], id="s3-workload-identity"),
    ],
)  # fmt: skip
def test_notes_say_where_the_samples_go(
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


# --- the URL rule agrees with the product ---------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "s3://bucket",
        "s3://bucket/",
        "s3://bucket/a/b",
        "s3://bucket//a",
        "s3://my.bucket-1/facefleet",
        "s3://Bucket/x",
        "s3://bu/x",
        "s3://bucket:9000/x",
        "s3://user:pw@bucket/x",
        "s3://192.168.0.1/x",
        "s3://a..b/x",
        "s3://a.-b/x",
        "s3://bucket/a/../b",
        "s3://bucket/a//b",
        "s3://bucket/./a",
        "s3://bucket/a?x=1",
        "s3://bucket#frag",
        "gs://bucket/x",
        "https://bucket.s3.amazonaws.com/x",
    ],
)
def test_url_rule_matches_the_product(helm: Path, url: str) -> None:
    """The chart accepts an s3 URL exactly when facefleet.media.open_media_store does, so a bad
    URL stops the render instead of crash-looping every pod."""
    try:
        open_media_store(url)
    except ValueError:
        product_ok = False
    else:
        product_ok = True
    try:
        template(helm, sets=[f"storage.media.url={url}",
                             "storage.media.credentials.existingSecret=x"])  # fmt: skip
    except HelmError as exc:
        assert "storage.media.url" in str(exc), str(exc)
        chart_ok = False
    else:
        chart_ok = True
    assert chart_ok is product_ok


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        pytest.param("file:///data", True, id="the-data-volume"),
        pytest.param("file:///data/", True, id="trailing-slash"),
        pytest.param("file:///data/media", True, id="below-the-mount"),
        pytest.param("file:///database", False, id="prefix-is-not-a-parent"),
        pytest.param("file:///data/../etc", False, id="dot-dot-escapes"),
        pytest.param("file:///srv/media", False, id="elsewhere"),
        pytest.param("file://host/data", False, id="remote-host"),
    ],
)
def test_file_media_must_be_on_the_data_volume(helm: Path, url: str, ok: bool) -> None:
    if ok:
        open_media_store(url)  # the product accepts it too
        template(helm, sets=[f"storage.media.url={url}"])
        return
    with pytest.raises(HelmError) as err:
        template(helm, sets=[f"storage.media.url={url}"])
    assert "storage.media.url" in str(err.value) and "Fix:" in str(err.value)


def test_credentials_in_the_url_are_never_echoed(helm: Path) -> None:
    for url in ("s3://AKIAEXAMPLE:s3cr3t-pw@bucket/x", "https://AKIAEXAMPLE:s3cr3t-pw@host/x"):
        with pytest.raises(HelmError) as err:
            template(helm, sets=[f"storage.media.url={url}",
                                 "storage.media.credentials.existingSecret=x"])  # fmt: skip
        message = str(err.value)
        assert "storage.media.url" in message and "Fix:" in message
        assert "s3cr3t-pw" not in message and "AKIAEXAMPLE" not in message, message
