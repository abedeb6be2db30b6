"""The scaler's arithmetic, pure: what `facefleet scaler` answers KEDA and what the simulator
replays. Both import this module; neither copies it.

Every trigger returns one metric for an AverageValue target, so the HPA's proposal is
ceil(metric / target) (keda.md §4.2) and the metric reads as "replicas x target":

- `work`: the tier's backlog in GPU-seconds, each job counted at most once per wait objective
  W, target W: one W per running job (its replica is busy), plus sum(min(cost, W)) over ready
  jobs rounded up to whole W. 30 photos of 2 s ask for one replica, a 10-minute video for one
  whole replica (it cannot use two), so W of photos on one replica drain within the objective
  and long jobs each start at once.
- `latency`: the oldest ready job's age against W, as a proportional controller on the fleet
  the queue sees: max(1, consumers) x age / W, target 1. Old jobs grow the fleet, young ones
  shrink it. Knows nothing of job sizes: the one mode for producers that send no estimates.
- `predictive`: the replicas needed when pods asked for now are up, never below `work`:
  running jobs that will still run in `startup_s`, the ready work, and the work forecast to
  arrive by then (SeasonalForecast.ahead: a seasonal model of past days' per-minute arrivals,
  each job capped at W, discounted when the last minutes fell short of it). Jobs ending within
  the start-up time free the pods that steady arrivals need, so it adds little outside a
  surge, and ahead of one it starts the pods the surge will need.

Every mode's metric is at least (running jobs x target): no mode proposes fewer replicas than
there are jobs in progress, so the HPA never scales away a pod because its job looks small.
Activation (IsActive) is true while anything is ready or running; `predictive` also while
the forecast holds at least one replica's worth of work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

Trigger = Literal["work", "latency", "predictive"]
TRIGGERS: tuple[str, ...] = get_args(Trigger)

DEFAULT_WAIT_OBJECTIVE_S = 60.0
DEFAULT_STARTUP_S = 90.0
MIN_REMAINING_FRACTION = 0.05
"""A running job past its estimate still has this fraction left: it is not done until it acks."""


class ParameterError(ValueError):
    """Trigger metadata the scaler cannot use; the message names the key (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Params:
    """One trigger's parameters (its KEDA metadata, parsed by `params_from_metadata`)."""

    trigger: Trigger = "work"
    wait_objective_s: float = DEFAULT_WAIT_OBJECTIVE_S
    startup_s: float = DEFAULT_STARTUP_S
    """Pod start-up time: how far ahead `predictive` looks."""
    activation_forecast_s: float | None = None
    """`predictive` activates an idle tier when this much work is forecast within start-up;
    None = one replica's worth (wait_objective_s)."""

    @property
    def target(self) -> float:
        return 1.0 if self.trigger == "latency" else self.wait_objective_s


def _positive(metadata: dict[str, str], key: str, default: float) -> float:
    raw = metadata.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ParameterError(f"{key}: {raw!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ParameterError(f"{key}: must be a number above 0, got {raw!r}")
    return value


def params_from_metadata(metadata: dict[str, str]) -> Params:
    """KEDA trigger metadata -> Params; a bad key is a ParameterError naming it."""
    trigger = metadata.get("trigger", "work")
    if trigger not in TRIGGERS:
        raise ParameterError(
            f"trigger: unknown mode {trigger!r}; use one of {', '.join(TRIGGERS)} "
            "(queueLength is KEDA's own rabbitmq trigger, not this scaler)"
        )
    activation = metadata.get("activationForecastSeconds")
    return Params(
        trigger=trigger,  # type: ignore[arg-type]
        wait_objective_s=_positive(metadata, "waitObjectiveSeconds", DEFAULT_WAIT_OBJECTIVE_S),
        startup_s=_positive(metadata, "startupSeconds", DEFAULT_STARTUP_S),
        activation_forecast_s=None
        if activation in (None, "")
        else _positive(metadata, "activationForecastSeconds", 0.0),
    )


@dataclass(frozen=True)
class Running:
    """A job in progress: its estimated cost, how long it has run, its progress if reported."""

    cost_s: float
    elapsed_s: float = 0.0
    fraction: float | None = None

    def remaining_s(self) -> float:
        total = self.cost_s
        if self.fraction is not None and self.fraction >= 0.05 and self.elapsed_s > 0:
            total = self.elapsed_s / min(self.fraction, 1.0)  # progress beats the estimate
        return max(total - self.elapsed_s, MIN_REMAINING_FRACTION * total)


@dataclass(frozen=True)
class TierView:
    """What the scaler knows of one tier at one instant."""

    ready: int
    """Ready messages (the broker's count: authoritative)."""
    unacked: int
    """Delivered, not yet acked: jobs in progress (the broker's count)."""
    consumers: int = 0
    ready_costs: Sequence[float] = ()
    """Estimated GPU-seconds of the ready jobs known from their `queued` events; may be fewer
    than `ready` (jobs queued before the scaler's look-back): those cost default_cost_s."""
    oldest_ready_age_s: float = 0.0
    running: Sequence[Running] = ()
    """Jobs in progress known from their events; the broker's `unacked` may count more."""
    default_cost_s: float = 30.0
    known_open: int = 0
    """Jobs queued or running according to their events: they activate the tier before the
    broker's counts (refreshed every 5 s by the management API) show them."""


@dataclass(frozen=True)
class Reading:
    """One answer: the metric for GetMetrics, its target for GetMetricSpec, IsActive."""

    metric: float
    target: float
    active: bool
    backlog_s: float = 0.0
    """Uncapped GPU-seconds queued or left running (for people and metrics, not the HPA)."""
    forecast_s: float = 0.0

    @property
    def replicas(self) -> int:
        """What the HPA would propose from this reading alone (ceil(metric / target))."""
        return math.ceil(self.metric / self.target - 1e-9) if self.metric > 0 else 0


def _ready_costs(view: TierView) -> list[float]:
    known = list(view.ready_costs)[-view.ready :] if view.ready else []
    return known + [view.default_cost_s] * (view.ready - len(known))


def _running_remaining(view: TierView) -> list[float]:
    known = [job.remaining_s() for job in view.running]
    unknown = max(view.unacked - len(known), 0)
    return known + [view.default_cost_s] * unknown


def backlog_s(view: TierView) -> float:
    """Uncapped GPU-seconds: ready jobs' estimates + what is left of running ones."""
    return sum(_ready_costs(view)) + sum(_running_remaining(view))


def _floor(view: TierView, target: float) -> float:
    """Never fewer replicas than jobs in progress."""
    return max(view.unacked, len(view.running)) * target


def work_metric(view: TierView, wait_objective_s: float) -> float:
    """Running jobs: each at least one replica (the floor). Ready jobs: their capped work
    rounded UP to whole replicas, so one 2 s photo behind a busy fleet asks for a replica of
    its own: a fraction (2/W) would vanish in the HPA's 10 % tolerance and the photo would
    wait for a 10-minute video to finish (found by `facefleet simulate compare`)."""
    w = wait_objective_s
    ready = sum(min(c, w) for c in _ready_costs(view))
    running = max(sum(min(r, w) for r in _running_remaining(view)), _floor(view, w))
    return running + math.ceil(ready / w - 1e-9) * w


def latency_metric(view: TierView, wait_objective_s: float) -> float:
    age = view.oldest_ready_age_s if view.ready else 0.0
    proposal = max(view.consumers, 1) * age / wait_objective_s
    if view.ready and proposal <= 0:
        proposal = 1.0  # a job just queued on an idle tier still needs a pod
    return max(proposal, _floor(view, 1.0))


def predictive_metric(view: TierView, params: Params, forecast_s: float) -> float:
    """Replicas needed when pods asked for now are up (`startup_s` from now), x W: running
    jobs that will still run then, the ready work (rounded up as in `work`), and the work
    forecast to arrive by then (`forecast_s`, each job capped at W). Never below `work`. In
    steady traffic the jobs ending within the start-up time free about as many pods as the
    forecast arrivals need, so this adds little; ahead of a surge (and while it builds, when
    nothing ends yet) it adds what the surge brings."""
    w = params.wait_objective_s
    still = sum(1 for r in _running_remaining(view) if r > params.startup_s)
    ready = math.ceil(sum(min(c, w) for c in _ready_costs(view)) / w - 1e-9)
    return max(work_metric(view, w), (still + ready) * w + forecast_s)


def read(view: TierView, params: Params, forecast_s: float = 0.0) -> Reading:
    """The scaler's answer for one tier and trigger."""
    busy = view.ready > 0 or view.unacked > 0 or bool(view.running) or view.known_open > 0
    backlog = backlog_s(view)
    if params.trigger == "latency":
        metric = latency_metric(view, params.wait_objective_s)
        return Reading(metric, params.target, busy, backlog)
    metric = work_metric(view, params.wait_objective_s)
    if params.trigger == "work":
        return Reading(metric, params.target, busy, backlog)
    threshold = (
        params.wait_objective_s
        if params.activation_forecast_s is None
        else params.activation_forecast_s
    )
    return Reading(
        predictive_metric(view, params, forecast_s),
        params.target,
        busy or forecast_s >= threshold,
        backlog,
        forecast_s,
    )


MINUTES_PER_DAY = 1440


def _bucket(work_s: float) -> int:
    """Half-octave size class of one job's work: (2^((k-1)/2), 2^(k/2)] seconds, k >= 0."""
    return 0 if work_s <= 1.0 else math.ceil(2 * math.log2(work_s) - 1e-9)


def _bucket_bounds(k: int) -> tuple[float, float]:
    return (0.0 if k == 0 else 2 ** ((k - 1) / 2), 2 ** (k / 2))


@dataclass
class SeasonalForecast:
    """Work arriving per minute, kept for the last `days` days by job size class (half-octave
    buckets of count and sum), so the forecast can count each job at most `cap_s` seconds, the
    way `work` counts ready jobs. The forecast for a minute is the `quantile` over those days
    of the mean arrival rate within +-`smooth_min` minutes of the same time of day. No
    training, no state beyond the per-minute buckets (rebuilt from the events stream on
    restart). Failure modes (keda/README.md): a new pattern takes a day to learn, a weekly one
    (weekends) is smeared by the quantile, a one-off surge is ignored, a holiday or a shifted
    surge is forecast for nothing until `trust` sees the last minutes fall short."""

    days: int = 5
    smooth_min: int = 2
    quantile: float = 0.5
    _minutes: dict[int, dict[int, list[float]]] = field(default_factory=dict, repr=False)
    _first_minute: int | None = None
    _cache: dict[int, dict[float | None, float]] = field(default_factory=dict, repr=False)

    def add(self, t_s: float, work_s: float) -> None:
        minute = int(t_s // 60)
        buckets = self._minutes.setdefault(minute, {})
        cell = buckets.setdefault(_bucket(work_s), [0.0, 0.0])
        cell[0] += 1
        cell[1] += work_s
        self._cache.pop(minute, None)
        if self._first_minute is None or minute < self._first_minute:
            self._first_minute = minute

    def prune(self, now_s: float) -> None:
        oldest = int(now_s // 60) - self.days * MINUTES_PER_DAY - self.smooth_min - 1
        for store in (self._minutes, self._cache):
            for minute in [m for m in store if m < oldest]:
                del store[minute]

    def arrived(self, minute: int, cap_s: float | None = None) -> float:
        """Work that arrived in `minute`, each job counted at most `cap_s` (None: uncapped).
        In the bucket that straddles the cap the sum is min(sum, count x cap): an upper bound
        (by at most the bucket's width, 41 %)."""
        cached = self._cache.setdefault(minute, {})
        if cap_s in cached:
            return cached[cap_s]
        total = 0.0
        for k, (count, work) in self._minutes.get(minute, {}).items():
            if cap_s is None or _bucket_bounds(k)[1] <= cap_s:
                total += work
            else:
                total += min(work, count * cap_s)
        cached[cap_s] = total
        return total

    def rate_per_min(self, minute: int, cap_s: float | None = None) -> float:
        """Forecast work arriving in `minute` (absolute minute index)."""
        if self._first_minute is None:
            return 0.0
        per_day = []
        for day in range(1, self.days + 1):
            centre = minute - day * MINUTES_PER_DAY
            lo, hi = centre - self.smooth_min, centre + self.smooth_min
            if lo < self._first_minute:
                continue  # no history that far back: that day does not vote
            total = sum(self.arrived(m, cap_s) for m in range(lo, hi + 1))
            per_day.append(total / (hi - lo + 1))
        return _quantile(per_day, self.quantile)

    def forecast(self, now_s: float, horizon_s: float, cap_s: float | None = None) -> float:
        """Work (GPU-seconds, each job at most cap_s) expected to arrive in [now, now + horizon)."""
        if horizon_s <= 0:
            return 0.0
        total, t, end = 0.0, now_s, now_s + horizon_s
        while t < end - 1e-9:
            minute = int(t // 60)
            step = min(end, (minute + 1) * 60) - t
            total += self.rate_per_min(minute, cap_s) * step / 60
            t += step
        return total

    def trust(self, now_s: float, cap_s: float | None = None, lookback_min: int = 10) -> float:
        """How far the forecast held over the last `lookback_min` whole minutes: 1 while what
        arrived is at least half of what was forecast (that absorbs the arrivals' noise, and a
        surge that comes smaller than usual), 0 at a quarter or less, linear between. A holiday
        or a surge that moved keeps its pre-scale for minutes, not for the whole forecast surge;
        a surge that comes as forecast keeps it whole."""
        minute = int(now_s // 60)
        expected = sum(self.rate_per_min(m, cap_s) for m in range(minute - lookback_min, minute))
        if expected <= 0:
            return 1.0
        seen = sum(self.arrived(m, cap_s) for m in range(minute - lookback_min, minute))
        return min(1.0, max(0.0, 4.0 * seen / expected - 1.0))

    def ahead(self, now_s: float, horizon_s: float, cap_s: float | None = None) -> float:
        """What `predictive` adds: the forecast of [now, now + horizon) times `trust`."""
        expected = self.forecast(now_s, horizon_s, cap_s)
        return expected * self.trust(now_s, cap_s) if expected > 0 else 0.0


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (q = 0.5: the median); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
