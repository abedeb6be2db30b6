"""A real S3-API server for tests and benchmarks: moto_server as a subprocess on loopback.

Why a process and not moto's in-process mock: the code under test then talks HTTP to a
server through botocore's real stack (signing, retries, multipart, presigned URLs), exactly
as it would to MinIO or AWS. Plain functions (no pytest), so conftests and bench/ share them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""moto accepts any credentials; these are the conventional fake ones."""

AMBIENT_AWS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)
"""The caller's AWS variables that would steer boto3 away from the test server's fakes."""


class MotoMissing(RuntimeError):
    """moto_server is not installed next to this Python (pip install 'moto[server]')."""


def moto_binary() -> Path:
    return Path(sys.executable).parent / "moto_server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class S3Server:
    proc: subprocess.Popen[bytes]
    endpoint: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.unlink(missing_ok=True)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=1) as response:
            return bool(response.status < 500)
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def start_moto(port: int | None = None, *, timeout_s: float = 30.0) -> S3Server:
    """Start moto_server on 127.0.0.1 (a free port unless given) and wait until it answers.

    Raises MotoMissing without the binary, RuntimeError if it exits or never answers."""
    binary = moto_binary()
    if not binary.exists():
        raise MotoMissing(f"{binary} not found (pip install 'moto[server]')")
    for attempt in range(3):
        chosen = port or free_port()
        fd, log_name = tempfile.mkstemp(prefix="moto-", suffix=".log")
        log = Path(log_name)
        with os.fdopen(fd, "wb") as fh:
            proc = subprocess.Popen(
                [str(binary), "-H", "127.0.0.1", "-p", str(chosen)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = S3Server(proc, f"http://127.0.0.1:{chosen}", log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _answers(server.endpoint):
                return server
            time.sleep(0.1)
        text = server.output()
        server.stop()
        if port is None and attempt < 2 and "in use" in text:
            continue  # lost the race for the free port
        raise RuntimeError(f"moto_server on port {chosen} did not start:\n{text[-2000:]}")
    raise RuntimeError("moto_server did not start")  # pragma: no cover


def aws_test_env(endpoint: str) -> dict[str, str]:
    """The variables that point boto3 at the test server with fake credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        **TEST_CREDENTIALS,
    }
