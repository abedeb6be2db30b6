"""The worker's /healthz, /readyz and /metrics (facefleet.health):

/healthz  200 while the consumer loop is alive (it ticks at least every few seconds)
/readyz   200 only once the processor is warmed up and the worker consumes (not while draining,
          not while paused because the job store does not answer)
/metrics  Prometheus text format
"""

from __future__ import annotations

from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING

from facefleet import health

if TYPE_CHECKING:
    from consumer.worker import Worker

STALE_AFTER_S = health.STALE_AFTER_S


def serve_health(worker: Worker, host: str, port: int) -> ThreadingHTTPServer:
    from consumer.worker import WorkerState

    def readiness() -> tuple[bool, str]:
        if worker.paused is not None:
            return False, f"paused: {worker.paused}"
        return worker.state == WorkerState.READY, worker.state.value

    return health.serve_health(
        host,
        port,
        last_tick=lambda: worker.last_tick,
        readiness=readiness,
        registry=worker.metrics.registry,
    )
