"""`facefleet simulate`, `simulate plan` and `simulate compare`: the simulator's command line.

Registered lazily by facefleet/cli.py (`register(subparsers, "simulate")`). Bad input (unknown
tier, bad SPEC, missing file) is one line on stderr and exit code 2, like argparse's own errors;
`plan` exits 1 when no candidate meets the target.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
from pathlib import Path
from typing import Any

from facefleet.keda.simulator.config import SCALING_TRIGGERS, ConfigError, TierConfig, load_tier
from facefleet.keda.simulator.dist import SpecError, parse_spec
from facefleet.keda.simulator.engine import SimInput, simulate, stats_phase
from facefleet.keda.simulator.plan import default_grid, helm_set_line, parse_grid, search
from facefleet.keda.simulator.report import (
    plot_compare,
    plot_timeline,
    write_summary,
    write_timeline,
)
from facefleet.keda.simulator.stats import summarize
from facefleet.keda.simulator.traffic import Traffic, TrafficError, load_trace, parse_pattern

EXAMPLES = """\
examples:
  facefleet simulate --values helm/facefleet/values.yaml --tier high \\
      --pattern spike:base=10,peak=200,length=90 --service-time 6 --startup 90 --out /tmp/sim
  facefleet simulate plan --values my-values.yaml --tier high --trace keda/examples/seed-spike.csv \\
      --service-time 6 --startup uniform:60,120 --target-p95 60
  facefleet simulate compare --triggers queueLength,work,latency,predictive --values v.yaml \
      --tier high --trace keda/examples/seed-spike.csv --service-time mix:0.9*2,0.1*300 \
      --startup 90 --out /tmp/cmp
"""


def register(sub: Any, name: str) -> None:
    """Add the `simulate` subcommand (with the optional `plan` mode) to facefleet's parser."""
    p = sub.add_parser(
        name,
        help="simulate KEDA/HPA scaling for a tier and plan thresholds",
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "mode",
        nargs="?",
        choices=["plan", "compare"],
        help="plan: search thresholds; compare: run the same traffic under several triggers",
    )
    p.add_argument("--values", type=Path, required=True, help="Helm values file (chart keys)")
    p.add_argument("--tier", required=True, help="tier name under `tiers:`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", type=Path, help="CSV with header `t,arrivals`")
    src.add_argument(
        "--pattern", help="constant|step|spike|diurnal|bursty|workday[:k=v,...] (jobs/min)"
    )
    p.add_argument("--service-time", required=True, help="job duration SPEC, e.g. 6 or hist:F.csv")
    p.add_argument("--startup", required=True, help="pod start-up SPEC, e.g. 90 or uniform:60,120")
    p.add_argument("--duration", type=int, help="seconds to simulate (default: traffic length)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    p.add_argument(
        "--stats-phase",
        type=int,
        choices=range(5),
        metavar="0..4",
        help="second of the management API's 5 s stats refresh (default: drawn from --seed)",
    )
    p.add_argument(
        "--counting",
        choices=["management", "amqp"],
        default="management",
        help="trigger protocol: management API counts ready+unacked (default)",
    )
    p.add_argument("--out", type=Path, help="output directory (required for a run)")
    plan = p.add_argument_group("plan")
    plan.add_argument("--target-p95", type=float, help="p95 wait target in seconds (plan)")
    plan.add_argument("--max-gpu-seconds", type=float, help="GPU-seconds budget (plan)")
    plan.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=v1,v2",
        help="override a searched key under tiers.<tier>, e.g. scaling.maxReplicas=8,16",
    )
    plan.add_argument("--release", default="facefleet", help="Helm release name (plan)")
    plan.add_argument("--chart", default="./helm/facefleet", help="Helm chart reference (plan)")
    cmp = p.add_argument_group("compare")
    cmp.add_argument(
        "--triggers",
        default="queueLength,work,latency,predictive",
        help="comma-separated scaling.trigger values to compare (default: all four)",
    )
    cmp.add_argument(
        "--wait-objective",
        type=float,
        help="waitObjectiveSeconds for the scaler's modes (default: the tier's value)",
    )
    cmp.add_argument(
        "--lookahead",
        type=float,
        help="startupSeconds `predictive` looks ahead (default: the tier's value)",
    )
    cmp.add_argument(
        "--window",
        metavar="HH:MM-HH:MM",
        help="also report waits of jobs arriving in this time of day (e.g. 09:00-10:00)",
    )
    cmp.add_argument(
        "--from-day",
        type=int,
        default=0,
        help="--window counts days from this one on (0-based; 1 skips the forecast's first day)",
    )
    cmp.add_argument(
        "--plot-range",
        metavar="FROM-TO",
        help="seconds of the run to plot (default: all of it)",
    )
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"facefleet simulate: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Entry point for both modes; returns the process exit code."""
    try:
        sim = _sim_input(args)
        if args.mode == "plan":
            return _plan(args, sim)
        if args.mode == "compare":
            return _compare(args, sim)
        if args.out is None:
            raise ConfigError("--out DIR is required (or use `simulate plan`)")
        return _run_once(args.out, sim)
    except (ConfigError, SpecError, TrafficError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror}")


