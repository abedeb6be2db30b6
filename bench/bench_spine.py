"""No-op jobs end to end: FaceFleet vs Celery on the same broker, in the same run.

FaceFleet: confirmed publish (+ `queued` event) -> worker (noop processor) -> result committed
-> `completed` event confirmed into the stream -> ack. Throughput is jobs / (first publish ..
last `completed` seen). Two FaceFleet runs: batched (JobClient.submit_many, the worker's batch
lane) and one by one (submit() per job, --batch 1).
Celery 5 baseline: acks_late, prefetch 1, quorum queue, publisher confirms, prefork -c N;
throughput is tasks / (first publish .. last marker file written by a task).

Both get the same number of worker processes. Runs are interleaved (FaceFleet, Celery, ...) and
the medians are compared, because this 2-core machine's run-to-run spread is about ±30%.

    python -m bench.bench_spine --jobs 2000 --rounds 3 [--store postgres]

`--store postgres` keeps FaceFleet's job state in a fresh PostgreSQL database (created on
FACEFLEET_BENCH_PG_URL, default the local server, migrated, dropped at the end) instead of the
journals in the data root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika

from bench import floor
from facefleet.broker import discover
from facefleet.producer.sdk import JobClient
from facefleet.settings import ProducerSettings
from facefleet.wire import (
    EVENTS_EXCHANGE,
    control_pending_queue,
    dead_notify_queue,
    job_queue,
)

REPO = Path(__file__).resolve().parent.parent


LEFTOVERS: list[Path] = []
"""Data roots and marker dirs of finished runs, deleted only after the last measurement.

