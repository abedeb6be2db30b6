"""The simulator's scaler modes (`facefleet simulate compare`), job-size mixtures, the workday
pattern, and the two HPA details fixed to match the Go controller."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

import facefleet.keda.simulator.engine as engine
from facefleet import keda
from facefleet.cli import main
from facefleet.keda.simulator.config import TierConfig, load_tier
from facefleet.keda.simulator.dist import SpecError, parse_spec
from facefleet.keda.simulator.hpa import MAX_INT32, Hpa, _Rec, external_average_value_proposal
from facefleet.keda.simulator.traffic import parse_pattern

CHART_VALUES = Path(__file__).parents[2] / "helm" / "facefleet" / "values.yaml"
MIX = "mix:0.9*2,0.1*300,sd=0.2"


@pytest.mark.parametrize(
    ("spec", "values", "weights", "mean"),
    [
        pytest.param("mix:0.9*2,0.1*300", (2.0, 300.0), (0.9, 0.1), 31.8, id="photos-and-videos"),
        pytest.param("mix:3*10,1*50,sd=0.1", (10.0, 50.0), (3.0, 1.0), 20.0,
                     id="relative-weights-with-spread"),
        pytest.param("mix:1*7", (7.0,), (1.0,), 7.0, id="one-component"),
    ],
)  # fmt: skip
def test_mixture_spec(
    spec: str, values: tuple[float, ...], weights: tuple[float, ...], mean: float
) -> None:
    d = parse_spec(spec, floor_s=1)
    assert (d.kind, d.params, d.weights) == ("mix", values, weights)
    assert d.mean() == pytest.approx(mean)
    rng = random.Random(0)
    draws = [d.sample(rng) for _ in range(4000)]
    assert min(draws) >= 1
    assert sum(draws) / len(draws) == pytest.approx(mean, rel=0.1)


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param("mix:", id="empty"),
        pytest.param("mix:0.9=2", id="hist-syntax"),
        pytest.param("mix:0.9*x", id="not-a-number"),
        pytest.param("mix:0*2,0*3", id="zero-total-weight"),
        pytest.param("mix:-1*2", id="negative-weight"),
        pytest.param("mix:1*2,sd=-1", id="negative-spread"),
    ],
)
def test_mixture_spec_rejected(spec: str) -> None:
    with pytest.raises(SpecError, match="mix"):
        parse_spec(spec)


@pytest.mark.parametrize(
    ("recs", "expected"),
    [
        pytest.param([(5, 0), (6, 300), (7, 400)], [(9, 500), (6, 300), (7, 400)],
                     id="one-stale-entry-reused"),
        pytest.param([(5, 0), (6, 10), (7, 20), (8, 400)], [(5, 0), (6, 10), (9, 500), (8, 400)],
                     id="several-stale-last-one-reused"),
        pytest.param([(7, 400)], [(7, 400), (9, 500)], id="none-stale-appended"),
    ],
)  # fmt: skip
def test_stale_recommendation_reuse_is_the_last(
    recs: list[tuple[int, int]], expected: list[tuple[int, int]]
) -> None:
    """stabilizeRecommendation's loop does not break: the LAST stale entry is overwritten."""
    hpa = Hpa(TierConfig(name="t"), recommendations=[_Rec(v, t) for v, t in recs])
    hpa._store(9, 500, lambda r: r.time_s < 500 - 300)
    assert [(r.value, r.time_s) for r in hpa.recommendations] == expected


@pytest.mark.parametrize(
    ("metric", "target", "status", "expected"),
    [
        pytest.param(1e12, 1.0, 0, MAX_INT32, id="capped-from-zero"),
        pytest.param(1e12, 0.001, 3, MAX_INT32, id="capped-tiny-target"),
        pytest.param(2.0**31, 1.0, 0, MAX_INT32, id="just-above"),
        pytest.param(100.0, 1.0, 0, 100, id="normal"),
    ],
)
def test_external_proposal_capped_at_maxint32(
    metric: float, target: float, status: int, expected: int
) -> None:
    assert external_average_value_proposal(metric, target, status) == expected


def test_engine_uses_the_scalers_arithmetic() -> None:
    """Imported, not copied: the simulator answers with the very functions the scaler serves."""
    assert engine.read is keda.scaling.read
    assert engine.SeasonalForecast is keda.scaling.SeasonalForecast


