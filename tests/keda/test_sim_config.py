"""Reading `tiers.<tier>` from Helm values: merge order, behavior defaulting (keda.md §4.1),
validation ranges (§7) and the chart's cross-field rules (helm/facefleet/templates/_validate.tpl)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from facefleet.keda.simulator.config import (
    BUILTIN_TIERS,
    BUILTIN_VALUES,
    DEFAULT_DOWN,
    DEFAULT_UP,
    ConfigError,
    Policy,
    ScalingRules,
    chart_defaults_path,
    load_tier,
)

NO_CHART = Path("/nonexistent/values.yaml")
CHART = chart_defaults_path()


def _values(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _project(doc: Any, shape: Any) -> Any:
    """The part of `doc` with the keys of `shape` (a missing key reads as a marker)."""
    if isinstance(shape, dict) and isinstance(doc, dict):
        return {k: _project(doc.get(k, "<missing>"), v) for k, v in shape.items()}
    return doc


def test_builtin_defaults_equal_chart_values() -> None:
    """The fallback (no chart file beside the package) is the chart: same keys, same values,
    and the same TierConfig for every tier."""
    chart = yaml.safe_load(CHART.read_text(encoding="utf-8"))
    assert set(BUILTIN_TIERS) == set(chart["tiers"])
    assert _project(chart, BUILTIN_VALUES) == BUILTIN_VALUES
    for name in BUILTIN_TIERS:
        assert load_tier(None, name, chart_defaults=NO_CHART) == load_tier(None, name)
    high = load_tier(None, "high", chart_defaults=NO_CHART)
    assert (high.min_replicas, high.max_replicas, high.jobs_per_replica) == (1, 32, 1.0)
    assert (high.grace_s, high.drain_timeout_s) == (630, 615)  # 600 + 15 + 15; 630 - 15
    assert high.behavior is not None
    assert high.behavior.up == ScalingRules(
        0, "Max", (Policy("Pods", 8, 15), Policy("Percent", 100, 15))
    )
    assert high.behavior.down == ScalingRules(120, "Max", (Policy("Percent", 50, 60),))
    assert load_tier(None, "batch", chart_defaults=NO_CHART).strategy == "default"


@pytest.mark.parametrize(
    ("yaml_text", "grace", "drain"),
    [
        # facefleet.gracePeriod: maxJobSeconds + drainMarginSeconds + 15; drain = grace - margin.
        pytest.param("", 630, 615, id="derived-grace-600-plus-15-plus-15"),
        pytest.param(
            "workers: {drainMarginSeconds: 60}\n", 675, 615, id="derived-grace-grows-with-margin"
        ),
        pytest.param(
            "workers: {drainMarginSeconds: 60}\ntiers:\n  high: {terminationGracePeriodSeconds: 700}",
            700,
            640,
            id="explicit-grace-minus-margin-is-drain-timeout",
        ),
    ],
)
def test_grace_and_drain_timeout(tmp_path: Path, yaml_text: str, grace: int, drain: int) -> None:
    tier = load_tier(_values(tmp_path, yaml_text or "{}"), "high", chart_defaults=NO_CHART)
    assert (tier.grace_s, tier.drain_timeout_s) == (grace, drain)


@pytest.mark.parametrize(
    ("scaling_yaml", "up", "down"),
    [
        # Both null: no behavior rendered -> the HPA's legacy path (§4.5).
        pytest.param("scaleUp: null\n      scaleDown: null", None, None, id="both-null-is-legacy"),
        # Only scaleDown set: behavior != nil, scaleUp gets the API defaults (§4.1); scaleDown
        # keys merge over the chart's (percent 50, periodSeconds 60 stay), as Helm merges maps.
        pytest.param(
            "scaleUp: null\n      scaleDown: {stabilizationWindowSeconds: 60, pods: 1}",
            DEFAULT_UP,
            ScalingRules(60, "Max", (Policy("Pods", 1, 60), Policy("Percent", 50, 60))),
            id="half-behavior-defaults-other-direction",
        ),
        # scaleDown null next to a scaleUp map: the API's default scale-down, 300 s window.
        pytest.param(
            "scaleUp: {pods: 2}\n      scaleDown: null",
            ScalingRules(0, "Max", (Policy("Pods", 2, 15), Policy("Percent", 100, 15))),
            DEFAULT_DOWN,
            id="null-scale-down-gets-api-defaults-300s",
        ),
        # A map with neither pods nor percent renders no `policies`: the API default ones.
        pytest.param(
            "scaleDown: {pods: null, percent: null}",
            ScalingRules(0, "Max", (Policy("Pods", 8, 15), Policy("Percent", 100, 15))),
            ScalingRules(120, "Max", DEFAULT_DOWN.policies),
            id="no-policies-get-api-default-policies",
        ),
    ],
)
def test_behavior_rendering(
    tmp_path: Path, scaling_yaml: str, up: ScalingRules | None, down: ScalingRules | None
) -> None:
    path = _values(tmp_path, f"tiers:\n  high:\n    scaling:\n      {scaling_yaml}\n")
    tier = load_tier(path, "high", chart_defaults=NO_CHART)
    if up is None:
        assert tier.behavior is None
    else:
        assert tier.behavior is not None
        assert (tier.behavior.up, tier.behavior.down) == (up, down)


def test_user_values_override_chart_defaults(tmp_path: Path) -> None:
    chart = tmp_path / "chart.yaml"
    chart.write_text("tiers:\n  high:\n    scaling: {maxReplicas: 32, jobsPerReplica: 1}\n")
    user = _values(tmp_path, "tiers:\n  high:\n    scaling: {maxReplicas: 7}\n")
    tier = load_tier(user, "high", chart_defaults=chart)
    assert (tier.max_replicas, tier.jobs_per_replica, tier.min_replicas) == (7, 1, 1)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        pytest.param("tiers: {}", "unknown tier 'gold'", id="unknown-tier"),
        pytest.param(
            "tiers:\n  gold:\n    scaling: {minReplicas: 5, maxReplicas: 2}",
            "minReplicas 5 > maxReplicas 2",
            id="min-above-max",
        ),
        pytest.param(
            "tiers:\n  gold:\n    scaling: {idleReplicas: 1, minReplicas: 2}",
            "only 0 or null",
            id="idle-replicas-not-zero",
        ),
        pytest.param(
            "tiers:\n  gold:\n    scaling:\n      scaleUp: {selectPolicy: Fastest}",
            "allowed: Max, Min, Disabled",
            id="bad-select-policy",
        ),
        pytest.param(
            "tiers:\n  gold:\n    scaling:\n      scaleDown: {stabilizationWindowSeconds: 4000}",
            "out of range [0, 3600]",
            id="window-above-3600",
        ),
        pytest.param(
            "tiers:\n  gold:\n    scaling: {jobsPerReplica: 0}",
            "jobsPerReplica=0 out of range [1,",
            id="zero-target",
        ),
        # values.schema.json: a behaviour map needs window, selectPolicy and periodSeconds.
        pytest.param(
            "tiers:\n  gold:\n    scaling:\n      scaleUp: {stabilizationWindowSeconds: null}",
            "scaleUp.stabilizationWindowSeconds is required",
            id="behavior-map-missing-required-key",
        ),
        # _validate.tpl cross-field rules.
        pytest.param(
            "tiers:\n  gold:\n    scaling: {jobsPerReplica: 2, activationJobs: 2}",
            "activationJobs 2 must be below jobsPerReplica 2",
            id="chart-activation-not-below-target",
        ),
        pytest.param(
            "tiers:\n  gold:\n    prefetch: 2\n    scaling: {jobsPerReplica: 1}",
            "jobsPerReplica 1 is below prefetch x pipelineDepth x batch 2",
            id="chart-target-below-prefetch",
        ),
        pytest.param(
            "tiers:\n  gold:\n    pipelineDepth: 3\n    batch: 2\n    scaling: {jobsPerReplica: 4}",
            "jobsPerReplica 4 is below prefetch x pipelineDepth x batch 6",
            id="chart-target-below-depth-times-batch",
        ),
        pytest.param(
            "tiers:\n  gold: {terminationGracePeriodSeconds: 610}",
            "leaves a drain timeout of 595 s, below maxJobSeconds 600",
            id="chart-grace-below-job-plus-margin",
        ),
        pytest.param(
            "tiers:\n  gold:\n    scaling: {minReplicas: 0, idleReplicas: 0}",
            "idleReplicas needs minReplicas >= 1",
            id="chart-idle-needs-min-1",
        ),
        pytest.param(
            "tiers:\n  gold:\n    mode: job\n    scaledJob: {scalingStrategy: accurate}",
            "scalingStrategy=accurate is rejected",
            id="chart-job-accurate-rejected",
        ),
        pytest.param(
            "tiers:\n  gold:\n    mode: job\n    scaledJob: {scalingStrategy: eager}",
            "scalingStrategy=eager is rejected",
            id="chart-job-eager-rejected",
        ),
        pytest.param(
            "tiers:\n  gold:\n    mode: job\n    scaledJob: {scalingStrategy: custom}",
            "custom needs customScalingQueueLengthDeduction",
            id="chart-job-custom-needs-a-knob",
        ),
        pytest.param(
            "tiers:\n  gold:\n    mode: job\n    scaling: {minReplicas: 1, idleReplicas: 0}",
            "idleReplicas must be null with mode: job",
            id="chart-job-idle-replicas-set",
        ),
        pytest.param(
            "rbac: {create: false}\ntiers:\n  gold: {podDeletionCost: true}",
            "podDeletionCost is true but rbac.create is false",
            id="chart-pod-deletion-cost-needs-rbac",
        ),
        pytest.param(
            "workers: {drainMarginSeconds: 301}\ntiers:\n  gold: {}",
            "drainMarginSeconds=301 out of range [0, 300]",
            id="drain-margin-above-300",
        ),
    ],
)
def test_rejects_invalid_values(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = _values(tmp_path, yaml_text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_tier(path, "gold", chart_defaults=NO_CHART)
