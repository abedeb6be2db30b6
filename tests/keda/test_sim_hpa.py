"""HPA rules, each case worked out by hand from keda.md §4.2 (calculator), §4.4 (reconcile order),
§4.5 (legacy path, behavior nil) and §4.6 (behavior path)."""

from __future__ import annotations

import pytest

from facefleet.keda.simulator.config import Behavior, Policy, ScalingRules, TierConfig
from facefleet.keda.simulator.hpa import Hpa, external_average_value_proposal

UP_4_PODS_100_PCT = ScalingRules(0, "Max", (Policy("Pods", 4, 15), Policy("Percent", 100, 15)))
DOWN_FAST = ScalingRules(0, "Max", (Policy("Percent", 100, 15),))


@pytest.mark.parametrize(
    ("metric", "target", "status", "expected"),
    [
        # §4.2 example: 21 / (10 * 2) = 1.05 is inside [0.9, 1.1] -> keep 2 (not 3).
        pytest.param(21, 10, 2, 2, id="tolerance-band-holds-replicas"),
        # §4.2 example: 23 / 20 = 1.15 -> ceil(23 / 10) = 3.
        pytest.param(23, 10, 2, 3, id="above-tolerance-scales-to-ceil"),
        pytest.param(22, 10, 2, 2, id="tolerance-upper-edge-1.1-is-inclusive"),
        pytest.param(18, 10, 2, 2, id="tolerance-lower-edge-0.9-is-inclusive"),
        # 15 / 30 = 0.5 -> ceil(1.5) = 2.
        pytest.param(15, 10, 3, 2, id="below-tolerance-scales-down-to-ceil"),
        # Readiness is ignored for External metrics: 4 pods (3 still starting) absorb 38 -> 0.95.
        pytest.param(38, 10, 4, 4, id="pending-pods-count-in-status-replicas"),
        # status 0 -> ratio +Inf -> ceil(5 / 2) = 3.
        pytest.param(5, 2, 0, 3, id="zero-status-proposes-ceil"),
        pytest.param(0, 2, 3, 0, id="empty-queue-proposes-zero"),
        # target in milli units: 3 / 1.5 = 2 exactly -> ratio 1.
        pytest.param(3, 1.5, 2, 2, id="fractional-target-milli-precision"),
    ],
)
def test_external_average_value_proposal(
    metric: float, target: float, status: int, expected: int
) -> None:
    assert external_average_value_proposal(metric, target, status) == expected


def _hpa(behavior: Behavior | None, min_r: int = 1, max_r: int = 32, jpr: float = 1) -> Hpa:
    tier = TierConfig(
        name="t", min_replicas=min_r, max_replicas=max_r, jobs_per_replica=jpr, behavior=behavior
    )
    return Hpa(tier)


def _drive(hpa: Hpa, spec: int, metrics: list[tuple[int, float]]) -> list[tuple[int, int]]:
    """Sync at each (t, metric); status follows spec (pods appear at once). Returns writes."""
    writes = []
    for t, metric in metrics:
        desired = hpa.reconcile(t, spec, spec, metric)
        if desired is not None:
            spec = desired
            writes.append((t, desired))
    return writes