def _sim_input(args: argparse.Namespace) -> SimInput:
    if not args.values.is_file():
        raise ConfigError(f"{args.values}: no such values file")
    if args.duration is not None and args.duration < 1:
        raise ConfigError("--duration must be >= 1")
    tier = load_tier(args.values, args.tier)
    traffic: Traffic
    if args.trace is not None:
        traffic = load_trace(args.trace)
    else:
        traffic = parse_pattern(args.pattern, random.Random(f"{args.seed}:traffic"))
    if args.duration is not None:
        traffic = traffic.with_duration(args.duration)
    return SimInput(
        tier=tier,
        traffic=traffic,
        service=parse_spec(args.service_time, floor_s=1),
        startup=parse_spec(args.startup, floor_s=0),
        seed=args.seed,
        counting=args.counting,
        stats_phase_s=args.stats_phase,
    )


def static_fleet_size(sim: SimInput) -> int:
    """Pods a fixed fleet needs for the busiest minute: peak rate x mean job time / prefetch."""
    busy = sim.traffic.peak_per_min() / 60 * sim.service.mean() / sim.tier.prefetch
    return max(1, math.ceil(busy - 1e-9))


def static_baseline(sim: SimInput) -> dict[str, Any]:
    """The always-warm fleet sized for the busiest minute, on the same jobs."""
    n = static_fleet_size(sim)
    static = summarize(simulate(dataclasses.replace(sim, static_replicas=n)))
    return {
        "replicas": n,
        "gpu_seconds": static["gpu_seconds"],
        "p95_wait_s": static["p95_wait_s"],
        "drain_time_s": static["drain_time_s"],
    }


def run_with_baseline(
    sim: SimInput,
    static: dict[str, Any] | None = None,
    window: tuple[int, int] | None = None,
    from_day: int = 0,
) -> tuple[dict[str, Any], Any]:
    """Summary of the autoscaled run, with the static-fleet baseline folded in."""
    result = simulate(sim)
    summary = summarize(result, window, from_day)
    static = static_baseline(sim) if static is None else static
    summary["static_fleet"] = static
    summary["gpu_vs_static"] = round(summary["gpu_seconds"] / max(static["gpu_seconds"], 1), 3)
    summary["inputs"] = _inputs(sim)
    return summary, result


def _inputs(sim: SimInput) -> dict[str, Any]:
    t: TierConfig = sim.tier
    return {
        "tier": t.name,
        "mode": t.mode,
        "traffic": sim.traffic.label,
        "seed": sim.seed,
        "counting": sim.counting,
        "stats_phase_s": stats_phase(sim),
        "jobsPerReplica": t.jobs_per_replica,
        "minReplicas": t.min_replicas,
        "maxReplicas": t.max_replicas,
        "pollingInterval": t.polling_interval_s,
        "drain_timeout_s": t.drain_timeout_s,
        "behavior": "legacy (none rendered)" if t.behavior is None else "rendered",
        "trigger": t.trigger,
        "waitObjectiveSeconds": t.wait_objective_s,
        "startupSeconds": t.lookahead_s,
    }


def _run_once(out: Path, sim: SimInput) -> int:
    out.mkdir(parents=True, exist_ok=True)
    summary, result = run_with_baseline(sim)
    write_timeline(out / "timeline.csv", result.rows)
    write_summary(out / "summary.json", summary)
    static = summary["static_fleet"]
    plot_timeline(
        out / "timeline.png",
        result.rows,
        f"tier {sim.tier.name}, {sim.traffic.label}: p95 wait {summary['p95_wait_s']} s, "
        f"drain {summary['drain_time_s']} s",
        f"GPU-seconds {summary['gpu_seconds']} vs static fleet of {static['replicas']}: "
        f"{static['gpu_seconds']} ({summary['gpu_vs_static']:.0%})",
    )
    keys = (
        "jobs",
        "p50_wait_s",
        "p95_wait_s",
        "max_wait_s",
        "drain_time_s",
        "gpu_seconds",
        "jobs_killed_on_scale_in",
        "max_replicas_seen",
        "gpu_vs_static",
    )
    print(" ".join(f"{k}={summary[k]}" for k in keys))
    print(f"wrote {out}/timeline.csv, summary.json, timeline.png")
    return 0


def _plan(args: argparse.Namespace, sim: SimInput) -> int:
    if args.target_p95 is None:
        raise ConfigError("plan needs --target-p95 SECONDS")
    grid = default_grid(sim.tier)
    grid.update(parse_grid(args.grid))
    best, ranked = search(sim, grid, args.target_p95, args.max_gpu_seconds)
    print(f"searched {len(ranked)} candidates over: {', '.join(sorted(grid))}")
    for c in ranked[:5]:
        s = c.summary
        changes = ", ".join(f"{k}={v}" for k, v in c.changes) or "(current values)"
        print(
            f"  p95 {s['p95_wait_s']:>5} s  drain {s['drain_time_s']} s  "
            f"gpu {s['gpu_seconds']:>7}  killed {s['jobs_killed_on_scale_in']}  {changes}"
        )
    if best is None:
        print(
            f"no candidate meets p95 <= {args.target_p95:g} s"
            + (f" within {args.max_gpu_seconds:g} GPU-seconds" if args.max_gpu_seconds else ""),
            file=sys.stderr,
        )
        return 1
    print(helm_set_line(args.release, args.chart, sim.tier.name, best.changes))
    return 0


