"""keda/scaling.py: the scaler's arithmetic, one table per trigger."""

from __future__ import annotations

import pytest

from facefleet.keda.scaling import (
    ParameterError,
    Params,
    Running,
    SeasonalForecast,
    TierView,
    backlog_s,
    params_from_metadata,
    predictive_metric,
    read,
)

W = 60.0
WORK = Params("work", wait_objective_s=W)
LATENCY = Params("latency", wait_objective_s=W)


@pytest.mark.parametrize(
    ("view", "replicas", "active"),
    [
        pytest.param(TierView(0, 0), 0, False, id="idle"),
        pytest.param(TierView(0, 0, known_open=1), 0, True, id="events-activate-before-counts"),
        pytest.param(TierView(100, 0, ready_costs=[2.0] * 100), 4, True, id="100-photos-200s"),
        pytest.param(TierView(10, 0, ready_costs=[300.0] * 10), 10, True, id="10-videos-one-each"),
        pytest.param(
            TierView(30, 0, ready_costs=[2.0] * 30), 1, True, id="30-photos-fit-one-replica"
        ),
        pytest.param(TierView(3, 0, default_cost_s=30.0), 2, True, id="unknown-jobs-default-cost"),
        pytest.param(
            TierView(0, 5, running=[Running(2.0, elapsed_s=1.9)] * 5),
            5,
            True,
            id="never-below-running-jobs",
        ),
        pytest.param(
            TierView(0, 1, running=[Running(600.0, elapsed_s=10)]), 1, True, id="long-job-one-pod"
        ),
        pytest.param(
            TierView(2, 0, ready_costs=[2.0, 2.0, 300.0]),
            2,
            True,
            id="only-the-newest-ready-count",
        ),
    ],
)
def test_work(view: TierView, replicas: int, active: bool) -> None:
    reading = read(view, WORK)
    assert reading.target == W
    assert (reading.replicas, reading.active) == (replicas, active)


@pytest.mark.parametrize(
    ("view", "replicas"),
    [
        pytest.param(TierView(0, 0), 0, id="idle"),
        pytest.param(TierView(5, 0, oldest_ready_age_s=0.0), 1, id="fresh-job-idle-tier"),
        pytest.param(TierView(5, 4, consumers=4, oldest_ready_age_s=120.0), 8, id="twice-late"),
        pytest.param(TierView(5, 4, consumers=4, oldest_ready_age_s=15.0), 4, id="floor-running"),
        pytest.param(TierView(50, 2, consumers=10, oldest_ready_age_s=30.0), 5, id="early-shrink"),
    ],
)
def test_latency(view: TierView, replicas: int) -> None:
    reading = read(view, LATENCY)
    assert reading.target == 1.0
    assert reading.replicas == replicas


@pytest.mark.parametrize(
    ("job", "remaining"),
    [
        pytest.param(Running(100.0, elapsed_s=40.0), 60.0, id="by-estimate"),
        pytest.param(Running(100.0, elapsed_s=40.0, fraction=0.2), 160.0, id="progress-wins"),
        pytest.param(Running(100.0, elapsed_s=400.0), 5.0, id="overrun-keeps-a-floor"),
        pytest.param(
            Running(100.0, elapsed_s=1.0, fraction=0.01), 99.0, id="tiny-progress-ignored"
        ),
    ],
)
def test_remaining(job: Running, remaining: float) -> None:
    assert job.remaining_s() == pytest.approx(remaining)


def test_backlog_is_uncapped_gpu_seconds() -> None:
    view = TierView(2, 2, ready_costs=[300.0, 2.0], running=[Running(100.0, elapsed_s=50.0)])
    assert backlog_s(view) == pytest.approx(302 + 50 + 30)  # the unknown running job: default


def make_history(days: int, surge_minute: int, rate: float) -> SeasonalForecast:
    model = SeasonalForecast(days=days, smooth_min=2)
    for day in range(days):
        for minute in range(surge_minute, surge_minute + 30):
            model.add((day * 1440 + minute) * 60 + 1, rate)
    return model


