"""The KEDA operator's per-ScaledObject poll: activation 0->1 and the direct jump N->0.

Scaling 1<->N is the HPA's job (hpa.py); KEDA only decides whether the workload is active
(keda.md §2.1). Scaler errors and fallback (§3.4) are not modelled: the simulated broker always
answers, so `isError` is always false.
"""

from __future__ import annotations

from dataclasses import dataclass

from facefleet.keda.simulator.config import TierConfig


def is_active(metric: float, activation_value: float) -> bool:
    """QueueLength activity: strictly above activationValue (keda.md §1.1, §1.4)."""
    return metric > activation_value


@dataclass
class KedaOperator:
    """State KEDA keeps per ScaledObject between polls (status.lastActiveTime)."""

    tier: TierConfig
    created_s: int = 0
    initial_cooldown_s: int = 0
    """initialCooldownPeriod, default 0 (keda.md §2); the chart does not set it."""
    last_active_s: int | None = None

    def is_poll(self, now_s: int) -> bool:
        """First check at creation, then every pollingInterval (keda.md §2.1 startScaleLoop)."""
        return (now_s - self.created_s) % self.tier.polling_interval_s == 0

    def poll(
        self, now_s: int, metric: float, current: int, active: bool | None = None
    ) -> int | None:
        """One checkScalers() + RequestScale(): the new scale.spec.replicas, or None to leave it.

        Exactly the §2.1 pseudo-code with isError = false and no pause annotations. `active` is
        an external scaler's IsActive answer; None = the queue-length rule on `metric`.
        """
        t = self.tier
        min_count, idle = t.min_replicas, t.idle_replicas
        if is_active(metric, t.activation_jobs) if active is None else active:
            self.last_active_s = now_s
            if (idle is not None and current < min_count) or current == 0:
                return max(min_count, 1)  # activation: minReplicaCount if > 0 else 1
            return None
        if (idle is not None and current > idle) or (current > 0 and min_count == 0):
            if self.last_active_s is None:
                expired = self.created_s + self.initial_cooldown_s < now_s
            else:
                expired = self.last_active_s + t.cooldown_s < now_s
            if expired:
                return idle if idle is not None else min_count  # direct jump, e.g. 7 -> 0
            return None  # Active=False, reason ScalerCooldown
        if idle is None and current < min_count:
            return min_count
        return None