@pytest.mark.parametrize(
    ("behavior", "spec", "metrics", "writes"),
    [
        # §4.5 upLimit = max(2 * spec, 4): 1 -> 4 -> 8 -> 16 -> 32 (scaleUpLimitMinimum = 4; the
        # issue's "1 -> 2 -> 4 -> 8" would ignore the minimum of 4).
        pytest.param(
            None,
            1,
            [(0, 100), (15, 100), (30, 100), (45, 100)],
            [(0, 4), (15, 8), (30, 16), (45, 32)],
            id="legacy-up-limit-doubles-1-4-8-16-32",
        ),
        # §4.5 downscale stabilisation 300 s: the rec (8, t=0) is kept while t - 300 <= 0, then
        # the legacy path drops straight to minReplicas (no rate limit down).
        pytest.param(
            None,
            8,
            [(0, 8)] + [(t, 0) for t in range(15, 316, 15)],
            [(315, 1)],
            id="legacy-scale-down-waits-300s-window",
        ),
        # §4.6 Pods 4 vs Percent 100 from 1: max(1 + 4, ceil(1 * 2)) = 5; the event at t=0 is not
        # strictly newer than 15 - 15, so the next period starts from 5: max(9, 10) = 10.
        pytest.param(
            Behavior(UP_4_PODS_100_PCT, DOWN_FAST),
            1,
            [(0, 100), (15, 100)],
            [(0, 5), (15, 10)],
            id="behavior-up-max-policy-pods-then-percent",
        ),
        pytest.param(
            Behavior(ScalingRules(0, "Min", UP_4_PODS_100_PCT.policies), DOWN_FAST),
            1,
            [(0, 100), (15, 100)],
            [(0, 2), (15, 4)],
            id="behavior-up-select-min-takes-smaller-policy",
        ),
        pytest.param(
            Behavior(ScalingRules(0, "Disabled", ()), DOWN_FAST),
            1,
            [(0, 100), (15, 100)],
            [],
            id="behavior-up-disabled-never-scales-up",
        ),
        # §4.6 scaleDown selectPolicy Disabled: limit = spec, so desired = max(0, 1, 10) = 10
        # although the metric reads 0 and the window is 0.
        pytest.param(
            Behavior(UP_4_PODS_100_PCT, ScalingRules(0, "Disabled", DOWN_FAST.policies)),
            10,
            [(0, 0), (15, 0), (30, 0)],
            [],
            id="behavior-down-disabled-never-scales-down",
        ),
        # Down window 120 s (strictly newer recs), Pods 2 per 60 s: the rec (10, t=0) stops
        # counting at t=120; then 10 -> 8; the event at t=120 blocks until t=180 (strict), ...
        pytest.param(
            Behavior(UP_4_PODS_100_PCT, ScalingRules(120, "Max", (Policy("Pods", 2, 60),))),
            10,
            [(0, 10)] + [(t, 0) for t in range(15, 376, 15)],
            [(120, 8), (180, 6), (240, 4), (300, 2), (360, 1)],
            id="behavior-scale-down-waits-window-then-pods-policy",
        ),
        # Percent 30 down from 5: int(5 * 0.7) = int(3.5) = 3 (truncation).
        pytest.param(
            Behavior(UP_4_PODS_100_PCT, ScalingRules(0, "Max", (Policy("Percent", 30, 60),))),
            5,
            [(0, 0)],
            [(0, 3)],
            id="behavior-percent-down-truncates",
        ),
        # Up window 30 s: at t=15 min(10, rec 1 @ t=0) = 1 holds; at t=30 the t=0 rec is out.
        pytest.param(
            Behavior(ScalingRules(30, "Max", UP_4_PODS_100_PCT.policies), DOWN_FAST),
            1,
            [(0, 1), (15, 10), (30, 10)],
            [(30, 5)],
            id="behavior-up-window-waits-for-sustained-load",
        ),
    ],
)
def test_normalization_paths(
    behavior: Behavior | None,
    spec: int,
    metrics: list[tuple[int, float]],
    writes: list[tuple[int, int]],
) -> None:
    assert _drive(_hpa(behavior), spec, metrics) == writes


@pytest.mark.parametrize(
    ("spec", "metric", "expected"),
    [
        # §4.4: spec == 0 and minReplicas != 0 -> ScalingDisabled; 0 -> 1 is KEDA's job.
        pytest.param(0, 100, None, id="spec-zero-hpa-leaves-activation-to-keda"),
        # §4.4: spec > maxR -> maxR with no stabilisation or policies.
        pytest.param(40, 100, 32, id="spec-above-max-clamps-directly"),
    ],
)
def test_reconcile_guards(spec: int, metric: float, expected: int | None) -> None:
    assert _hpa(None).reconcile(0, spec, spec, metric) == expected