Why: ext4 skips inodes freed in the last minutes when it allocates new ones, reading their
inode-table blocks to find out (`recently_deleted`); deleting one run's ~10,000 files right
before the next run made file creation there several times dearer (perf: a quarter of a
worker's CPU in the allocator), which no steady production system pays."""


def clean_up() -> None:
    while LEFTOVERS:
        shutil.rmtree(LEFTOVERS.pop(), ignore_errors=True)


def _env(amqp_url: str, data_root: Path, tier: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEFLEET_")}
    env.update(
        AMQP_URL=amqp_url,
        FACEFLEET_DATA_ROOT=str(data_root),
        FACEFLEET_TIERS=json.dumps([{"name": tier, "max_length": 1_000_000}]),
        FACEFLEET_TIER=tier,
        FACEFLEET_HEALTH_PORT="0",
        FACEFLEET_LOG_LEVEL="WARNING",
        **extra,
    )
    return env


def _cpu_s(pid: int) -> float:
    """utime + stime of one process, all its threads (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(root: int) -> list[int]:
    """root and its descendants (Celery's prefork children do the work)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def _pids_named(comm: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as fh:
                    if fh.read().strip() == comm:
                        pids.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return pids


class CpuMeter:
    """CPU seconds spent by the bench process (producer + completion detection), the workers
    and the broker between start() and stop(): on a CPU-bound 2-core machine this says where a
    job's cost goes, which the jobs/s figure alone does not. The broker and PostgreSQL are
    counted only when they run on this machine (beam.smp / postgres processes are visible);
    PostgreSQL's backends are sampled at both ends, so a connection opened and closed within
    the run is missed (the workers' pools open theirs before)."""

    def __init__(self, worker_roots: list[int]) -> None:
        self.worker_roots = worker_roots
        self.broker = _pids_named("beam.smp")

    def _sample(self) -> dict[str, float]:
        workers = {pid for root in self.worker_roots for pid in _tree(root)}
        return {
            "producer": _cpu_s(os.getpid()),
            "workers": sum(_cpu_s(pid) for pid in workers),
            "broker": sum(_cpu_s(pid) for pid in self.broker),
            "postgres": sum(_cpu_s(pid) for pid in _pids_named("postgres")),
        }

    def start(self) -> None:
        self.begin = self._sample()

    def stop(self, jobs: int) -> dict[str, float]:
        """Milliseconds of CPU per job, by part."""
        end = self._sample()
        return {k: (end[k] - self.begin[k]) * 1000 / jobs for k in end}


class CompletedCounter:
    """Counts `completed` events for a set of jobs, as they are published.

    A private queue bound to the events exchange for `job.*.completed` only: the worker
    publishes `completed` with confirm and mandatory, and the confirm comes once every bound
    queue has it, the events stream included, so what arrives here is in the stream. (Reading
    the stream itself would cost this detector and the broker all three events of every job;
    Celery's detector is a directory listing, and the harness should not tax either side.)
    """

    def __init__(self, amqp_url: str, job_ids: set[str]) -> None:
        self.amqp_url = amqp_url
        self.job_ids = job_ids
        self.done: set[str] = set()
        self.last_at = 0.0
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        ch = conn.channel()
        queue = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        ch.queue_bind(queue, EVENTS_EXCHANGE, "job.*.completed")

        def on_msg(c: Any, method: Any, _p: Any, body: bytes) -> None:
            job_id = method.routing_key.split(".")[1]  # job.<job_id>.completed
            if job_id in self.job_ids and job_id not in self.done:
                self.done.add(job_id)
                self.last_at = time.perf_counter()

        ch.basic_consume(queue, on_msg, auto_ack=True)
        self.ready.set()
        while not self.stop.is_set():
            conn.process_data_events(time_limit=0.1)
        conn.close()


@dataclass(frozen=True)
class Run:
    jobs_per_s: float
    cpu_ms_per_job: dict[str, float]

    def cpu_line(self) -> str:
        parts = "  ".join(f"{k} {v:5.2f}" for k, v in self.cpu_ms_per_job.items())
        return f"CPU ms/job: {parts}  total {sum(self.cpu_ms_per_job.values()):5.2f}"


def stop_workers(procs: list[subprocess.Popen[bytes]], client: JobClient, tier: str) -> None:
    """Stop the tier's worker processes, delete the tier's queues from the shared broker and
    close the client."""
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)
    ch = client._ch()
    for queue in (job_queue(tier), dead_notify_queue(tier), control_pending_queue(tier)):
        ch.queue_delete(queue)
    client.close()


def run_facefleet(
    amqp_url: str,
    jobs: int,
    workers: int,
    concurrency: int,
    window: int = 1,
    batch: int = 1,
    store_url: str = "",
) -> Run:
    tier = "bench" + uuid.uuid4().hex[:8]
    data_root = Path(tempfile.mkdtemp(prefix="ff-bench-"))
    env = _env(
        amqp_url,
        data_root,
        tier,
        FACEFLEET_CONCURRENCY=str(concurrency),
        FACEFLEET_BATCH=str(batch),
        **({"FACEFLEET_STORE_URL": store_url} if store_url else {}),
    )
    os.environ.update({k: v for k, v in env.items() if k.startswith(("FACEFLEET_", "AMQP_URL"))})
    src = data_root / "in.txt"
    src.write_text("x")
    client = JobClient(ProducerSettings.load())
    client.apply_topology()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "facefleet.cli", "worker", "--processor", "noop"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(workers)
    ]
    _wait_consumers(amqp_url, job_queue(tier), workers)
    requests = []
    from facefleet.producer.sdk import build_request

    for _ in range(jobs):
        requests.append(build_request(client.media, tier, str(src), str(src)))
    counter = CompletedCounter(amqp_url, {r.job_id for r in requests})
    meter = CpuMeter([p.pid for p in procs])
    meter.start()
    t0 = time.perf_counter()
    if window > 1:
        for i in range(0, len(requests), window):
            client.submit_many(requests[i : i + window])
    else:
        for req in requests:
            client.submit_request(req)
    deadline = time.monotonic() + 600
    while len(counter.done) < jobs and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = counter.last_at - t0
    cpu = meter.stop(jobs)
    counter.stop.set()
    done = len(counter.done)
    stop_workers(procs, client, tier)
    LEFTOVERS.append(data_root)
    if done < jobs:
        raise RuntimeError(f"facefleet: only {done}/{jobs} jobs completed")
    return Run(jobs / elapsed, cpu)


def run_celery(amqp_url: str, jobs: int, workers: int) -> Run:
    queue = "bench.celery." + uuid.uuid4().hex[:8]
    markers = Path(tempfile.mkdtemp(prefix="celery-bench-"))
    env = {
        **os.environ,
        "AMQP_URL": amqp_url,
        "BENCH_CELERY_QUEUE": queue,
        "BENCH_CELERY_MARKERS": str(markers),
    }
    os.environ.update(
        {"BENCH_CELERY_QUEUE": queue, "BENCH_CELERY_MARKERS": str(markers), "AMQP_URL": amqp_url}
    )
    import importlib

    import bench.celery_app as celery_app

    celery_app = importlib.reload(celery_app)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.celery_app",
            "worker",
            "-c",
            str(workers),
            "-P",
            "prefork",
            "-Q",
            queue,
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_consumers(amqp_url, queue, 1)
    meter = CpuMeter([proc.pid])
    meter.start()
    t0 = time.time()
    for i in range(jobs):
        celery_app.noop.apply_async((i,))
    deadline = time.monotonic() + 600
    last = 0.0
    count = 0
    while time.monotonic() < deadline:
        count = len(os.listdir(markers))
        if count >= jobs:
            last = max(os.stat(markers / n).st_mtime for n in os.listdir(markers))
            break
        time.sleep(0.05)
    elapsed = last - t0 if last else float("inf")
    cpu = meter.stop(jobs)
    proc.terminate()
    proc.wait(60)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_delete(queue)
    conn.close()
    LEFTOVERS.append(markers)
    if count < jobs:
        raise RuntimeError(f"celery: only {count}/{jobs} tasks completed")
    return Run(jobs / elapsed, cpu)


def _median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.jobs_per_s)[len(runs) // 2]


def _wait_consumers(amqp_url: str, queue: str, n: int, timeout_s: float = 60) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ch = conn.channel()
            try:
                if ch.queue_declare(queue, passive=True).method.consumer_count >= n:
                    return
            except pika.exceptions.ChannelClosedByBroker:
                pass
            conn.sleep(0.2)
        raise RuntimeError(f"{queue}: fewer than {n} consumers after {timeout_s}s")
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--concurrency", type=int, default=2, help="FaceFleet slots per worker (batched run)"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=100,
        help="FaceFleet jobs per submit_many call (batched run)",
    )
    parser.add_argument(
        "--batch", type=int, default=32, help="FaceFleet worker batch lane size (batched run)"
    )
    parser.add_argument(
        "--no-one-by-one",
        action="store_true",
        help="skip the one-by-one FaceFleet run (submit() per job, no batch lane)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--store",
        choices=["file", "postgres"],
        default="file",
        help="FaceFleet's job store: journals in the data root, or a fresh PostgreSQL database",
    )
    args = parser.parse_args(argv)
    url = discover().url
    store_url, drop = _store(args.store)
    try:
        return _main(args, url, store_url)
    finally:
        drop()


