"""Traffic inputs and duration SPECs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from facefleet.keda.simulator.dist import SpecError, parse_spec
from facefleet.keda.simulator.traffic import TRACE_TAIL_S, TrafficError, load_trace, parse_pattern


def test_seed_spike_pattern_is_300_jobs_over_a_10_per_minute_base() -> None:
    arrivals = parse_pattern("spike", random.Random(0)).arrivals
    assert len(arrivals) == 1800
    assert sum(arrivals[300:390]) == 300  # 200/min for 90 s
    assert sum(arrivals[:300]) == 50  # 10/min for 5 min


@pytest.mark.parametrize(
    ("pattern", "total"),
    [
        pytest.param("constant:rate=60,duration=120", 120, id="constant-rate-per-minute"),
        pytest.param("step:base=0,peak=60,at=60,duration=120", 60, id="step-up-and-stay"),
        pytest.param("diurnal:mean=60,amplitude=60,period=120,duration=120", 120, id="diurnal"),
    ],
)
def test_fluid_patterns_emit_expected_totals(pattern: str, total: int) -> None:
    assert sum(parse_pattern(pattern, random.Random(0)).arrivals) == total


def test_bursty_is_seeded() -> None:
    a = parse_pattern("bursty:duration=1200", random.Random(1)).arrivals
    assert a == parse_pattern("bursty:duration=1200", random.Random(1)).arrivals
    assert a != parse_pattern("bursty:duration=1200", random.Random(2)).arrivals


def test_trace_sums_repeated_seconds_and_adds_a_tail(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("t,arrivals\n0,2\n10,3\n10,1\n")
    arrivals = load_trace(path).arrivals
    assert (arrivals[0], arrivals[10], sum(arrivals)) == (2, 4, 6)
    assert len(arrivals) == 11 + TRACE_TAIL_S


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("time,n\n0,1\n", "header must be `t,arrivals`", id="trace-bad-header"),
        pytest.param("t,arrivals\n0,x\n", ":2: expected two integers", id="trace-bad-row"),
        pytest.param("t,arrivals\n-1,1\n", "must be >= 0", id="trace-negative"),
    ],
)
def test_bad_traces(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(TrafficError, match=message):
        load_trace(path)


@pytest.mark.parametrize(
    ("spec", "samples"),
    [
        pytest.param("6", {6}, id="bare-number-is-fixed"),
        pytest.param("fixed:90", {90}, id="fixed"),
        pytest.param("uniform:60,62", {60, 61, 62}, id="uniform-rounds-to-seconds"),
        pytest.param("hist:4=1,8=1", {4, 8}, id="inline-histogram"),
    ],
)
def test_spec_samples(spec: str, samples: set[int]) -> None:
    rng = random.Random(0)
    dist = parse_spec(spec)
    assert {dist.sample(rng) for _ in range(200)} == samples


def test_histogram_file_mean() -> None:
    path = Path(__file__).parents[2] / "keda" / "examples" / "service-hist.csv"
    assert parse_spec(f"hist:{path}").mean() == pytest.approx((80 + 360 + 150 + 150) / 100)


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param("gamma:1,2", id="unknown-kind"),
        pytest.param("uniform:5", id="wrong-arity"),
        pytest.param("uniform:9,1", id="uniform-reversed"),
        pytest.param("fixed:-1", id="negative"),
        pytest.param("hist:/nonexistent.csv", id="missing-histogram-file"),
    ],
)
def test_bad_specs(spec: str) -> None:
    with pytest.raises(SpecError):
        parse_spec(spec)
