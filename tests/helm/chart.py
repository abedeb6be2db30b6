"""Rendering helpers for the chart tests: run the real helm, load values as helm merges them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "facefleet"
CI_VALUES = REPO / "helm" / "ci"
KEDA_SCHEMAS = Path(__file__).resolve().parent / "keda-crds"
"""KEDA v2.20.2's CRDs, vendored with their source and licence (SOURCE.txt there)."""
RELEASE = "ff"
NAMESPACE = "facefleet-test"

sys.path.insert(0, str(REPO / "helm" / "tools"))
import fetch_helm  # noqa: E402


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """Skip locally, fail on CI."""
    if on_ci():
        pytest.fail(f"{what} (CI=true: required, not skipped)")
    pytest.skip(what)


def helm_binary() -> Path:
    """The fetched helm (once per machine); skips locally / fails on CI when unavailable."""
    try:
        return fetch_helm.fetch()
    except (fetch_helm.FetchError, OSError) as exc:
        missing(f"helm is not available: {exc}")
        raise  # unreachable: missing() raises


class HelmError(Exception):
    """helm exited non-zero; str() is its stderr."""


def run_helm(helm: Path, *args: str) -> str:
    proc = subprocess.run(
        [str(helm), *args], capture_output=True, text=True, check=False, timeout=120
    )
    if proc.returncode != 0:
        raise HelmError(proc.stderr)
    return proc.stdout


@cache
def _template(
    helm: Path, values_files: tuple[str, ...], sets: tuple[str, ...], extra: tuple[str, ...]
) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra]
    for f in values_files:
        args += ["-f", str(CI_VALUES / f) if not os.path.isabs(f) else f]
    for s in sets:
        args += ["--set", s]
    return run_helm(helm, *args)


def template(
    helm: Path,
    values_files: Sequence[str] = (),
    sets: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> str:
    """`helm template` output (cached per arguments: rendering is the slow part)."""
    return _template(helm, tuple(values_files), tuple(sets), tuple(extra))


def render(
    helm: Path, values_files: Sequence[str] = (), sets: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Rendered objects, empty documents dropped."""
    text = template(helm, values_files, sets)
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def load_values(*files: str) -> dict[str, Any]:
    """Chart defaults deep-merged with CI values files (as helm does, nulls included)."""
    merged: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in files:
        _merge(merged, yaml.safe_load((CI_VALUES / f).read_text()) or {})
    return merged


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
