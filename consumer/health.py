"""Health and metrics over HTTP for the kubelet and Prometheus.

/healthz  200 while the consumer loop is alive (it ticks at least every few seconds)
/readyz   200 only once the processor is warmed up and the worker consumes (not while draining)
/metrics  Prometheus text format
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from consumer.worker import Worker

STALE_AFTER_S = 30.0


def serve_health(worker: Worker, host: str, port: int) -> ThreadingHTTPServer:
    from consumer.worker import WorkerState

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                alive = time.monotonic() - worker.last_tick < STALE_AFTER_S
                self._send(200 if alive else 503, b"ok\n" if alive else b"consumer loop stalled\n")
            elif self.path == "/readyz":
                ready = worker.state == WorkerState.READY and worker.paused is None
                why = worker.state.value if worker.paused is None else f"paused: {worker.paused}"
                self._send(200 if ready else 503, f"{why}\n".encode())
            elif self.path == "/metrics":
                self._send(200, generate_latest(worker.metrics.registry), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