@pytest.mark.parametrize(
    ("t", "expected_per_min"),
    [
        pytest.param(0, 5.0, id="midnight-trough"),
        pytest.param(9 * 3600 - 60, None, id="before-surge"),
        pytest.param(9 * 3600, 150.0, id="surge-at-9"),
        pytest.param(86400 + 9 * 3600 + 60, 150.0, id="surge-next-day"),
    ],
)
def test_workday_pattern(t: int, expected_per_min: float | None) -> None:
    traffic = parse_pattern("workday:duration=172800", random.Random(0))
    minute = sum(traffic.arrivals[t : t + 60])
    base = 20 - 15 * math.cos(2 * math.pi * t / 86400)
    surge = expected_per_min if expected_per_min and t % 86400 >= 9 * 3600 else 0.0
    assert minute == pytest.approx(base + surge, abs=2)


@pytest.mark.parametrize(
    ("options", "day", "surge_at"),
    [
        pytest.param("", 2, 9 * 3600, id="every-day-at-9"),
        pytest.param(",holiday=2", 2, None, id="holiday-no-surge"),
        pytest.param(",holiday=2", 1, 9 * 3600, id="holiday-only-that-day"),
        pytest.param(",moved=2,moved_at=36000", 2, 10 * 3600, id="moved-to-10"),
        pytest.param(",moved=2,moved_at=36000", 1, 9 * 3600, id="moved-only-that-day"),
    ],
)
def test_workday_holiday_and_moved_surge(options: str, day: int, surge_at: int | None) -> None:
    """The forecast's failure modes as traffic: day `day` (1-based) without or with a moved
    surge; the surge is the only hour of the morning above 40 jobs/min."""
    traffic = parse_pattern(f"workday:duration=172800{options}", random.Random(0))
    start = (day - 1) * 86400
    busy = [h for h in range(6, 12) if sum(traffic.arrivals[start + h * 3600 :][:600]) > 400]
    assert busy == ([] if surge_at is None else [surge_at // 3600])


def test_compare_writes_one_summary_per_trigger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A small compare (15 min of the seed spike's shape, mixed job sizes): compare.json has one
    summary per trigger with every field of summary.json, the table and the plot are written,
    and no mode ever stops a job on scale-in; the scaler's modes never SIGTERM a busy pod."""
    common = ["--values", str(CHART_VALUES), "--tier", "high", "--service-time", MIX,
              "--startup", "90", "--pattern", "spike:base=2,peak=40,duration=900"]  # fmt: skip
    assert main(["simulate", *common, "--out", str(tmp_path / "one")]) == 0
    fields = set(json.loads((tmp_path / "one" / "summary.json").read_text()))
    out = tmp_path / "cmp"
    assert main(["simulate", "compare", *common, "--out", str(out), "--window", "00:05-00:07"]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert list(data) == ["queueLength", "work", "latency", "predictive"]
    for trigger, summary in data.items():
        assert fields <= set(summary), trigger
        assert summary["inputs"]["trigger"] == trigger
        assert summary["jobs"] == data["queueLength"]["jobs"]  # the very same jobs
        assert summary["jobs_killed_on_scale_in"] == 0, trigger
        assert summary["window_jobs"] > 0
        if trigger != "queueLength":
            assert summary["busy_pods_terminated"] == 0, trigger
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    for trigger in data:
        assert f"\n{trigger} " in table


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(["--triggers", "work,cpu"], "unknown trigger 'cpu'", id="unknown-trigger"),
        pytest.param(["--triggers", "work,work"], "give each trigger once", id="duplicate"),
        pytest.param(["--wait-objective", "0"], "--wait-objective must be", id="zero-objective"),
        pytest.param(["--window", "10:00-09:00"], "start must be before end", id="bad-window"),
    ],
)
def test_compare_rejects_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    args = ["simulate", "compare", "--values", str(CHART_VALUES), "--tier", "high",
            "--service-time", "6", "--startup", "90", "--pattern", "constant:duration=60",
            "--out", str(tmp_path), *extra]  # fmt: skip
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_scaler_trigger_on_a_job_tier_is_rejected(tmp_path: Path) -> None:
    values = tmp_path / "v.yaml"
    values.write_text("tiers:\n  batch:\n    scaling:\n      trigger: work\n")
    with pytest.raises(ValueError, match="ScaledJobs stay on queueLength"):
        load_tier(values, "batch")
