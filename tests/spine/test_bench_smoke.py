"""`make bench`'s spine benchmark still runs end to end, on both job stores, and prints the
figures the README quotes (a few dozen jobs: it checks the harness, it measures nothing)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.pg import ADMIN_URL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RATIO = re.compile(r"facefleet (batched|one by one) \(.*\):\s+([\d.]+) jobs/s =\s+([\d.]+)x celery")
CPU = re.compile(r"^\s+(facefleet batched|facefleet one by one|celery)\s+CPU ms/job: (.*)$", re.M)


def bench_databases() -> set[str]:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'ff_bench_%'")
        return {name for (name,) in rows.fetchall()}


@pytest.mark.parametrize(
    "store", [pytest.param("file", id="file"), pytest.param("postgres", id="postgres")]
)
def test_bench_spine_runs_and_prints_its_ratios(amqp_url: str, store: str) -> None:
    before = bench_databases()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEFLEET_")}
    env.update(AMQP_URL=amqp_url, FACEFLEET_BENCH_PG_URL=ADMIN_URL)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_spine",
            "--jobs",
            "60",
            "--rounds",
            "1",
            "--store",
            store,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    ratios = {kind: (float(rate), float(ratio)) for kind, rate, ratio in RATIO.findall(run.stdout)}
    assert set(ratios) == {"batched", "one by one"}, run.stdout
    assert all(rate > 0 and ratio > 0 for rate, ratio in ratios.values()), ratios
    assert f"job store: {store}" in run.stdout
    cpu = {
        who: dict((k, float(v)) for k, v in re.findall(r"(\w+)\s+([\d.-]+)", parts))
        for who, parts in CPU.findall(run.stdout)
    }
    assert set(cpu) == {"facefleet batched", "facefleet one by one", "celery"}, run.stdout
    assert cpu["facefleet batched"]["workers"] > 0 and cpu["celery"]["workers"] > 0
    assert all(parts["postgres"] >= 0 for parts in cpu.values()), cpu
    if store == "postgres":  # the job state's own CPU is counted where the server is local
        # (in 10 ms clock ticks: 60 batched jobs may cost PostgreSQL less than one tick; the
        # one-by-one run's commits cost it tens)
        ours = cpu["facefleet batched"]["postgres"] + cpu["facefleet one by one"]["postgres"]
        assert ours > 0, cpu
    assert bench_databases() == before  # the bench's database is dropped again
