"""Threshold planner: the cheapest `tiers.<tier>.scaling.*` values that meet a p95 wait target.

A plain grid search over the knobs that matter (keys under `tiers.<tier>`), every candidate run on
the same seeded jobs, so differences come from the settings alone. Each knob's grid includes the
tier's current value, even when that is null (e.g. no `scaleUp` map: the HPA's legacy path), so
the current setup is always scored. A candidate that sets a key inside a null behaviour map
introduces the whole map, filled with the API defaults (keda.md §4.1) in the chart's keys, and the
printed `--set` line carries every key of it, as values.schema.json requires. Candidates are
validated by the same code that reads values files (schema ranges and the chart's _validate.tpl
rules), so the printed line is one the chart accepts.
Cheapest = fewest GPU-seconds; ties go to the lower p95, then to fewer changed keys.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from facefleet.keda.simulator.config import (
    DEFAULT_DOWN,
    DEFAULT_UP,
    ConfigError,
    TierConfig,
    behavior_values,
    tier_from_mapping,
)
from facefleet.keda.simulator.engine import SimInput, simulate
from facefleet.keda.simulator.stats import summarize

Grid = dict[str, tuple[Any, ...]]

BEHAVIOR_MAPS = {
    "scaling.scaleUp": behavior_values(DEFAULT_UP),
    "scaling.scaleDown": behavior_values(DEFAULT_DOWN),
}
"""What a null direction becomes when a candidate sets one of its keys: the behaviour the API
server would default it to (§4.1), so only the key the candidate sets differs."""


def default_grid(tier: TierConfig) -> Grid:
    """Knobs worth searching, each starting with the tier's current value (None included)."""
    v = tier.values
    grid: Grid = {
        "scaling.jobsPerReplica": (_get(v, "scaling.jobsPerReplica"), 1, 2, 3, 4),
        "scaling.maxReplicas": (_get(v, "scaling.maxReplicas"), 10, 16, 20, 24, 32),
    }
    if tier.mode == "deployment":
        grid["scaling.scaleUp.pods"] = (_get(v, "scaling.scaleUp.pods"), 4, 8, 16)
        key = "scaling.scaleDown.stabilizationWindowSeconds"
        grid[key] = (_get(v, key), 60, 120, 300)
    return {k: tuple(dict.fromkeys(vals)) for k, vals in grid.items()}


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
    """Set `dotted` like `--set` would; a null behaviour direction becomes its full API-default
    map first. Setting None under a missing/null map changes nothing (it is the current value)."""
    keys = dotted.split(".")
    node = mapping
    for depth, key in enumerate(keys[:-1], start=1):
        if not isinstance(node.get(key), dict):
            if value is None:
                return
            path = ".".join(keys[:depth])
            node[key] = copy.deepcopy(BEHAVIOR_MAPS.get(path, {}))
        node = node[key]
    node[keys[-1]] = value


def _get(mapping: dict[str, Any], dotted: str) -> Any:
    node: Any = mapping
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _leaves(mapping: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def changed_keys(base: dict[str, Any], candidate: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Leaves of `candidate` that differ from `base` (a missing key counts as null)."""
    return tuple(sorted((k, v) for k, v in _leaves(candidate) if _get(base, k) != v))


@dataclass(frozen=True)
class Candidate:
    changes: tuple[tuple[str, Any], ...]
    summary: dict[str, Any]
    tier: TierConfig


def search(
    base: SimInput, grid: Grid, target_p95_s: float, max_gpu_seconds: float | None = None
) -> tuple[Candidate | None, list[Candidate]]:
    """Run every grid point; return (best feasible or None, all candidates ranked)."""
    keys = sorted(grid)
    results: list[Candidate] = []
    seen: set[tuple[tuple[str, Any], ...]] = set()
    for combo in itertools.product(*(grid[k] for k in keys)):
        raw = copy.deepcopy(base.tier.values)
        for key, value in zip(keys, combo, strict=True):
            _set(raw, key, value)
        changes = changed_keys(base.tier.values, raw)
        if changes in seen:
            continue  # e.g. two spellings of the current value
        seen.add(changes)
        try:
            tier = tier_from_mapping(
                base.tier.name,
                raw,
                drain_margin_s=base.tier.drain_margin_s,
                rbac_create=base.tier.rbac_create,
            )
        except ConfigError:
            continue  # e.g. jobsPerReplica below prefetch: the chart would refuse it
        summary = summarize(simulate(dataclasses.replace(base, tier=tier)))
        results.append(Candidate(changes, summary, tier))

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
