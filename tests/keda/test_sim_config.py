"""Reading `tiers.<tier>` from Helm values: merge order, behavior defaulting (keda.md §4.1),
validation ranges (§7)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from keda.simulator.config import (
    DEFAULT_DOWN,
    DEFAULT_UP,
    ConfigError,
    Policy,
    ScalingRules,
    load_tier,
)

NO_CHART = Path("/nonexistent/values.yaml")


def _values(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_builtin_defaults_match_agreed_shape() -> None:
    tier = load_tier(None, "high", chart_defaults=NO_CHART)
    assert (tier.min_replicas, tier.max_replicas, tier.jobs_per_replica) == (1, 10, 2)
    assert tier.grace_s == 630  # maxJobSeconds 600 + 30
    assert tier.behavior is not None
    assert tier.behavior.up == ScalingRules(
        0, "Max", (Policy("Pods", 4, 15), Policy("Percent", 100, 15))
    )
    assert tier.behavior.down == ScalingRules(120, "Max", (Policy("Pods", 2, 60),))


@pytest.mark.parametrize(
    ("scaling_yaml", "up", "down"),
    [
        # Both null: no behavior rendered -> the HPA's legacy path (§4.5).
        pytest.param("scaleUp: null\n      scaleDown: null", None, None, id="both-null-is-legacy"),
        # Only scaleDown set: behavior != nil, scaleUp gets the API defaults (§4.1); scaleDown
        # keys merge over the chart's (periodSeconds 60 stays), as Helm merges maps.
        pytest.param(
            "scaleUp: null\n      scaleDown: {stabilizationWindowSeconds: 60, pods: 1}",
            DEFAULT_UP,
            ScalingRules(60, "Max", (Policy("Pods", 1, 60),)),
            id="half-behavior-defaults-other-direction",
        ),
        # A direction with no policies and no window gets the API default policies and 300 s.
        pytest.param(
            "scaleUp: {pods: 2}\n      scaleDown: {stabilizationWindowSeconds: null, "
            "pods: null, percent: null}",
            ScalingRules(0, "Max", (Policy("Pods", 2, 15), Policy("Percent", 100, 15))),
            DEFAULT_DOWN,
            id="empty-scale-down-gets-api-defaults-300s",
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
            "tiers:\n  gold:\n    scaling: {jobsPerReplica: 0}", "must be > 0", id="zero-target"
        ),
    ],
)
def test_rejects_invalid_values(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = _values(tmp_path, yaml_text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_tier(path, "gold", chart_defaults=NO_CHART)
