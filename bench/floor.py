"""The least CPU a FaceFleet job can cost on this machine, measured: what the contract itself
requires, done in the cheapest way, with none of the spine's own logic.

Per job the contract requires (issue #2, README "How a job travels"):
- four durable broker writes: the job into a quorum queue and `queued`/`started`/`completed`
  into the events stream, each confirmed; the job delivered and acked;
- three journal appends, each durable before its event is published (seq authority);
- a result directory committed durably: work dir with result + manifest durable, renamed into
  place, the rename durable before `completed`.

Here those are done with perfect batching (confirms pipelined in windows of 100, prefetch 100,
group commit: one filesystem sync per ordering point per window, no thread hops, no JSON
models, no claims, no checks): a floor no implementation of the same contract goes below on
this host. bench_spine prints it beside the Celery run of the same
process: on a CPU-bound 2-core machine, 2,000 ms of CPU per second / floor = the most jobs/s
any implementation of this contract can reach here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pika

from facefleet.amqp import ThreadedPublisher
from facefleet.storage import sync_filesystem

WINDOW = 100


@dataclass(frozen=True)
class Floor:
    broker_ms: float
    clients_ms: float
    files_ms: float

    @property
    def total_ms(self) -> float:
        return self.broker_ms + self.clients_ms + self.files_ms

    def line(self) -> str:
        return (
            f"CPU ms/job: broker {self.broker_ms:5.2f}  clients {self.clients_ms:5.2f}  "
            f"files {self.files_ms:5.2f}  total {self.total_ms:5.2f}"
        )


def _broker_and_clients(
    amqp_url: str, jobs: int, sample: Callable[[], float]
) -> tuple[float, float]:
    """Publish a job + three events per job, pipelined; consume and ack the jobs."""
    suffix = uuid.uuid4().hex[:8]
    queue, stream, exchange = f"floor.q.{suffix}", f"floor.s.{suffix}", f"floor.x.{suffix}"
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    ch.queue_declare(stream, durable=True, arguments={"x-queue-type": "stream"})
    ch.exchange_declare(exchange, "topic", auto_delete=True)
    ch.queue_bind(stream, exchange, "job.#")
    body = json.dumps({"job_id": str(uuid.uuid4()), "pad": "x" * 250}).encode()
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    publisher = ThreadedPublisher(amqp_url, "bench-floor")
    publisher.start()
    try:
        b0, c0 = sample(), time.process_time()
        pending: list[Future[None]] = []
        for _ in range(jobs):
            pending.append(publisher.publish_async("", queue, body, props))
            for kind in ("queued", "started", "completed"):
                pending.append(publisher.publish_async(exchange, f"job.x.{kind}", body, props))
            if len(pending) >= WINDOW:
                for fut in pending:
                    fut.result(timeout=60)
                pending = []
        for fut in pending:
            fut.result(timeout=60)
        ch.basic_qos(prefetch_count=WINDOW)
        taken = 0
        for method, _props, _body in ch.consume(queue, inactivity_timeout=5):
            if method is None:
                break
            taken += 1
            if taken % (WINDOW // 2) == 0 or taken == jobs:
                ch.basic_ack(method.delivery_tag, multiple=True)
            if taken == jobs:
                break
        ch.cancel()
        broker_s, client_s = sample() - b0, time.process_time() - c0
    finally:
        publisher.close()
        ch.queue_delete(queue)
        ch.queue_delete(stream)
        conn.close()
    if taken < jobs:
        raise RuntimeError(f"floor: only {taken}/{jobs} jobs consumed")
    return broker_s * 1000 / jobs, client_s * 1000 / jobs


def _files(jobs: int) -> float:
    """The journal appends and the result commits of `jobs` jobs, durable the cheapest way the
    contract allows: group commit, one filesystem sync per ordering point for a window of jobs
    (`queued`; `started`; results staged; renamed into place; `completed`)."""
    root = Path(tempfile.mkdtemp(prefix="ff-floor-"))
    results = root / "results"
    results.mkdir()
    line = b'{"job_id":"x","seq":1,"type":"progress","payload":{}}\n'

    def append(job_id: str) -> None:
        fd = os.open(root / job_id / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, line)
        os.close(fd)

    try:
        c0 = time.process_time()
        for start in range(0, jobs, WINDOW):
            ids = [uuid.uuid4().hex for _ in range(min(WINDOW, jobs - start))]
            for job_id in ids:
                (root / job_id).mkdir()
                append(job_id)
            sync_filesystem(root)
            for job_id in ids:
                append(job_id)
            sync_filesystem(root)
            for job_id in ids:
                work = results / f".tmp-{job_id}"
                work.mkdir()
                for name in ("result.json", "manifest.json"):
                    fd = os.open(work / name, os.O_WRONLY | os.O_CREAT, 0o644)
                    os.write(fd, b"{}")
                    os.close(fd)
            sync_filesystem(root)
            for job_id in ids:
                os.rename(results / f".tmp-{job_id}", results / job_id)
            sync_filesystem(root)
            for job_id in ids:
                append(job_id)
            sync_filesystem(root)
        return (time.process_time() - c0) * 1000 / jobs
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure(amqp_url: str, jobs: int, broker_cpu: Callable[[], float]) -> Floor:
    """broker_cpu: the broker's CPU seconds so far (0 when it runs elsewhere)."""
    broker_ms, clients_ms = _broker_and_clients(amqp_url, jobs, broker_cpu)
    return Floor(broker_ms, clients_ms, _files(jobs))
