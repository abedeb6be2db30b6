"""Files a run leaves behind: timeline.csv (one row per second), summary.json, timeline.png.

The PNG is meant to be read at a glance: top, what users feel (jobs waiting and in flight);
bottom, what the controllers did (desired vs existing vs ready vs busy pods).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from facefleet.keda.simulator.engine import TIMELINE_COLUMNS, Row


def write_timeline(path: Path, rows: list[Row]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(TIMELINE_COLUMNS)
        writer.writerows(rows)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def plot_timeline(path: Path, rows: list[Row], title: str, subtitle: str = "") -> None:
    """Two stacked panels sharing a time axis in minutes; Agg backend, small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r[0] / 60 for r in rows]
    ready = [r[2] for r in rows]
    in_flight = [r[2] + r[3] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, dpi=90)
    top.fill_between(minutes, 0, ready, color="#d62728", alpha=0.6, label="waiting (ready)")
    top.fill_between(
        minutes, ready, in_flight, color="#ff9896", alpha=0.6, label="running (unacked)"
    )
    top.set_ylabel("jobs in queue")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(title, fontsize=10)
    bottom.step(
        minutes,
        [r[4] for r in rows],
        where="post",
        color="k",
        ls="--",
        lw=1,
        label="desired (scale.spec)",
    )
    bottom.plot(minutes, [r[5] for r in rows], color="#1f77b4", lw=1.5, label="pods (GPU held)")
    bottom.plot(minutes, [r[6] for r in rows], color="#2ca02c", lw=1.2, label="ready")
    bottom.plot(minutes, [r[7] for r in rows], color="#ff7f0e", lw=1, label="busy")
    bottom.set_ylabel("replicas")
    bottom.set_xlabel("minutes")
    bottom.legend(loc="upper right", fontsize=8)
    if subtitle:
        bottom.set_title(subtitle, fontsize=9)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_compare(
    path: Path,
    rows: dict[str, list[Row]],
    summaries: dict[str, dict[str, Any]],
    title: str,
    plot_range: tuple[int, int] | None = None,
) -> None:
    """One figure for `simulate compare`: waiting jobs (top) and GPU pods (bottom) per trigger,
    legend with each one's p95 wait and GPU-seconds. Long runs are reduced to the maximum per
    bucket, so a short spike stays visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, dpi=90)
    for trigger, data in rows.items():
        if plot_range is not None:
            data = data[plot_range[0] : plot_range[1]]
        step = max(1, len(data) // 3000)
        xs, ready, pods = [], [], []
        for i in range(0, len(data), step):
            chunk = data[i : i + step]
            xs.append(chunk[0][0] / (3600 if len(data) > 4 * 3600 else 60))
            ready.append(max(r[2] for r in chunk))
            pods.append(max(r[5] for r in chunk))
        s = summaries[trigger]
        label = f"{trigger}: p95 {s['p95_wait_s']} s, {s['gpu_seconds']} GPU-s"
        top.plot(xs, ready, lw=1.1, label=label)
        bottom.plot(xs, pods, lw=1.1, label=trigger)
    top.set_ylabel("jobs waiting (ready)")
    top.set_title(title, fontsize=9)
    top.legend(loc="upper right", fontsize=8)
    bottom.set_ylabel("pods (GPU held)")
    long_run = max((len(d) for d in rows.values()), default=0)
    if plot_range is not None:
        long_run = plot_range[1] - plot_range[0]
    bottom.set_xlabel("hours" if long_run > 4 * 3600 else "minutes")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
