"""A loopback webhook receiver and a real `facefleet webhooks` process per test.

Each test gets a queue set of its own (FACEFLEET_WEBHOOK_QUEUE), deleted afterwards: the
webhook queue is bound to the shared events exchange with `job.#`, so a leftover one would
collect every event of every later test on the broker.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pika
import pytest

from facefleet.wire import webhook_failed_queue, webhook_retry_queue
from tests.conftest import Env, Worker, delete_queue, free_port


def new_secret(nbytes: int = 32) -> str:
    return "whsec_" + base64.b64encode(os.urandom(nbytes)).decode()


@dataclass
class Arrival:
    """One POST as the receiver saw it."""

    id: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int


Plan = Callable[[str, int], int]
"""(webhook-id, how many times this id arrived before) -> the status to answer."""


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records every request and every TCP connection."""

    def __init__(self, plan: Plan | None = None, *, delay_s: float = 0.0) -> None:
        self.plan: Plan = plan or (lambda _id, _n: 204)
        self.delay_s = delay_s
        self.arrivals: list[Arrival] = []
        self.started: list[str] = []
        """webhook-ids whose request began (before the delay)."""
        self.connections = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                msg_id = self.headers.get("webhook-id", "")
                with receiver._lock:
                    receiver.started.append(msg_id)
                    seen = sum(1 for a in receiver.arrivals if a.id == msg_id)
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                status = receiver.plan(msg_id, seen)
                with receiver._lock:
                    receiver.arrivals.append(
                        Arrival(
                            msg_id,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            time.monotonic(),
                            status,
                        )
                    )
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return None

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request: Any, client_address: Any) -> None:
                with receiver._lock:
                    receiver.connections += 1
                super().process_request(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/facefleet"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, job_id: str) -> list[Arrival]:
        with self._lock:
            return [a for a in self.arrivals if a.id.startswith(job_id + ".")]

    def wait_for(self, check: Callable[[], bool], timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise AssertionError(f"receiver: condition not met; saw {[a.id for a in self.arrivals]}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@dataclass
class Webhooks(Worker):
    """A running `facefleet webhooks` subprocess (health endpoints as a worker's)."""

    queue: str
    secret: str
    schedule_ms: list[int] = field(default_factory=list)

    def metric(self, name: str, **labels: str) -> float:
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}")
        for line in self.get("/metrics")[1].splitlines():
            if line.startswith(want + " ") or (not labels and line.startswith(name + " ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


@pytest.fixture
def start_webhooks(amqp_url: str) -> Iterator[Callable[..., Webhooks]]:
    """Starts `facefleet webhooks` in an Env's world, with a queue set of its own."""
    started: list[Webhooks] = []

    def start(
        env: Env,
        *,
        schedule: str = "300ms,600ms",
        allow: str | None = "127.0.0.1/32",
        secret: str | None = None,
        queue: str | None = None,
        **extra: str,
    ) -> Webhooks:
        queue = queue or f"ffwh-test-{uuid.uuid4().hex[:10]}"
        port = free_port()
        log = env.data_root / f"webhooks-{len(started)}.log"
        secret = secret or new_secret()
        more = {
            "FACEFLEET_WEBHOOK_SECRET": secret,
            "FACEFLEET_WEBHOOK_QUEUE": queue,
            "FACEFLEET_WEBHOOK_RETRY_SCHEDULE": schedule,
            "FACEFLEET_HEALTH_PORT": str(port),
            "FACEFLEET_WEBHOOK_TIMEOUT_S": "5",
            **extra,
        }
        if allow is not None:
            more["FACEFLEET_FETCH_ALLOW"] = allow
        fh = open(log, "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "facefleet.cli", "webhooks"],
            env=env.vars(**more),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        from facefleet.settings import parse_duration_s

        delays = [max(1, round(parse_duration_s(d) * 1000)) for d in schedule.split(",")]
        hooks = Webhooks(proc, port, log, queue, secret, delays)
        started.append(hooks)
        hooks.wait_ready()
        return hooks

    yield start
    for hooks in started:
        if hooks.proc.poll() is None:
            hooks.proc.kill()
            hooks.proc.wait(10)
        for name in {
            hooks.queue,
            webhook_failed_queue(hooks.queue),
            *(webhook_retry_queue(d, hooks.queue) for d in hooks.schedule_ms),
        }:
            delete_queue(amqp_url, name)


def queue_depth(amqp_url: str, name: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        count: int = conn.channel().queue_declare(name, passive=True).method.message_count
        return count
    finally:
        conn.close()


def take_all(
    amqp_url: str, name: str, *, requeue: bool = False
) -> list[tuple[pika.BasicProperties, bytes]]:
    """The queue's messages; consumed, or left in place with requeue=True."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    out = []
    try:
        ch = conn.channel()
        while True:
            method, props, body = ch.basic_get(name, auto_ack=not requeue)
            if method is None:
                return out
            out.append((props, body))
    finally:
        conn.close()  # unacked ones go back
