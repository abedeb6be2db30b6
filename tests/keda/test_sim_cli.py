"""`facefleet simulate` end to end: outputs, exit codes, the planner's helm line, and the seed
spike goal for the recommended `high` values."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from facefleet.cli import main

EXAMPLES = Path(__file__).parents[2] / "keda" / "examples"
RECOMMENDED = EXAMPLES / "values-high-recommended.yaml"
SEED_TRACE = EXAMPLES / "seed-spike.csv"


def _args(*extra: str, values: Path = RECOMMENDED) -> list[str]:
    return [
        "simulate",
        "--values",
        str(values),
        "--tier",
        "high",
        "--service-time",
        "6",
        "--startup",
        "90",
        *extra,
    ]


CHART_VALUES = Path(__file__).parents[2] / "helm" / "facefleet" / "values.yaml"


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(RECOMMENDED, id="recommended-example"),
        pytest.param(CHART_VALUES, id="chart-defaults"),
    ],
)
def test_seed_spike_meets_goal(tmp_path: Path, values: Path) -> None:
    """Goal from the issue: the 300-job backlog drains in <= 5 min using <= half the
    GPU-seconds of a static fleet sized for the peak (200/min x 6 s = 20 pods), over 30 min."""
    rc = main(
        _args(
            "--trace", str(SEED_TRACE), "--duration", "1800", "--out", str(tmp_path), values=values
        )
    )
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["jobs"] == 585
    assert summary["static_fleet"]["replicas"] == 20
    assert summary["drain_time_s"] <= 300
    assert summary["gpu_seconds"] <= summary["static_fleet"]["gpu_seconds"] / 2
    assert summary["jobs_killed_on_scale_in"] == 0
    with (tmp_path / "timeline.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == [
        "t",
        "arrivals",
        "ready",
        "unacked",
        "desired_replicas",
        "replicas",
        "ready_replicas",
        "busy_pods",
    ]
    assert len(rows) == 1801
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def _plan(target_p95: str, max_replicas: str) -> list[str]:
    grid = {
        "scaling.maxReplicas": max_replicas,
        "scaling.jobsPerReplica": "1",
        "scaling.scaleUp.pods": "8",
        "scaling.scaleDown.stabilizationWindowSeconds": "120",
    }
    args = _args("--pattern", "spike:duration=900", "--target-p95", target_p95)
    for key, values in grid.items():
        args += ["--grid", f"{key}={values}"]
    return [args[0], "plan", *args[1:]]


def test_plan_prints_helm_upgrade_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_plan("150", "8,16")) == 0
    out = capsys.readouterr().out
    assert "searched 2 candidates" in out
    # 8 pods cannot keep p95 under 150 s after a 90 s start-up; 16 can, and differs from 32.
    assert out.strip().splitlines()[-1] == (
        "helm upgrade facefleet ./helm/facefleet --reuse-values "
        "--set tiers.high.scaling.maxReplicas=16"
    )


def test_plan_without_feasible_candidate_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_plan("5", "4")) == 1
    assert "no candidate meets p95 <= 5 s" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "values", "message"),
    [
        pytest.param(
            ["--tier", "gold", "--pattern", "spike", "--out", "x"],
            RECOMMENDED,
            "unknown tier 'gold'",
            id="cli-unknown-tier",
        ),
        pytest.param(
            ["--pattern", "spike", "--service-time", "gamma:2", "--out", "x"],
            RECOMMENDED,
            "bad SPEC 'gamma:2'",
            id="cli-bad-spec",
        ),
        pytest.param(
            ["--trace", "/nonexistent.csv", "--out", "x"],
            RECOMMENDED,
            "/nonexistent.csv: cannot read",
            id="cli-missing-trace",
        ),
        pytest.param(
            ["--pattern", "spike", "--out", "x"],
            Path("/nonexistent.yaml"),
            "no such values file",
            id="cli-missing-values",
        ),
        pytest.param(["--pattern", "spike"], RECOMMENDED, "--out DIR is required", id="cli-no-out"),
        pytest.param(
            ["--pattern", "wave", "--out", "x"],
            RECOMMENDED,
            "unknown pattern",
            id="cli-bad-pattern",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    extra: list[str], values: Path, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_args(*extra, values=values)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
