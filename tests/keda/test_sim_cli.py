"""`facefleet simulate` end to end: outputs, exit codes, the planner's helm line, and the seed
spike goal for the recommended `high` values."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from facefleet.cli import main
from facefleet.keda.simulator.config import (
    DEFAULT_DOWN,
    Policy,
    ScalingRules,
    deep_merge,
    load_tier,
)
from facefleet.keda.simulator.dist import parse_spec
from facefleet.keda.simulator.engine import SimInput
from facefleet.keda.simulator.plan import default_grid, search
from facefleet.keda.simulator.traffic import load_trace

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
CHART_SCHEMA = CHART_VALUES.with_name("values.schema.json")
LEGACY_HIGH = "tiers:\n  high:\n    scaling: {scaleUp: null, scaleDown: null}\n"
"""A release whose `high` tier renders no behaviour (the HPA's legacy path, keda.md §4.5)."""


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


def _helm_scalar(text: str) -> Any:
    """How `helm --set` types a value (strvals): null, booleans, integers, else a string."""
    if text == "null":
        return None
    if text in ("true", "false"):
        return text == "true"
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def _apply_set_line(doc: dict[str, Any], line: str) -> dict[str, Any]:
    """Apply the `--set a.b=v,...` of a `helm upgrade` line to `doc` (null deletes, as Helm)."""
    sets = line.split(" --set ", 1)[1].split(",")
    for item in sets:
        dotted, _, text = item.partition("=")
        *parents, leaf = dotted.split(".")
        node = doc
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        value = _helm_scalar(text)
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return doc


@pytest.mark.parametrize(
    ("grid", "introduced", "up", "down"),
    [
        # scaleUp.pods=8 on a tier without behaviour: the whole scaleUp map is printed with the
        # API defaults (§4.1) for the rest; scaleDown stays null -> API default scale-down.
        pytest.param(
            {"scaling.scaleUp.pods": "8", "scaling.scaleDown.stabilizationWindowSeconds": "null"},
            "scaleUp",
            ScalingRules(0, "Max", (Policy("Pods", 8, 15), Policy("Percent", 100, 15))),
            DEFAULT_DOWN,
            id="plan-introduces-scale-up-map-with-required-keys",
        ),
        pytest.param(
            {"scaling.scaleUp.pods": "null", "scaling.scaleDown.stabilizationWindowSeconds": "60"},
            "scaleDown",
            ScalingRules(0, "Max", (Policy("Pods", 4, 15), Policy("Percent", 100, 15))),
            ScalingRules(60, "Max", (Policy("Percent", 100, 15),)),
            id="plan-introduces-scale-down-map-with-required-keys",
        ),
    ],
)
def test_plan_set_line_passes_chart_schema(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    grid: dict[str, str],
    introduced: str,
    up: ScalingRules,
    down: ScalingRules,
) -> None:
    """The printed --set values, applied to values.yaml plus the release's values, validate
    against values.schema.json and load back to the behaviour that was simulated."""
    release = tmp_path / "release.yaml"
    release.write_text(LEGACY_HIGH, encoding="utf-8")
    args = _args("--pattern", "spike:duration=900", "--target-p95", "100000", values=release)
    grid = {"scaling.maxReplicas": "32", "scaling.jobsPerReplica": "1", **grid}
    for key, values in grid.items():
        args += ["--grid", f"{key}={values}"]
    assert main([args[0], "plan", *args[1:]]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("helm upgrade facefleet ./helm/facefleet --reuse-values --set ")
    for key in ("stabilizationWindowSeconds", "selectPolicy", "periodSeconds"):
        assert f"tiers.high.scaling.{introduced}.{key}=" in line
    chart = yaml.safe_load(CHART_VALUES.read_text(encoding="utf-8"))
    applied = _apply_set_line(deep_merge(chart, yaml.safe_load(LEGACY_HIGH)), line)
    schema = json.loads(CHART_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(applied)
    upgraded = tmp_path / "upgraded.yaml"
    upgraded.write_text(yaml.safe_dump(applied), encoding="utf-8")
    tier = load_tier(upgraded, "high")  # the chart's cross-field rules hold too
    assert tier.behavior is not None
    assert (tier.behavior.up, tier.behavior.down) == (up, down)


def _seed_sim(values: Path) -> SimInput:
    return SimInput(
        load_tier(values, "high"),
        load_trace(SEED_TRACE).with_duration(1800),
        parse_spec("6", floor_s=1),
        parse_spec("90"),
    )


def test_plan_scores_current_legacy_setup(tmp_path: Path) -> None:
    """A null current value stays in the grid, so the no-behaviour setup is a candidate."""
    release = tmp_path / "release.yaml"
    release.write_text(LEGACY_HIGH, encoding="utf-8")
    sim = _seed_sim(release)
    grid = default_grid(sim.tier)
    assert grid["scaling.scaleUp.pods"] == (None, 4, 8, 16)
    assert grid["scaling.scaleDown.stabilizationWindowSeconds"] == (None, 60, 120, 300)
    grid = {"scaling.scaleUp.pods": (None, 8), "scaling.maxReplicas": (32,)}
    _, ranked = search(sim, grid, target_p95_s=100000)
    current = [c for c in ranked if not c.changes]
    assert len(ranked) == 2 and len(current) == 1
    assert current[0].tier.behavior is None  # scored on the HPA legacy path


def test_plan_skips_candidates_the_chart_rejects(tmp_path: Path) -> None:
    """jobsPerReplica below prefetch and activationJobs >= jobsPerReplica (_validate.tpl) are
    never simulated, so never printed."""
    release = tmp_path / "release.yaml"
    release.write_text(
        "tiers:\n  high:\n    prefetch: 2\n    scaling: {jobsPerReplica: 2, activationJobs: 1}\n",
        encoding="utf-8",
    )
    sim = _seed_sim(release)
    _, ranked = search(sim, {"scaling.jobsPerReplica": (1, 2, 3)}, target_p95_s=100000)
    assert sorted(c.tier.jobs_per_replica for c in ranked) == [2.0, 3.0]