def test_forecast_sees_the_daily_surge_before_it_lands() -> None:
    model = make_history(5, surge_minute=540, rate=120.0)
    now = (5 * 1440 + 538.5) * 60  # day 6, 8:58:30
    ahead = model.forecast(now, 90.0)
    assert ahead > 0
    assert model.forecast((5 * 1440 + 300) * 60, 90.0) == 0.0  # 5 am: nothing expected
    assert model.forecast((5 * 1440 + 545) * 60, 60.0) == pytest.approx(120.0)  # mid-surge


def test_forecast_ignores_a_one_off_spike() -> None:
    model = make_history(5, surge_minute=540, rate=120.0)
    for minute in range(100, 110):  # one day only, at 1:40
        model.add((2 * 1440 + minute) * 60, 10_000.0)
    assert model.forecast((5 * 1440 + 105) * 60, 60.0) == 0.0


DAY_S = 86400.0
PREDICTIVE = Params("predictive", wait_objective_s=W, startup_s=90.0)


@pytest.mark.parametrize(
    ("costs", "cap", "expected"),
    [
        pytest.param([2.0, 300.0], None, 302.0, id="uncapped"),
        pytest.param([2.0, 300.0], 60.0, 62.0, id="video-capped-at-W"),
        pytest.param([2.0] * 30, 60.0, 60.0, id="photos-below-the-cap-whole"),
        pytest.param([0.5, 300.0, 600.0], 1.0, 2.5, id="tiny-cap"),
        pytest.param([50.0, 70.0], 60.0, 110.0, id="straddling-bucket-sum-bounded"),
    ],
)
def test_arrived_counts_each_job_at_most_the_cap(
    costs: list[float], cap: float | None, expected: float
) -> None:
    model = SeasonalForecast()
    for cost in costs:
        model.add(61.0, cost)
    assert model.arrived(1, cap) == pytest.approx(expected)


def test_arrived_sees_a_late_event_after_a_read() -> None:
    model = SeasonalForecast()
    model.add(61.0, 10.0)
    assert model.arrived(1, 60.0) == 10.0
    model.add(62.0, 5.0)  # the cached minute is recomputed
    assert model.arrived(1, 60.0) == 15.0


def history(rates_by_day: list[float], minute: int = 540, length: int = 30) -> SeasonalForecast:
    """One job a minute of `rate` s from `minute` for `length` minutes, per day, plus a 10 s
    job every minute of the day before it (the base the trust compares)."""
    model = SeasonalForecast(days=len(rates_by_day), smooth_min=2)
    for day, rate in enumerate(rates_by_day):
        for m in range(minute - 60, minute + length):
            model.add((day * 1440 + m) * 60 + 1, 10.0)
            if m >= minute and rate:
                model.add((day * 1440 + m) * 60 + 2, rate)
    return model


@pytest.mark.parametrize(
    ("rates", "quantile", "per_min"),
    [
        pytest.param([20.0, 40.0, 60.0], 0.5, 40.0, id="median"),
        pytest.param([20.0, 40.0, 60.0], 0.75, 50.0, id="upper-quartile-interpolated"),
        pytest.param([20.0, 40.0, 60.0], 1.0, 60.0, id="max"),
        pytest.param([0.0, 0.0, 60.0], 0.5, 0.0, id="one-day-surge-ignored"),
    ],
)
def test_forecast_quantile_across_days(rates: list[float], quantile: float, per_min: float) -> None:
    model = history(rates)
    model.quantile = quantile
    minute = len(rates) * 1440 + 550  # mid-surge, the next day
    assert model.rate_per_min(minute) == pytest.approx(10.0 + per_min)


