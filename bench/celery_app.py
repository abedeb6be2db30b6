"""The Celery baseline for bench_spine: like for like with FaceFleet's guarantees.

acks_late, prefetch 1, a quorum queue and publisher confirms (Celery's default enqueue has no
confirms; comparing against that would flatter Celery, see shared/reference/baselines.md).
Each task writes a marker file so completion is detected from the jobs themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery
from kombu import Queue

QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench.celery")
MARKERS = Path(os.environ.get("BENCH_CELERY_MARKERS", "/tmp/bench-celery"))

app = Celery("bench", broker=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={"confirm_publish": True},
    task_queues=[Queue(QUEUE, queue_arguments={"x-queue-type": "quorum"})],
    task_default_queue=QUEUE,
    worker_detect_quorum_queues=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.noop")
def noop(i: int) -> None:
    fd = os.open(MARKERS / str(i), os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
