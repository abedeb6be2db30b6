"""Gateway fixtures: a world of its own (tiers, data root, worker) and real uvicorn gateways.

Every gateway here is a real `facefleet gateway` process on a free loopback port, so tests see
what clients see (HTTP, WebSocket close codes, restarts), not an in-process approximation.

Two media stores: `world` keeps media in the worker's data root (file://, the default), and
`s3_world` in a bucket of a real S3-API server (moto_server on loopback: the session's
`s3_server`/`s3_bucket` of tests/conftest.py), for its worker and its gateways alike. Without
moto_server the s3 tests skip on a laptop and fail in CI, like the broker tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from facefleet.broker import Broker
from facefleet.journal import JobJournal
from facefleet.storage import Storage
from tests.conftest import Env, delete_tier_queues, free_port
from tests.s3server import aws_test_env

API_KEY = "test-key-" + uuid.uuid4().hex
SECRET = "s" * 16 + uuid.uuid4().hex


def png(width: int = 8, height: int = 8, rgb: tuple[int, int, int] = (200, 120, 80)) -> bytes:
    """A small valid PNG, built without image libraries."""
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    env: dict[str, str] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, job_id: str, **params: Any) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"ws://127.0.0.1:{self.port}/v1/jobs/{job_id}/events" + (
            f"?{query}" if query else ""
        )

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited early:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gateway not ready in {timeout_s}s:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def metric(self, name: str) -> float:
        """Sum of a Prometheus metric's samples whose line starts with `name`."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and not line.startswith("#")
        )


@dataclass(frozen=True)
class S3:
    """The session's S3-API server and bucket, and the variables that point boto3 at them."""

    endpoint: str
    bucket: str
    env: dict[str, str]
    prefix: str = "facefleet"

    @property
    def media_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.endpoint)

    def objects(self, under: str = "uploads/") -> set[str]:
        """Every object key under `under` in the store (keys relative to the bucket)."""
        pages = self.client().get_paginator("list_objects_v2")
        return {
            obj["Key"]
            for page in pages.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/{under}")
            for obj in page.get("Contents", [])
        }

    def multipart_uploads(self) -> list[str]:
        """Keys of the store's multipart uploads started and neither completed nor aborted."""
        found = self.client().list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix)
        return [u["Key"] for u in found.get("Uploads", [])]


