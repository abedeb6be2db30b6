"""KEDA operator poll (keda.md §2.1): activation strictly above activationValue, lastActiveTime,
cooldown counted from the last active poll, direct jump to idle/min."""

from __future__ import annotations

import pytest

from facefleet.keda.simulator.config import TierConfig
from facefleet.keda.simulator.keda_operator import KedaOperator


def _tier(min_r: int = 0, idle: int | None = None, activation: float = 0) -> TierConfig:
    return TierConfig(
        name="t",
        min_replicas=min_r,
        idle_replicas=idle,
        activation_jobs=activation,
        cooldown_s=120,
        polling_interval_s=5,
    )


@pytest.mark.parametrize(
    ("tier", "polls", "expected"),
    [
        # metric == activationValue is not active (strict >), so 0 stays 0.
        pytest.param(
            _tier(activation=5), [(0, 5, 0)], [None], id="activation-at-exactly-value-stays-0"
        ),
        pytest.param(_tier(activation=5), [(0, 6, 0)], [1], id="activation-above-value-0-to-1"),
        # With idleReplicaCount, activation goes to minReplicaCount (> 0) directly.
        pytest.param(_tier(min_r=3, idle=0), [(0, 1, 0)], [3], id="activation-to-min-replicas"),
        # Active at t=0; inactive polls: 0 + 120 < 120 is false at t=120, true at t=125; the
        # jump is direct, 4 -> 0, not via the HPA's policies.
        pytest.param(
            _tier(),
            [(0, 9, 4), (60, 0, 4), (120, 0, 4), (125, 0, 4)],
            [None, None, None, 0],
            id="cooldown-before-direct-jump-to-zero",
        ),
        # Activity at t=100 restarts the cooldown: 100 + 120 < 220 false, < 225 true.
        pytest.param(
            _tier(),
            [(0, 9, 2), (100, 1, 2), (125, 0, 2), (220, 0, 2), (225, 0, 2)],
            [None, None, None, None, 0],
            id="activity-restarts-cooldown",
        ),
        # Never active: creation + initialCooldownPeriod (0) < now -> to 0 on the next poll.
        pytest.param(
            _tier(), [(0, 0, 2), (5, 0, 2)], [None, 0], id="never-active-scales-in-after-initial"
        ),
        pytest.param(
            _tier(min_r=1), [(0, 0, 1), (500, 0, 1)], [None, None], id="min-1-never-goes-to-zero"
        ),
        pytest.param(
            _tier(min_r=2, idle=0),
            [(0, 3, 2), (125, 0, 2)],
            [None, 0],
            id="idle-zero-jumps-from-min-after-cooldown",
        ),
        # Inactive, no idle, below min (e.g. after a manual scale) -> back to min.
        pytest.param(_tier(min_r=2), [(0, 0, 1)], [2], id="below-min-restored-to-min"),
    ],
)
def test_poll(
    tier: TierConfig, polls: list[tuple[int, float, int]], expected: list[int | None]
) -> None:
    keda = KedaOperator(tier)
    assert [keda.poll(t, metric, current) for t, metric, current in polls] == expected


def test_polls_every_interval_from_creation() -> None:
    keda = KedaOperator(_tier(), created_s=2)
    assert [t for t in range(20) if keda.is_poll(t)] == [2, 7, 12, 17]