@pytest.mark.parametrize(
    ("today", "trust"),
    [
        pytest.param(60.0, 1.0, id="surge-as-forecast"),
        pytest.param(30.0, 1.0, id="half-is-within-noise"),
        # 9:00-9:09 forecast: 100 s of base + 564 of surge (its first minutes smoothed)
        pytest.param(0.0, 0.0, id="holiday-after-10-min"),  # 100 / 664 < 1/4
        pytest.param(15.0, 0.5, id="a-third-arrived"),  # 250 / 664 = 0.38: 4 x 0.38 - 1
        pytest.param(120.0, 1.0, id="more-than-forecast-never-above-1"),
    ],
)
def test_trust_falls_when_the_forecast_fails(today: float, trust: float) -> None:
    model = history([60.0, 60.0, 60.0, today])  # days 1-3 learn, day 4 is "today"
    # forecast for day 4 comes from days 1-3; at 9:10 the last 10 minutes were surge
    now = (3 * 1440 + 550) * 60
    assert model.trust(now) == pytest.approx(trust, abs=0.05)


def test_trust_is_one_before_the_surge_and_without_history() -> None:
    model = history([60.0, 60.0, 60.0, 0.0])
    assert model.trust((3 * 1440 + 530) * 60) == pytest.approx(1.0)
    assert SeasonalForecast().trust(1000.0) == 1.0


def test_ahead_is_the_forecast_times_trust() -> None:
    model = history([60.0, 60.0, 60.0, 0.0])
    before = (3 * 1440 + 538.5) * 60  # 8:58:30 of the holiday: nothing has failed yet
    assert model.ahead(before, 90.0, 60.0) == pytest.approx(model.forecast(before, 90.0, 60.0))
    late = (3 * 1440 + 555) * 60  # 9:15, fifteen minutes without the surge
    assert model.forecast(late, 90.0, 60.0) > 0
    assert model.ahead(late, 90.0, 60.0) == 0.0


def running(remaining: list[float]) -> list[Running]:
    return [Running(r + 10.0, elapsed_s=10.0) for r in remaining]


@pytest.mark.parametrize(
    ("view", "forecast_s", "replicas"),
    [
        pytest.param(TierView(0, 0), 0.0, 0, id="idle-no-forecast"),
        pytest.param(TierView(0, 0), 300.0, 5, id="idle-surge-ahead"),
        pytest.param(
            TierView(0, 4, running=running([30.0, 50.0, 200.0, 250.0])),
            120.0,
            4,
            id="steady-ending-jobs-free-the-pods-arrivals-need",
        ),
        pytest.param(
            TierView(0, 4, running=running([200.0] * 4)),
            120.0,
            6,
            id="nothing-ends-within-startup",
        ),
        pytest.param(
            TierView(2, 2, ready_costs=[300.0, 2.0], running=running([200.0, 10.0])),
            90.0,
            5,
            id="ready-rounded-up-plus-forecast",
        ),
        pytest.param(TierView(0, 3, running=running([5.0] * 3)), 0.0, 3, id="never-below-work"),
    ],
)
def test_predictive(view: TierView, forecast_s: float, replicas: int) -> None:
    reading = read(view, PREDICTIVE, forecast_s)
    assert reading.replicas == replicas
    assert reading.metric == predictive_metric(view, PREDICTIVE, forecast_s)
    assert reading.metric >= read(view, WORK).metric


def test_predictive_adds_the_forecast_and_activates_on_it() -> None:
    p = Params("predictive", wait_objective_s=W)
    idle = TierView(0, 0)
    assert read(idle, p, forecast_s=30.0).active is False
    reading = read(idle, p, forecast_s=240.0)
    assert (reading.active, reading.replicas, reading.forecast_s) == (True, 4, 240.0)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        pytest.param({"trigger": "queueLength"}, "trigger: unknown mode 'queueLength'", id="mode"),
        pytest.param({"waitObjectiveSeconds": "soon"}, "waitObjectiveSeconds", id="not-a-number"),
        pytest.param({"waitObjectiveSeconds": "0"}, "waitObjectiveSeconds", id="zero"),
        pytest.param({"startupSeconds": "-5"}, "startupSeconds", id="negative-startup"),
    ],
)
def test_bad_metadata_names_the_key(metadata: dict[str, str], message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        params_from_metadata(metadata)


def test_metadata_defaults_and_values() -> None:
    assert params_from_metadata({}) == Params()
    got = params_from_metadata({"trigger": "predictive", "waitObjectiveSeconds": "30"})
    assert (got.trigger, got.wait_objective_s, got.target) == ("predictive", 30.0, 30.0)