def _store(kind: str) -> tuple[str, Any]:
    """The job store URL for the workers, and how to remove it afterwards."""
    if kind == "file":
        return "", lambda: None
    import psycopg

    from facefleet.pgstore import migrate

    admin = os.environ.get(
        "FACEFLEET_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    name = "ff_bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    store_url = admin.rsplit("/", 1)[0] + "/" + name
    migrate(store_url)

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return store_url, drop


def _main(args: argparse.Namespace, url: str, store_url: str) -> int:
    batched: list[Run] = []
    single: list[Run] = []
    cel: list[Run] = []
    for r in range(args.rounds):
        batched.append(
            run_facefleet(
                url,
                args.jobs,
                args.workers,
                args.concurrency,
                args.window,
                args.batch,
                store_url,
            )
        )
        if not args.no_one_by_one:
            single.append(run_facefleet(url, args.jobs, args.workers, 1, 1, 1, store_url))
        cel.append(run_celery(url, args.jobs, args.workers))
        one = f"one by one {single[-1].jobs_per_s:8.1f}   " if single else ""
        print(
            f"round {r + 1}: facefleet batched {batched[-1].jobs_per_s:8.1f}   {one}"
            f"celery {cel[-1].jobs_per_s:8.1f} jobs/s",
            flush=True,
        )
    c = statistics.median(x.jobs_per_s for x in cel)
    low = floor.measure(url, args.jobs, lambda: sum(_cpu_s(p) for p in _pids_named("beam.smp")))
    celery_cpu = sum(_median_run(cel).cpu_ms_per_job.values())
    lines = [
        f"\nno-op jobs end to end, {args.jobs} jobs, {args.workers} worker processes, "
        f"job store: {args.store}, "
        f"median of {args.rounds} rounds (FaceFleet: confirmed publish, queued/started/"
        "completed events journaled and in the stream, durable result; Celery: acks_late, "
        "prefetch 1, quorum queue, confirms, no events):",
    ]
    runs = [
        (
            f"facefleet batched (submit_many {args.window}, --batch {args.batch}, "
            f"--concurrency {args.concurrency})",
            batched,
        ),
        ("facefleet one by one (submit(), --batch 1, --concurrency 1)", single),
    ]
    for label, rs in runs:
        if rs:
            f = statistics.median(x.jobs_per_s for x in rs)
            lines.append(f"  {label}: {f:8.1f} jobs/s = {f / c:5.2f}x celery")
    lines += [
        f"  celery: {c:8.1f} jobs/s",
        "where the CPU goes (median round; producer = the bench process: submits, and for "
        "FaceFleet the completion detector):",
    ]
    for label, rs in runs:
        if rs:
            lines.append(f"  {label.split(' (')[0]:24s} {_median_run(rs).cpu_line()}")
    lines += [
        f"  {'celery':24s} {_median_run(cel).cpu_line()}",
        "the contract's floor (bench/floor.py: four confirmed durable writes, delivery + ack, "
        "three durable journal appends and a durable result commit per job, perfectly batched, "
        "group commit, no spine logic):",
        f"  floor      {low.line()}",
        f"  so at most {2000 / low.total_ms:8.1f} jobs/s on two CPU-bound cores = "
        f"{2000 / low.total_ms / c:.2f}x this Celery run "
        f"(Celery itself used {celery_cpu:.2f} ms/job, {c * celery_cpu / 1000:.2f} cores)",
    ]
    print("\n".join(lines))
    clean_up()
    return 0


if __name__ == "__main__":
    sys.exit(main())
