"""Find a RabbitMQ to talk to; shared by `make demo` and the test suite.

Order: AMQP_URL if set; else the local broker on 127.0.0.1:5672 if it answers; else a RabbitMQ
container through testcontainers if a Docker engine answers; else a `rabbitmq-server` binary
started on loopback in a temp dir; else a clear message saying how to get one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

HOW_TO_GET_ONE = """no RabbitMQ broker found. Any of these works:
  - set AMQP_URL=amqp://user:pass@host:5672/vhost
  - run one locally: apt-get install rabbitmq-server && rabbitmq-server -detached
  - start a Docker engine (testcontainers then starts rabbitmq:3.13-management)"""


class NoBrokerError(RuntimeError):
    pass


@dataclass
class Broker:
    url: str
    origin: str
    """env | local | testcontainers | rabbitmq-server"""
    stop: Callable[[], None] = field(default=lambda: None)
    management_url: str | None = None
    """The management API when it is not at the default http://<AMQP host>:15672 (a private
    rabbitmq-server node listens on a free port); set FACEFLEET_MANAGEMENT_URL to it."""


def answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def amqp_answers(url: str) -> bool:
    import pika
    import pika.exceptions

    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 3
    try:
        pika.BlockingConnection(params).close()
        return True
    except pika.exceptions.AMQPError:
        return False


def discover(*, allow_start: bool = True) -> Broker:
    env_url = os.environ.get("AMQP_URL")
    if env_url:
        return Broker(env_url, "env")
    if answers("127.0.0.1", 5672) and amqp_answers(LOCAL_URL):
        return Broker(LOCAL_URL, "local")
    if not allow_start:
        raise NoBrokerError(HOW_TO_GET_ONE)
    broker = _testcontainers() or _local_binary()
    if broker is None:
        raise NoBrokerError(HOW_TO_GET_ONE)
    return broker


def _testcontainers() -> Broker | None:
    try:
        import docker

        docker.from_env().ping()
    except Exception:
        return None
    from testcontainers.rabbitmq import RabbitMqContainer

    container = RabbitMqContainer("rabbitmq:3.13-management")
    container.start()
    host = container.get_container_host_ip()
    port = container.get_exposed_port(5672)
    return Broker(f"amqp://guest:guest@{host}:{port}/%2F", "testcontainers", container.stop)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _local_binary() -> Broker | None:
    # Debian's /usr/sbin/rabbitmq-server is a wrapper that switches to the rabbitmq user and its
    # home; the real script runs as us with everything in the temp dir.
    real = sorted(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/sbin/rabbitmq-server"))
    server = str(real[-1]) if real else shutil.which("rabbitmq-server")
    if server is None:
        return None
    base = Path(tempfile.mkdtemp(prefix="facefleet-rabbit-"))
    port, dist, mgmt = _free_port(), _free_port(), _free_port()
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": f"facefleet{os.getpid()}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
    }
    # The management API is the only source of unacked counts (`facefleet status`).
    (base / "enabled_plugins").write_text("[rabbitmq_management].\n")
    (base / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{port}\n"
        f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {mgmt}\n"
    )
    proc = subprocess.Popen([server], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        if answers("127.0.0.1", port) and amqp_answers(url):
            # Best effort: without the plugin the node still serves AMQP.
            until = min(deadline, time.monotonic() + 15)
            while not answers("127.0.0.1", mgmt) and time.monotonic() < until:
                time.sleep(0.5)
            api = f"http://127.0.0.1:{mgmt}" if answers("127.0.0.1", mgmt) else None

            def stop() -> None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                shutil.rmtree(base, ignore_errors=True)

            return Broker(url, "rabbitmq-server", stop, api)
        time.sleep(0.5)
    proc.kill()
    return None
