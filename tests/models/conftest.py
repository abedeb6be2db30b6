"""Fixtures for the model tests: the tiny models (built once) and a loopback HTTP mirror.

The mirror serves files from memory on 127.0.0.1 with optional Range support and per-file
faults, and records every request, so tests can say "fetched once" or "resumed at byte N"
without timing anything.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

import pytest

from facefleet.models.catalog import Catalog
from facefleet.models.tiny import write_tiny_models

Fault = Literal["cut-once", "status-503", "gate"]
_RANGE = re.compile(r"bytes=(\d+)-$")


@dataclass
class Request:
    file: str
    range: str | None


@dataclass
class Mirror:
    """State shared between a test and the server thread."""

    files: dict[str, bytes]
    ranges: bool = True
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    """Requests for a file with the 'gate' fault wait (bounded) until this is set."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    base_url: str = ""

    def gets(self, file: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.file == file]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    mirror: Mirror


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        mirror = self.server.mirror
        name = unquote(self.path.lstrip("/"))
        header = self.headers.get("Range")
        with mirror.lock:
            mirror.requests.append(Request(name, header))
            fault = mirror.faults.get(name)
            if fault == "cut-once":
                del mirror.faults[name]
        data = mirror.files.get(name)
        if data is None:
            self._empty(404)
            return
        if fault == "status-503":
            self._empty(503)
            return
        if fault == "gate":
            mirror.gate.wait(timeout=30)
        start = 0
        match = _RANGE.fullmatch(header or "")
        if mirror.ranges and match:
            start = int(match.group(1))
            if start >= len(data):
                self._empty(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "cut-once":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models and their catalogue, built once; tests must not modify this directory."""
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_models(path)
    return path


@pytest.fixture(scope="session")
def tiny_catalog(tiny_dir: Path) -> Catalog:
    return Catalog.load(tiny_dir / "catalog.yaml")


@pytest.fixture
def mirror(
    tiny_dir: Path, tiny_catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Mirror]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    files = {e.file: (tiny_dir / e.file).read_bytes() for e in tiny_catalog.entries}
    state = Mirror(files=files)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.mirror = state
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="mirror", daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        state.gate.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
