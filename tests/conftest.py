"""Shared fixtures: the real broker, isolated tiers and data roots, worker processes.

Integration tests talk to a real RabbitMQ found by facefleet.broker.discover() (AMQP_URL, the
local broker, testcontainers, or a rabbitmq-server binary). Without one they are skipped on a
laptop and fail in CI (CI=true). Each test gets its own tier (so its own queue) and data root,
so tests never see each other's jobs; the shared exchanges and the events stream are filtered by
job id.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pytest

from facefleet.broker import Broker, NoBrokerError, discover
from facefleet.jobstore import JobStore
from facefleet.wire import (
    DEAD_EXCHANGE,
    JobEvent,
    control_pending_queue,
    dead_notify_queue,
    job_queue,
)
from tests.pg import create_database, drop_database, server_problem
from tests.s3server import AMBIENT_AWS, MotoMissing, aws_test_env, start_moto

REPO = Path(__file__).resolve().parent.parent

# Hermetic: the caller's FACEFLEET_* and AMQP_URL never reach a test. Broker discovery is the one
# exception: the caller's AMQP_URL (and its management URL) name the broker the suite runs on,
# and only the `broker` fixture reads them. FACEFLEET_TEST_* are the suite's own switches.
CALLER_BROKER = {
    k: os.environ.pop(k) for k in ("AMQP_URL", "FACEFLEET_MANAGEMENT_URL") if k in os.environ
}
for _key in [k for k in os.environ if k.startswith("FACEFLEET_")]:
    if not _key.startswith("FACEFLEET_TEST_"):
        del os.environ[_key]
# Nor the caller's OpenTelemetry settings: no test's process exports to the caller's collector
# (the tracing tests point OTEL_EXPORTER_OTLP_ENDPOINT at a receiver of their own).
for _key in [k for k in os.environ if k.startswith("OTEL_")]:
    del os.environ[_key]


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    try:
        if "AMQP_URL" in CALLER_BROKER:
            found = Broker(
                CALLER_BROKER["AMQP_URL"],
                "env",
                management_url=CALLER_BROKER.get("FACEFLEET_MANAGEMENT_URL"),
            )
        else:
            found = discover()
    except NoBrokerError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs a broker: {exc}")
        pytest.skip(str(exc))
    yield found
    found.stop()


@pytest.fixture(scope="session")
def amqp_url(broker: Broker) -> str:
    return broker.url


# --- S3: a real S3-API server process (moto_server on loopback), a fresh bucket per session ---
# Without moto_server the S3 tests are skipped on a laptop and fail in CI (CI=true), like the
# broker tests. The AWS variables boto3 reads are set for the session only and restored after:
# the caller's own AWS profile or credentials never reach the tests.


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto_server started for this session."""
    try:
        server = start_moto()
    except MotoMissing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs moto_server: {exc}")
        pytest.skip(str(exc))
    try:
        yield server.endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_env(s3_server: str) -> Iterator[dict[str, str]]:
    """AWS_ENDPOINT_URL, fake credentials and region in os.environ for the session."""
    with pytest.MonkeyPatch.context() as mp:
        for key in AMBIENT_AWS:
            mp.delenv(key, raising=False)
        env = aws_test_env(s3_server)
        for key, value in env.items():
            mp.setenv(key, value)
        yield env


@pytest.fixture(scope="session")
def s3_bucket(s3_env: dict[str, str]) -> str:
    """A fresh bucket (a valid DNS name) on the session's server."""
    import boto3

    bucket = f"ff-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="session")
