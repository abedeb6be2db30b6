"""Gateway fixtures: a world of its own (tiers, data root, worker) and real uvicorn gateways.

Every gateway here is a real `facefleet gateway` process on a free loopback port, so tests see
what clients see (HTTP, WebSocket close codes, restarts), not an in-process approximation.
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
from facefleet.wire import dead_notify_queue, job_queue
from tests.conftest import Env, delete_queue, free_port

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


@dataclass
class GatewayWorld:
    """One tier with a sleep worker, one full-able tier without workers, one data root."""

    env: Env
    full_tier: str
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
        **extra: Any,
    ) -> dict[str, Any]:
        options = {"sleep_s": sleep_s, "steps": steps}
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


@pytest.fixture(scope="module")
def world(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayWorld]:
    tier = "gw" + uuid.uuid4().hex[:10]
    full = "gwfull" + uuid.uuid4().hex[:8]
    root = tmp_path_factory.mktemp("gateway") / "data"
    root.mkdir()
    env = Env(
        broker.url,
        tier,
        root,
        [{"name": tier, "max_job_s": 60}, {"name": full, "max_job_s": 60, "max_length": 1}],
    )
    w = GatewayWorld(env, full)
    env.start_worker()
    yield w
    for gw in w.gateways:
        gw.stop()
    env.stop_all()
    for name in (tier, full):
        delete_queue(broker.url, job_queue(name))
        delete_queue(broker.url, dead_notify_queue(name))


@pytest.fixture(scope="module")
def gateway(world: GatewayWorld) -> Gateway:
    """The module's main gateway; it shares the data root with the worker."""
    return world.start_gateway()


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
