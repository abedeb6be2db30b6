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
- `predictive`: `work` plus the forecast rise in work within the pod start-up time (a
  seasonal per-minute model, SeasonalForecast.surge: the forecast for the next start-up
  time minus its forecast for the last one), so pods asked for now are ready when a surge lands.

Every mode's metric is at least (running jobs x target): no mode proposes fewer replicas than
there are jobs in progress, so the HPA never scales away a pod because its job looks small.
Activation (IsActive) is true while anything is ready or running; `predictive` also while
the forecast holds at least one replica's worth of work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import median
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
        metric + forecast_s,
        params.target,
        busy or forecast_s >= threshold,
        backlog,
        forecast_s,
    )


MINUTES_PER_DAY = 1440


@dataclass
class SeasonalForecast:
    """Work arriving per minute, kept for the last `days` days; the forecast for a minute is the
    median over those days of the mean arrival rate within +-`smooth_min` minutes of the same
    time of day. No training, no state beyond the per-minute sums (rebuilt from the events
    stream on restart). Failure modes (keda/README.md): a new pattern takes a day to learn, a
    weekly one (weekends) is smeared by the median, a one-off surge is ignored (the median),
    and a clock change shifts it by an hour until the days roll over."""

    days: int = 5
    smooth_min: int = 5
    _minutes: dict[int, float] = field(default_factory=dict, repr=False)
    _first_minute: int | None = None

    def add(self, t_s: float, work_s: float) -> None:
        minute = int(t_s // 60)
        self._minutes[minute] = self._minutes.get(minute, 0.0) + work_s
        if self._first_minute is None or minute < self._first_minute:
            self._first_minute = minute

    def prune(self, now_s: float) -> None:
        oldest = int(now_s // 60) - self.days * MINUTES_PER_DAY - self.smooth_min - 1
        for minute in [m for m in self._minutes if m < oldest]:
            del self._minutes[minute]

    def rate_per_min(self, minute: int) -> float:
        """Forecast work arriving in `minute` (absolute minute index)."""
        if self._first_minute is None:
            return 0.0
        per_day = []
        for day in range(1, self.days + 1):
            centre = minute - day * MINUTES_PER_DAY
            lo, hi = centre - self.smooth_min, centre + self.smooth_min
            if lo < self._first_minute:
                continue  # no history that far back: that day does not vote
            total = sum(self._minutes.get(m, 0.0) for m in range(lo, hi + 1))
            per_day.append(total / (hi - lo + 1))
        return median(per_day) if per_day else 0.0

    def surge(self, now_s: float, horizon_s: float) -> float:
        """What `predictive` adds: the forecast work of the next `horizon_s` above the
        forecast of the last `horizon_s` (the model's own seasonal rise). In steady traffic the
        work already queued and running carries the arrival rate, so adding the whole forecast
        would hold about rate x start-up / W replicas extra all day (the simulator measured
        +69 % GPU-seconds); comparing with the observed arrivals instead adds their noise (a
        300 s video is five replicas of W = 60) and still cost +31 %. Only a rise still to come
        needs pods started ahead of it."""
        ahead = self.forecast(now_s, horizon_s)
        before = self.forecast(now_s - horizon_s, horizon_s)
        return max(0.0, ahead - before)

    def forecast(self, now_s: float, horizon_s: float) -> float:
        """Work (GPU-seconds) expected to arrive in [now, now + horizon)."""
        if horizon_s <= 0:
            return 0.0
        total, t, end = 0.0, now_s, now_s + horizon_s
        while t < end - 1e-9:
            minute = int(t // 60)
            step = min(end, (minute + 1) * 60) - t
            total += self.rate_per_min(minute) * step / 60
            t += step
        return total