def s3_media_url(s3_bucket: str) -> str:
    """FACEFLEET_MEDIA_URL of a store on the session's bucket (under the prefix facefleet)."""
    return f"s3://{s3_bucket}/facefleet"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Env:
    """One isolated world: a tier of its own, a data root of its own, on the shared broker."""

    amqp_url: str
    tier: str
    data_root: Path
    tiers: list[dict[str, Any]]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    media_url: str | None = None
    """FACEFLEET_MEDIA_URL of this world (None: the data root, the embedded default)."""
    store_url: str | None = None
    """FACEFLEET_STORE_URL of this world (None: the journals in the data root)."""
    _store: Any = None

    def store(self) -> JobStore:
        """This world's job store, as its workers see it (opened once)."""
        if self._store is None:
            from facefleet.stores import open_job_store

            self._store = open_job_store(self.store_url or "", data_root=self.data_root)
        store: JobStore = self._store
        return store

    def events(self, job_id: str) -> list[JobEvent]:
        """A job's events in this world's job store."""
        return self.store().log(job_id).events()

    def vars(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FACEFLEET_")}
        env.update(
            AMQP_URL=self.amqp_url,
            FACEFLEET_DATA_ROOT=str(self.data_root),
            FACEFLEET_TIERS=json.dumps(self.tiers),
            FACEFLEET_TIER=self.tier,
            FACEFLEET_RETRY_BASE_S="0.2",
            FACEFLEET_PROGRESS_INTERVAL_S="0.2",
        )
        if self.media_url:
            env["FACEFLEET_MEDIA_URL"] = self.media_url
        if self.store_url:
            env["FACEFLEET_STORE_URL"] = self.store_url
        env.update(extra)
        return env

    def read(self, uri: str) -> bytes:
        """A stored object's bytes, through this world's media store (file:// or s3://)."""
        from facefleet.media import open_media_store

        chunks, _size, _type = open_media_store(
            self.media_url or "", data_root=self.data_root
        ).open(uri)
        return b"".join(chunks)

    def cli(
        self, *args: str, timeout_s: float = 60, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        """Run `facefleet ARGS` as a user would, in this world's environment."""
        return subprocess.run(
            [sys.executable, "-m", "facefleet.cli", *args],
            env=self.vars(**extra),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def submit_args(self, source: str, target: str, *options: str) -> list[str]:
        """`submit` arguments for this world's tier, with `--option` for each K=V."""
        opts = [x for o in options for x in ("--option", o)]
        return ["submit", "--tier", self.tier, "--source", source, "--target", target, *opts]

    def settings_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for key, value in self.vars().items():
            monkeypatch.setenv(key, value)

    def start_worker(
        self, *, processor: str = "sleep", wait_ready: bool = True, **extra: str
    ) -> Worker:
        port = free_port()
        log = self.data_root / f"worker-{len(self.procs)}.log"
        fh = open(log, "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "facefleet.cli", "worker", "--processor", processor],
            env=self.vars(FACEFLEET_HEALTH_PORT=str(port), **extra),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        worker = Worker(proc, port, log)
        if wait_ready:
            worker.wait_ready()
        return worker

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if self._store is not None:
            self._store.close()
            self._store = None


@dataclass
class Worker:
    """A FaceFleet process started by a test, with its health endpoints on `port`."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited early:\n{self.log.read_text()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready in {timeout_s}s:\n{self.log.read_text()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 30) -> int:
        return self.proc.wait(timeout_s)


def delete_tier_queues(amqp_url: str, tier: str) -> None:
    """Every queue topology apply declares for a tier: a test tier leaves none behind (hundreds
    of leaked quorum queues slow a small broker to a halt)."""
    for name in (job_queue(tier), dead_notify_queue(tier), control_pending_queue(tier)):
        delete_queue(amqp_url, name)


def delete_queue(amqp_url: str, name: str) -> None:
    try:
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        conn.channel().queue_delete(name)
        conn.close()
    except pika.exceptions.AMQPError:
        pass


@pytest.fixture
def make_env(amqp_url: str, tmp_path: Path) -> Iterator[Callable[..., Env]]:
    envs: list[Env] = []

    def factory(
        *, media_url: str | None = None, store_url: str | None = None, **tier_opts: Any
    ) -> Env:
        tier = "t" + uuid.uuid4().hex[:10]
        spec = {"name": tier, "max_job_s": 60, "delivery_limit": 5, **tier_opts}
        root = tmp_path / f"data-{tier}"
        root.mkdir()
        env = Env(amqp_url, tier, root, [spec], media_url=media_url, store_url=store_url)
        envs.append(env)
        return env

    yield factory
    for env in envs:
        env.stop_all()
        delete_tier_queues(amqp_url, env.tier)


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    return make_env()


class DeadLetters:
    """Captures dead letters through a private queue bound to the dead-letter fanout."""

    def __init__(self, amqp_url: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.ch = self.conn.channel()
        self.ch.exchange_declare(DEAD_EXCHANGE, "topic", durable=True)
        self.queue = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.queue_bind(self.queue, DEAD_EXCHANGE, "#")

    def wait_for(
        self, match: Callable[[pika.BasicProperties, bytes], bool], timeout_s: float = 20
    ) -> tuple[pika.BasicProperties, bytes]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            method, props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                self.conn.sleep(0.1)
                continue
            if match(props, body):
                return props, body
        raise AssertionError("no matching dead letter")

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()


@pytest.fixture
def dead_letters(amqp_url: str) -> Iterator[DeadLetters]:
    dl = DeadLetters(amqp_url)
    yield dl
    dl.close()


# --- PostgreSQL: the machine's server (tests/pg.py), a fresh database per session --------------
# Without it the database tests are skipped on a laptop and fail in CI (CI=true), like the broker.


def _require_postgres() -> None:
    problem = server_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs PostgreSQL: {problem}")
    pytest.skip(problem)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database for the session, migrated to this build's schema; dropped at the end.
    Tests share it: each uses fresh job ids."""
    _require_postgres()
    from facefleet.pgstore import migrate

    url = create_database()
    try:
        migrate(url)
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def fresh_pg_url() -> Iterator[Callable[[bool], str]]:
    """Makes fresh databases (migrated when asked) for one test; drops them afterwards."""
    _require_postgres()
    from facefleet.pgstore import migrate

    made: list[str] = []

    def make(migrated: bool = True) -> str:
        url = create_database()
        made.append(url)
        if migrated:
            migrate(url)
        return url

    yield make
    for url in made:
        drop_database(url)
