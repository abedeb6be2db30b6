"""The base install is the producer SDK and CLI: build the wheel and the sdist, install the wheel
without extras in a clean venv, submit and watch a job with it (a worker from the dev install
runs it), and fail if a heavy dependency sneaks in or a top-level name other than `facefleet`
ships."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import Env

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]

HEAVY = {
    "onnxruntime",
    "onnxruntime-gpu",
    "opencv-python",
    "opencv-python-headless",
    "av",
    "kubernetes",
    "matplotlib",
    "insightface",
    "torch",
    "fastapi",
    "uvicorn",
    "grpcio",
    "numpy",
    "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-http",
}
"""Distributions the base install must not pull (the worker's, the gateway's, the simulator's,
the scaler's)."""


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    [wheel] = out.glob("*.whl")
    [sdist] = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory, dists: dict[str, Path]) -> Path:
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    done = subprocess.run([*pip, str(dists["wheel"])], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def test_the_wheel_ships_one_top_level_package(dists: dict[str, Path]) -> None:
    names = zipfile.ZipFile(dists["wheel"]).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"facefleet"}
    for sub in ("consumer/runner.py", "producer/sdk.py", "models/catalog.yaml", "keda/cli.py"):
        assert f"facefleet/{sub}" in names


def test_the_sdist_carries_the_sources_under_the_namespace(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert {"pyproject.toml", "facefleet/wire.py"} <= members
    assert any(m.startswith("facefleet/consumer/") or m.startswith("consumer/") for m in members)


def test_the_base_install_pulls_no_heavy_dependency(light_venv: Path) -> None:
    listed = subprocess.run(
        [str(light_venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert "facefleet" in installed
    assert not (installed & HEAVY), f"heavy dependencies in the base install: {installed & HEAVY}"


def test_a_light_install_submits_and_watches_a_job(light_venv: Path, env: Env) -> None:
    """The SDK's CLI from the light venv, the worker from the dev install (its extras)."""
    cli = str(light_venv / "bin" / "facefleet")
    photo = env.data_root / "in.bin"
    photo.write_bytes(b"payload")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [cli, *args], env=env.vars(), capture_output=True, text=True, timeout=120
        )

    assert run("topology", "apply").returncode == 0
    env.start_worker()
    sub = run(*env.submit_args(str(photo), str(photo), "sleep_s=0.2"), "--json")
    assert sub.returncode == 0, sub.stderr
    job_id = json.loads(sub.stdout)["job_id"]
    watched = run("watch", job_id, "--json")
    assert watched.returncode == 0, watched.stderr
    kinds = [json.loads(line)["type"] for line in watched.stdout.splitlines()]
    assert kinds[0] == "queued" and kinds[-1] == "completed"
    # what needs an extra says which one, instead of an ImportError trace
    for command, extra in (("gateway", "gateway"), ("scaler", "scaler")):
        refused = run(command)
        assert refused.returncode == 2, refused.stderr
        assert f"facefleet[{extra}]" in refused.stderr