COMPARE_COLUMNS = (
    ("p50_wait_s", "p50 wait"),
    ("p95_wait_s", "p95 wait"),
    ("window_p95_wait_s", "window p95"),
    ("drain_time_s", "drain"),
    ("gpu_seconds", "GPU-s"),
    ("gpu_vs_static", "vs static"),
    ("max_replicas_seen", "max pods"),
    ("jobs_killed_on_scale_in", "killed"),
    ("busy_pods_terminated", "busy SIGTERM"),
)


def _parse_window(text: str) -> tuple[int, int]:
    try:
        start, end = (
            int(h) * 3600 + int(m) * 60 for h, m in (part.split(":") for part in text.split("-"))
        )
    except ValueError:
        raise ConfigError(f"--window {text!r}: expected HH:MM-HH:MM, e.g. 09:00-10:00") from None
    if not 0 <= start < end <= 86400:
        raise ConfigError(f"--window {text!r}: start must be before end, within one day")
    return start, end


def _parse_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise ConfigError(f"--plot-range {text!r}: expected FROM-TO in seconds") from None
    if not 0 <= lo < hi:
        raise ConfigError(f"--plot-range {text!r}: FROM must be below TO")
    return lo, hi


def compare_triggers(
    sim: SimInput,
    triggers: list[str],
    wait_objective_s: float | None = None,
    lookahead_s: float | None = None,
    window: tuple[int, int] | None = None,
    from_day: int = 0,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """One run per trigger on the very same jobs (same seed, same draws) and one static
    baseline; returns ({trigger: summary}, {trigger: timeline rows})."""
    for trigger in triggers:
        if trigger not in SCALING_TRIGGERS:
            raise ConfigError(
                f"--triggers: unknown trigger {trigger!r}; use {', '.join(SCALING_TRIGGERS)}"
            )
    if sim.tier.mode != "deployment":
        raise ConfigError(f"compare: tier {sim.tier.name} is mode job; its trigger is queueLength")
    tier = sim.tier
    if wait_objective_s is not None:
        tier = dataclasses.replace(tier, wait_objective_s=wait_objective_s)
    if lookahead_s is not None:
        tier = dataclasses.replace(tier, lookahead_s=lookahead_s)
    static = static_baseline(sim)
    summaries: dict[str, dict[str, Any]] = {}
    rows: dict[str, Any] = {}
    for trigger in triggers:
        one = dataclasses.replace(sim, tier=dataclasses.replace(tier, trigger=trigger))
        summaries[trigger], result = run_with_baseline(one, static, window, from_day)
        rows[trigger] = result.rows
    return summaries, rows


def _compare(args: argparse.Namespace, sim: SimInput) -> int:
    if args.out is None:
        raise ConfigError("compare needs --out DIR")
    for flag, value in (("--wait-objective", args.wait_objective), ("--lookahead", args.lookahead)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} must be a number above 0")
    if args.from_day < 0:
        raise ConfigError("--from-day must be >= 0")
    triggers = [x.strip() for x in args.triggers.split(",") if x.strip()]
    if not triggers or len(set(triggers)) != len(triggers):
        raise ConfigError("--triggers: give each trigger once, e.g. queueLength,work")
    window = _parse_window(args.window) if args.window else None
    plot_range = _parse_range(args.plot_range) if args.plot_range else None
    summaries, rows = compare_triggers(
        sim, triggers, args.wait_objective, args.lookahead, window, args.from_day
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_summary(args.out / "compare.json", summaries)
    columns = [(k, h) for k, h in COMPARE_COLUMNS if window is not None or k[:6] != "window"]
    width = max(len(t) for t in triggers) + 2
    print(f"{'trigger':<{width}}" + "".join(f"{h:>13}" for _, h in columns))
    for trigger, s in summaries.items():
        cells = "".join(f"{'-' if s[k] is None else s[k]!s:>13}" for k, _ in columns)
        print(f"{trigger:<{width}}{cells}")
    static = next(iter(summaries.values()))["static_fleet"]
    print(f"static fleet of {static['replicas']}: {static['gpu_seconds']} GPU-s, "
          f"p95 wait {static['p95_wait_s']} s")  # fmt: skip
    plot_compare(
        args.out / "compare.png",
        rows,
        summaries,
        f"tier {sim.tier.name}, {sim.traffic.label}, service {args.service_time}, "
        f"start-up {args.startup}",
        plot_range,
    )
    print(f"wrote {args.out}/compare.json, compare.png")
    return 0