@dataclass
class GatewayWorld:
    """One tier with a sleep worker, one full-able tier and one idle tier without workers, one
    data root (the worker's journals), one media store (`media_env`; the data root if empty)."""

    env: Env
    full_tier: str
    idle_tier: str = ""
    media_env: dict[str, str] = field(default_factory=dict)
    s3: S3 | None = None
    gateways: list[Gateway] = field(default_factory=list)

    def start_gateway(
        self, *, port: int | None = None, args: tuple[str, ...] = (), **extra: str
    ) -> Gateway:
        """A gateway process; `args` go to `facefleet gateway`, `extra` are env overrides."""
        port = port or free_port()
        log = self.env.data_root.parent / f"gateway-{port}-{len(self.gateways)}.log"
        defaults = {
            "FACEFLEET_API_KEYS": f"other-key,{API_KEY}",
            "FACEFLEET_TOKEN_SECRET": SECRET,
            "FACEFLEET_DEFAULT_TIER": self.env.tier,
            "FACEFLEET_AUTH_TIMEOUT_S": "2",
            "FACEFLEET_HEARTBEAT_S": "5",
            "FACEFLEET_LOG_LEVEL": "INFO",
            **self.media_env,
        }
        variables = self.env.vars(**{**defaults, **extra})  # `extra` may override a default
        fh = open(log, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "facefleet.cli", "gateway", "--port", str(port), *args],
            env=variables,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        gw = Gateway(proc, port, log, variables)
        self.gateways.append(gw)
        gw.wait_ready()
        return gw

    def submit(
        self,
        gw: Gateway,
        *,
        sleep_s: float = 1.0,
        steps: int = 5,
        tier: str | None = None,
        options: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Submit a sleep job through `gw` with two small uploaded PNGs (multipart); `options`
        adds to the sleep processor's, `extra` to the form."""
        options = {"sleep_s": sleep_s, "steps": steps, **(options or {})}
        with gw.http() as client:
            resp = client.post(
                "/v1/jobs",
                headers={"Authorization": f"Bearer {API_KEY}"},
                files={
                    "source": ("a.png", png(), "image/png"),
                    "target": ("b.png", png(rgb=(1, 2, 3)), "image/png"),
                },
                data={"options": json.dumps(options), "tier": tier or self.env.tier, **extra},
            )
        assert resp.status_code == 202, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def journal(self, job_id: str) -> list[dict[str, Any]]:
        events = JobJournal(Storage(self.env.data_root), job_id).events()
        return [e.model_dump(mode="json") for e in events]


def read_events(
    url: str,
    *,
    token: str | None = None,
    first: dict[str, Any] | None = None,
    limit: int | None = None,
    timeout_s: float = 60,
) -> tuple[list[dict[str, Any]], int | None, str]:
    """Frames received (decoded) and the close code/reason; stops early after `limit` frames."""
    frames: list[dict[str, Any]] = []
    code: int | None = None
    reason = ""
    deadline = time.monotonic() + timeout_s
    with connect(url, open_timeout=10, close_timeout=5) as ws:
        if first is not None:
            ws.send(json.dumps(first))
        try:
            while limit is None or len(frames) < limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no close within {timeout_s}s; got {len(frames)} frames")
                frames.append(json.loads(ws.recv(timeout=left)))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            reason = exc.rcvd.reason if exc.rcvd is not None else ""
    return frames, code, reason


def seqs(frames: list[dict[str, Any]]) -> list[int]:
    return [int(f["seq"]) for f in frames]


@contextmanager
def new_world(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory, s3: S3 | None = None
) -> Iterator[GatewayWorld]:
    """A world with its own tiers, data root and sleep worker; media in `s3` when given."""
    tier = "gw" + uuid.uuid4().hex[:10]
    full = "gwfull" + uuid.uuid4().hex[:8]
    idle = "gwidle" + uuid.uuid4().hex[:8]
    root = tmp_path_factory.mktemp("gateway-s3" if s3 else "gateway") / "data"
    root.mkdir()
    env = Env(
        broker.url,
        tier,
        root,
        [
            {"name": tier, "max_job_s": 60},
            {"name": full, "max_job_s": 60, "max_length": 1},
            {"name": idle, "max_job_s": 60},
        ],
    )
    media_env = {"FACEFLEET_MEDIA_URL": s3.media_url, **s3.env} if s3 is not None else {}
    w = GatewayWorld(env, full, idle, media_env, s3)
    env.start_worker(**media_env)
    try:
        yield w
    finally:
        for gw in w.gateways:
            gw.stop()
        env.stop_all()
        for name in (tier, full, idle):
            delete_tier_queues(broker.url, name)


@pytest.fixture(scope="module")
def world(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayWorld]:
    with new_world(broker, tmp_path_factory) as w:
        yield w


@pytest.fixture(scope="module")
def gateway(world: GatewayWorld) -> Gateway:
    """The module's main gateway; its media store is the worker's data root (file://)."""
    return world.start_gateway()


@pytest.fixture(scope="session")
def s3(s3_server: str, s3_bucket: str) -> S3:
    """The session's S3-API server and bucket (tests/conftest.py), under a key prefix of the
    gateway suite's own, so counting its objects is not disturbed by other suites."""
    return S3(s3_server, s3_bucket, aws_test_env(s3_server), f"gw-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def s3_world(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory, s3: S3
) -> Iterator[GatewayWorld]:
    """A world whose media (uploads and results) live in the s3 bucket, for worker and
    gateways alike; the worker keeps its journals in its data root."""
    with new_world(broker, tmp_path_factory, s3) as w:
        yield w


@pytest.fixture(scope="module")
def s3_gateway(s3_world: GatewayWorld, tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    """The s3 world's main gateway; its data root points nowhere (it needs none)."""
    nowhere = tmp_path_factory.mktemp("gateway-nowhere") / "absent"
    return s3_world.start_gateway(FACEFLEET_DATA_ROOT=str(nowhere))


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


# --- the browser (Debian's chromium + chromedriver through selenium) ------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _need_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        message = f"browser test needs {', '.join(missing)}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,1100",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
