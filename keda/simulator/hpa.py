"""The HPA KEDA creates (`keda-hpa-<so>`): replica calculator, stabilisation and rate limits.

One External metric with an AverageValue target (keda.md §1.3). The controller keeps, in memory,
timestamped recommendations and (behavior path only) scale events; both change what the next sync
may do, which is why this is a class and not a pure function. Arithmetic mirrors the Go code:
milli-unit integers divided as float64 (Python floats are the same IEEE doubles), so rounding at
the tolerance edges and in Percent policies matches the real controller.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from facefleet.keda.simulator.config import (
    HPA_DOWNSCALE_STABILIZATION_S,
    Behavior,
    ScalingRules,
    TierConfig,
)

SYNC_PERIOD_S = 15
"""--horizontal-pod-autoscaler-sync-period (keda.md §3.2, §4.1)."""
TOLERANCE = 0.1
"""--horizontal-pod-autoscaler-tolerance 0.1, inclusive band (keda.md §4.1, §4.2)."""
SCALE_UP_LIMIT_FACTOR = 2
SCALE_UP_LIMIT_MINIMUM = 4
"""Legacy scale-up limit max(2 * spec, 4) per sync (keda.md §4.5)."""
MAX_INT32 = 2**31 - 1
"""GetExternalPerPodMetricReplicas caps its proposal here (keda.md §4.2) before int32()."""


def external_average_value_proposal(metric: float, target: float, status_replicas: int) -> int:
    """Per-metric proposal for an External AverageValue target (keda.md §4.2).

    Uses status.replicas, which counts Pending and not-Ready pods: External metrics skip the
    readiness rebalancing that Resource/Pods metrics get, so a pod still pulling its image already
    "absorbs" `target` messages.
    """
    usage = round(metric * 1000)  # metric and target travel in milli units (keda.md §1.3)
    tgt = round(float(f"{target:.3f}") * 1000)
    if status_replicas > 0:
        ratio = usage / (tgt * status_replicas)
        if 1.0 - TOLERANCE <= ratio <= 1.0 + TOLERANCE:
            return status_replicas
    return min(math.ceil(usage / tgt), MAX_INT32)


@dataclass
class _Rec:
    value: int
    time_s: int


@dataclass
class Hpa:
    """One HPA object plus the controller's in-memory state for it."""

    tier: TierConfig
    phase_s: int = 0
    """Second of the first sync; the HPA clock is independent of KEDA's (keda.md §3.2)."""
    recommendations: list[_Rec] = field(default_factory=list)
    up_events: list[_Rec] = field(default_factory=list)
    down_events: list[_Rec] = field(default_factory=list)

    @property
    def min_replicas(self) -> int:
        """GetHPAMinReplicas: minReplicaCount if > 0 else 1 (keda.md §2)."""
        return max(self.tier.min_replicas, 1)

    def is_sync(self, now_s: int) -> bool:
        return now_s >= self.phase_s and (now_s - self.phase_s) % SYNC_PERIOD_S == 0

    def reconcile(
        self, now_s: int, spec: int, status: int, metric: float, target: float | None = None
    ) -> int | None:
        """reconcileAutoscaler (keda.md §4.4): the replicas to write, or None for no write.
        `target` is the AverageValue GetMetricSpec returned; default the queue-length trigger's
        jobsPerReplica."""
        if not self.recommendations:  # recordInitialRecommendation
            self.recommendations.append(_Rec(spec, now_s))
        min_r, max_r = self.min_replicas, self.tier.max_replicas
        if spec == 0 and min_r != 0:
            return None  # ScalingDisabled: KEDA owns 0 -> 1
        if spec > max_r:
            desired = max_r
        elif spec < min_r:
            desired = min_r
        else:
            tgt = self.tier.jobs_per_replica if target is None else target
            raw = external_average_value_proposal(metric, tgt, status)
            b = self.tier.behavior
            if b is None:
                desired = self._legacy(now_s, spec, raw)
            else:
                desired = self._with_behavior(now_s, spec, raw, b)
        if desired == spec:
            return None
        if self.tier.behavior is not None:  # storeScaleEvent: behavior path only
            events = self.up_events if desired > spec else self.down_events
            events.append(_Rec(abs(desired - spec), now_s))
        return desired

    def _legacy(self, now_s: int, spec: int, raw: int) -> int:
        """behavior == nil, what a KEDA HPA gets by default (keda.md §4.5)."""
        cutoff = now_s - HPA_DOWNSCALE_STABILIZATION_S
        stab = max([raw] + [r.value for r in self.recommendations if r.time_s >= cutoff])
        self._store(raw, now_s, lambda r: r.time_s < cutoff)
        up_limit = max(SCALE_UP_LIMIT_FACTOR * spec, SCALE_UP_LIMIT_MINIMUM)
        hi = min(self.tier.max_replicas, up_limit)
        return max(self.min_replicas, min(stab, hi))

    def _with_behavior(self, now_s: int, spec: int, raw: int, b: Behavior) -> int:
        """normalizeDesiredReplicasWithBehaviors (keda.md §4.6)."""
        up_cut, down_cut = now_s - b.up.window_s, now_s - b.down.window_s
        up_rec = min([raw] + [r.value for r in self.recommendations if r.time_s > up_cut])
        down_rec = max([raw] + [r.value for r in self.recommendations if r.time_s > down_cut])
        stab = spec
        if stab < up_rec:
            stab = up_rec
        if stab > down_rec:
            stab = down_rec
        self._store(raw, now_s, lambda r: r.time_s < up_cut and r.time_s < down_cut)
        if stab > spec:
            limit = max(self._up_limit(now_s, spec, b.up), spec)
            return min(stab, self.tier.max_replicas, limit)
        if stab < spec:
            limit = min(self._down_limit(now_s, spec, b.down), spec)
            return max(stab, self.min_replicas, limit)
        return stab

    def _store(self, raw: int, now_s: int, is_old: Callable[[_Rec], bool]) -> None:
        """Overwrite one stale recommendation if any, else append (keeps the list short). The
        Go loop (stabilizeRecommendation*) does not break: with several stale entries it
        overwrites the LAST one, and the others stay until later syncs reuse them."""
        stale = [i for i, rec in enumerate(self.recommendations) if is_old(rec)]
        if stale:
            self.recommendations[stale[-1]] = _Rec(raw, now_s)
            return
        self.recommendations.append(_Rec(raw, now_s))

    def _period_start(self, now_s: int, spec: int, period_s: int) -> int:
        """spec - added + removed within the policy period (strictly newer events, §4.6)."""
        cut = now_s - period_s
        added = sum(e.value for e in self.up_events if e.time_s > cut)
        removed = sum(e.value for e in self.down_events if e.time_s > cut)
        return spec - added + removed

    def _up_limit(self, now_s: int, spec: int, rules: ScalingRules) -> int:
        if rules.select == "Disabled":
            return spec
        props = []
        for p in rules.policies:
            start = self._period_start(now_s, spec, p.period_s)
            if p.kind == "Pods":
                props.append(start + p.value)
            else:
                props.append(math.ceil(start * (1 + p.value / 100)))
        return max(props) if rules.select == "Max" else min(props)

    def _down_limit(self, now_s: int, spec: int, rules: ScalingRules) -> int:
        if rules.select == "Disabled":
            return spec
        props = []
        for p in rules.policies:
            start = self._period_start(now_s, spec, p.period_s)
            if p.kind == "Pods":
                props.append(start - p.value)
            else:
                props.append(int(start * (1 - p.value / 100)))  # truncation, as int32(...)
        return min(props) if rules.select == "Max" else max(props)
