"""The worker's /healthz, /readyz and /metrics (facefleet.health):

/healthz  200 while the consumer loop is alive (it ticks at least every few seconds)
/readyz   200 only once the processor is warmed up and the worker consumes (not while draining,
          not while paused because the job store does not answer, not while the broker blocks
          its event publisher: a memory or disk alarm; its events wait, in order)
/metrics  Prometheus text format
"""

from __future__ import annotations

from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING

from facefleet import health

if TYPE_CHECKING:
    from facefleet.consumer.worker import Worker

STALE_AFTER_S = health.STALE_AFTER_S


def serve_health(worker: Worker, host: str, port: int) -> ThreadingHTTPServer:
    from facefleet.consumer.worker import WorkerState

    def readiness() -> tuple[bool, str]:
        if worker.paused is not None:
            return False, f"paused: {worker.paused}"
        blocked = worker.publisher.blocked
        if blocked is not None:
            return False, f"blocked: the broker blocks publishing ({blocked}); events wait in order"
        return worker.state == WorkerState.READY, worker.state.value

    return health.serve_health(
        host,
        port,
        last_tick=lambda: worker.last_tick,
        readiness=readiness,
        registry=worker.metrics.registry,
    )
