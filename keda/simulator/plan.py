"""Threshold planner: the cheapest `tiers.<tier>.scaling.*` values that meet a p95 wait target.

A plain grid search over the knobs that matter (keys under `tiers.<tier>`), every candidate run on
the same seeded jobs, so differences come from the settings alone. Candidates are validated by
the same code that reads values files, so the printed `--set` line is one the chart accepts.
Cheapest = fewest GPU-seconds; ties go to the lower p95, then to fewer changed keys.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from keda.simulator.config import ConfigError, TierConfig, tier_from_mapping
from keda.simulator.engine import SimInput, simulate
from keda.simulator.stats import summarize

Grid = dict[str, tuple[Any, ...]]


def default_grid(tier: TierConfig) -> Grid:
    """Knobs worth searching, each including the tier's current value."""
    s = tier.values.get("scaling", {})
    up, down = s.get("scaleUp") or {}, s.get("scaleDown") or {}
    grid: Grid = {
        "scaling.jobsPerReplica": (s.get("jobsPerReplica"), 1, 2, 3, 4),
        "scaling.maxReplicas": (s.get("maxReplicas"), 10, 16, 20, 24, 32),
    }
    if tier.mode == "deployment":
        grid["scaling.scaleUp.pods"] = (up.get("pods"), 4, 8, 16)
        grid["scaling.scaleDown.stabilizationWindowSeconds"] = (
            down.get("stabilizationWindowSeconds"),
            60,
            120,
            300,
        )
    return {k: tuple(dict.fromkeys(v for v in vals if v is not None)) for k, vals in grid.items()}


def parse_grid(items: Sequence[str]) -> Grid:
    """`KEY=v1,v2` items (KEY relative to tiers.<tier>, e.g. scaling.maxReplicas)."""
    grid: Grid = {}
    for item in items:
        key, eq, values = item.partition("=")
        if not eq or not key or not values:
            raise ConfigError(f"bad --grid {item!r}: expected KEY=v1,v2,...")
        grid[key] = tuple(_scalar(v) for v in values.split(","))
    return grid


def _scalar(text: str) -> Any:
    if text == "null":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _set(mapping: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = mapping
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


@dataclass(frozen=True)
class Candidate:
    changes: tuple[tuple[str, Any], ...]
    summary: dict[str, Any]


def search(
    base: SimInput, grid: Grid, target_p95_s: float, max_gpu_seconds: float | None = None
) -> tuple[Candidate | None, list[Candidate]]:
    """Run every grid point; return (best feasible or None, all candidates ranked)."""
    keys = sorted(grid)
    results: list[Candidate] = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        raw = copy.deepcopy(base.tier.values)
        for key, value in zip(keys, combo, strict=True):
            _set(raw, key, value)
        try:
            tier = tier_from_mapping(base.tier.name, raw)
        except ConfigError:
            continue  # e.g. minReplicas > maxReplicas: not a candidate the chart would accept
        summary = summarize(simulate(dataclasses.replace(base, tier=tier)))
        changes = tuple(
            (k, v) for k, v in zip(keys, combo, strict=True) if _get(base.tier.values, k) != v
        )
        results.append(Candidate(changes, summary))

    def feasible(c: Candidate) -> bool:
        s = c.summary
        gpu_ok = max_gpu_seconds is None or s["gpu_seconds"] <= max_gpu_seconds
        return bool(s["p95_wait_s"] <= target_p95_s and gpu_ok and s["jobs_unstarted"] == 0)

    results.sort(
        key=lambda c: (
            not feasible(c),
            c.summary["gpu_seconds"] if feasible(c) else c.summary["p95_wait_s"],
            c.summary["p95_wait_s"],
            len(c.changes),
        )
    )
    best = results[0] if results and feasible(results[0]) else None
    return best, results


def _get(mapping: dict[str, Any], dotted: str) -> Any:
    node: Any = mapping
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def helm_set_line(release: str, chart: str, tier: str, changes: Sequence[tuple[str, Any]]) -> str:
    """The `helm upgrade` command that applies `changes` on top of the release's values."""
    if not changes:
        return f"# the current values of tiers.{tier} already meet the target; nothing to set"
    sets = ",".join(f"tiers.{tier}.{k}={_helm_value(v)}" for k, v in changes)
    return f"helm upgrade {release} {chart} --reuse-values --set {sets}"


def _helm_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
