"""Health and metrics over HTTP for the kubelet and Prometheus, shared by every long-running
process (worker, webhooks):

/healthz  200 while the process's main loop is alive (it ticks at least every STALE_AFTER_S)
/readyz   200 while it does its work (each process says when, and why not)
/metrics  Prometheus text format of its registry
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

STALE_AFTER_S = 30.0


def serve_health(
    host: str,
    port: int,
    *,
    last_tick: Callable[[], float],
    readiness: Callable[[], tuple[bool, str]],
    registry: CollectorRegistry,
) -> ThreadingHTTPServer:
    """Serve the three endpoints on a daemon thread. last_tick: the main loop's last
    time.monotonic(); readiness: (ready?, a word on why) for /readyz."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                alive = time.monotonic() - last_tick() < STALE_AFTER_S
                self._send(200 if alive else 503, b"ok\n" if alive else b"main loop stalled\n")
            elif self.path == "/readyz":
                ready, why = readiness()
                self._send(200 if ready else 503, f"{why}\n".encode())
            elif self.path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
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
