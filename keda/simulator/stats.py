"""What an operator asks of a run: how long jobs waited, how long a spike took, what it cost.

Waits are arrival -> start of the attempt that completed (a job killed on scale-in waits again).
Jobs still queued at the end count with their censored wait so a run that never drains cannot
look good. Percentiles are nearest-rank, so every reported wait is one a real job had.
"""

from __future__ import annotations

import math
from typing import Any

from facefleet.keda.simulator.engine import SimResult


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def drain_time(ready: list[int]) -> int | None:
    """Length of the largest backlog episode: from the last empty second before the peak of the
    ready queue until it is empty again. None if it never empties; 0 if nothing ever queued."""
    if not ready or max(ready) == 0:
        return 0
    peak = ready.index(max(ready))
    start = peak
    while start > 0 and ready[start - 1] > 0:
        start -= 1
    for t in range(peak, len(ready)):
        if ready[t] == 0:
            return t - start
    return None


DAY_S = 86400


def window_waits(result: SimResult, window: tuple[int, int], from_day: int = 0) -> list[int]:
    """Waits of the jobs that arrived within [start, end) seconds of each day, from day
    `from_day` (0-based) on: e.g. the 9 am surge once the forecast has a day of history. Jobs
    never started are left out (their censored waits count in the run's overall p95)."""
    start, end = window
    arrivals = result.stats.arrivals
    return [
        wait
        for job, wait in result.stats.waits.items()
        if arrivals[job] >= from_day * DAY_S and start <= arrivals[job] % DAY_S < end
    ]


def summarize(
    result: SimResult, window: tuple[int, int] | None = None, from_day: int = 0
) -> dict[str, Any]:
    waits = list(result.stats.waits.values()) + result.unstarted_waits
    ready = [row[2] for row in result.rows]
    extra: dict[str, Any] = {}
    if window is not None:
        inside = window_waits(result, window, from_day)
        extra = {
            "window": {"start_s": window[0], "end_s": window[1], "from_day": from_day},
            "window_jobs": len(inside),
            "window_p50_wait_s": percentile(inside, 50),
            "window_p95_wait_s": percentile(inside, 95),
        }
    return {
        "jobs": result.jobs,
        "p50_wait_s": percentile(waits, 50),
        "p95_wait_s": percentile(waits, 95),
        "max_wait_s": max(waits, default=0),
        "drain_time_s": drain_time(ready),
        "gpu_seconds": result.stats.gpu_seconds,
        "jobs_killed_on_scale_in": result.stats.killed_on_scale_in,
        "busy_pods_terminated": result.stats.busy_pods_terminated,
        "max_replicas_seen": max((row[5] for row in result.rows), default=0),
        "jobs_completed": result.stats.completed,
        "jobs_unstarted": len(result.unstarted_waits),
        "peak_backlog": max(ready, default=0),
        "duration_s": len(result.rows),
        **extra,
    }
