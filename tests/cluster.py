"""A real three-node RabbitMQ cluster on loopback, for the failover and alarm tests.

Started from the machine's own `rabbitmq-server` (the real script under
/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin, not Debian's /usr/sbin wrapper, which switches to
the rabbitmq user and its shared home): every node runs as the test's user, with its own node
name, AMQP / distribution / management ports, data and log directories and an Erlang cookie of
its own under one temp dir. Nothing here can reach the machine's shared node on 5672: every
command names one of our nodes and carries our cookie.

Why nodes start in parallel and then join with rabbitmqctl (stop_app, join_cluster, start_app)
rather than through classic-config peer discovery: before 3.13 that discovery waits a
randomized 5-60 s start-up delay so parallel boots do not form separate clusters; a join is
seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from facefleet.broker import amqp_answers


class ClusterUnavailable(RuntimeError):
    """No rabbitmq-server here, or the nodes did not start or join."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_HANDED_OUT: set[int] = set()
"""Ports given to nodes by this process: a probe lets its port go at once, so without this two
of a cluster's nine ports could be drawn the same (the second node to bind it: eaddrinuse)."""


def _free_port() -> int:
    """A free port OUTSIDE the kernel's ephemeral range: a node that restarts must get its port
    back, and an outgoing connection may have taken an ephemeral one meanwhile (eaddrinuse)."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(20000, 32000) if not low <= p <= high and p not in _HANDED_OUT]
    for port in random.sample(candidates, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    raise ClusterUnavailable("no free port outside the ephemeral range")


def _sbin() -> Path:
    found = sorted(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/sbin/rabbitmq-server"))
    if not found:
        raise ClusterUnavailable(
            "no rabbitmq-server under /usr/lib/rabbitmq/lib (apt-get install rabbitmq-server)"
        )
    return found[-1].parent


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Node:
    index: int
    name: str
    """Erlang node name, e.g. ffc1-1234ab@localhost."""
    base: Path
    port: int = field(default_factory=_free_port)
    dist_port: int = field(default_factory=_free_port)
    mgmt_port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.mgmt_port}"

    @property
    def pid_file(self) -> Path:
        return self.base / "pid"

    @property
    def log_dir(self) -> Path:
        return self.base / "log"

    def os_pid(self) -> int | None:
        """The Erlang VM's pid (the node writes it once it has started)."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def amqp_ready(self) -> bool:
        return _answers(self.port) and amqp_answers(self.url)


@dataclass
class Cluster:
    nodes: list[Node]
    base: Path
    sbin: Path
    cookie: str
    start_s: float = 0.0
    """Seconds the cluster took to start and join (printed by the fixture)."""

    # --- addresses --------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def amqp_url(self) -> str:
        """AMQP_URL naming every node (the comma-separated list FaceFleet accepts)."""
        return ",".join(self.urls)

    def node(self, name_or_index: str | int) -> Node:
        for n in self.nodes:
            if name_or_index in (n.name, n.index):
                return n
        raise KeyError(name_or_index)

    # --- processes ----------------------------------------------------------------------------

    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k not in ("AMQP_URL",)
        }
        env.update(
            HOME=str(self.base),
            RABBITMQ_CONF_ENV_FILE=str(self.base / "rabbitmq-env.conf"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            LC_ALL="C.UTF-8",
        )
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(node.port),
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_MNESIA_BASE=str(node.base / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.log_dir),
                RABBITMQ_PID_FILE=str(node.pid_file),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
                RABBITMQ_CONFIG_FILE=str(node.base / "rabbitmq"),
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            )
        return env

    def _write_config(self, node: Node) -> None:
        node.base.mkdir(parents=True, exist_ok=True)
        node.log_dir.mkdir(exist_ok=True)
        (node.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{node.port}\n"
            f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {node.mgmt_port}\n"
            "loopback_users = none\n"
            # Small heartbeats so a paused node's clients notice within seconds.
            "heartbeat = 5\n"
            # Test-sized disk limit: the default 50 MB is fine, but the machine may be tight.
            "disk_free_limit.absolute = 1MB\n"
            "log.console = false\nlog.file.level = warning\n"
        )

    def start_node(self, node: Node) -> None:
        """Start a node's VM (returns at once; wait_node waits for AMQP)."""
        if node.alive():
            return
        with contextlib.suppress(FileNotFoundError):
            node.pid_file.unlink()
        out = open(node.log_dir / "console.log", "ab")  # noqa: SIM115 - the node's lifetime
        node.proc = subprocess.Popen(
            [str(self.sbin / "rabbitmq-server")],
            env=self._env(node),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()

    def wait_node(self, node: Node, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if node.proc is not None and node.proc.poll() is not None:
                raise ClusterUnavailable(f"{node.name} exited:\n{self.tail(node)}")
            if node.amqp_ready():
                return
            time.sleep(0.3)
        raise ClusterUnavailable(f"{node.name} did not answer AMQP in {timeout_s}s")

    def tail(self, node: Node, lines: int = 30) -> str:
        out = []
        for f in sorted(node.log_dir.glob("*.log")):
            with contextlib.suppress(OSError):
                out.append(f"--- {f.name}\n" + "\n".join(f.read_text().splitlines()[-lines:]))
        return "\n".join(out)

    def ctl(
        self, node: Node | str, *args: str, timeout_s: float = 60, tool: str = "rabbitmqctl"
    ) -> str:
        """Run a RabbitMQ CLI tool against one of OUR nodes; raises with its output on failure."""
        name = node.name if isinstance(node, Node) else node
        if not any(name == n.name for n in self.nodes):
            raise ValueError(f"{name} is not a node of this cluster")
        result = subprocess.run(
            [str(self.sbin / tool), "-n", name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if result.returncode != 0:
            raise ClusterUnavailable(
                f"{tool} -n {name} {' '.join(args)}: exit {result.returncode}\n"
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout

    # --- chaos ----------------------------------------------------------------------------

    def kill(self, node: Node) -> None:
        """kill -9 the node's VM: no goodbye to clients or peers."""
        pid = node.os_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if node.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(30)
        with contextlib.suppress(FileNotFoundError):
            node.pid_file.unlink()

    def pause(self, node: Node) -> None:
        """SIGSTOP the VM: sockets stay open, nothing answers (a hung or GC-stalled node)."""
        pid = node.os_pid()
        assert pid is not None, f"{node.name} has no pid"
        os.kill(pid, signal.SIGSTOP)

    def resume(self, node: Node) -> None:
        pid = node.os_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def stop(self, node: Node, timeout_s: float = 60) -> None:
        """A clean stop (rabbitmqctl stop), as a rolling restart does."""
        if not node.alive():
            return
        try:
            self.ctl(node, "stop", timeout_s=timeout_s)
        except (ClusterUnavailable, subprocess.TimeoutExpired):
            self.kill(node)
            return
        assert node.proc is not None
        try:
            node.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill(node)

    def start(self, node: Node, timeout_s: float = 90) -> None:
        self.start_node(node)
        self.wait_node(node, timeout_s)

    def restart_all(self, timeout_s: float = 120) -> None:
        """Stop every node at once (a whole-cluster outage), then start them all together: each
        waits for its peers' tables, so none can be started alone first. A node that fails to
        boot is started once more: on 3.10 a node that asks a peer still booting for its feature
        flags can fail with incompatible_feature_flags."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(self.stop, self.nodes))

        def start(node: Node) -> None:
            self.start_node(node)
            try:
                self.wait_node(node, timeout_s)
            except ClusterUnavailable:
                self.start(node, timeout_s)

        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(start, self.nodes))

    def set_memory_alarm(self, node: Node, on: bool) -> None:
        """Raise (or clear) the memory alarm: a tiny high watermark blocks every publisher of
        the cluster."""
        self.ctl(node, "set_vm_memory_high_watermark", "0.00001" if on else "0.4")

    def set_disk_alarm(self, node: Node, on: bool) -> None:
        self.ctl(node, "set_disk_free_limit", "1000GB" if on else "1MB")

    def alarms(self) -> list[str]:
        """The cluster's resource alarms, as rabbitmqctl reports them."""
        node = next(n for n in self.nodes if n.alive())
        out = self.ctl(node, "eval", "rabbit_alarm:get_alarms().")
        return [line for line in out.splitlines() if line.strip() not in ("[]", "")]

    # --- queues ---------------------------------------------------------------------------

    def queue_info(self, queue: str, via: Node | None = None) -> dict[str, object]:
        """name, leader and members of a queue (rabbitmqctl list_queues, JSON)."""
        node = via or next(n for n in self.nodes if n.alive() and n.os_pid())
        out = self.ctl(
            node,
            "list_queues",
            "--formatter",
            "json",
            "name",
            "type",
            "leader",
            "members",
            "online",
            "messages",
        )
        for row in json.loads(out):
            if row.get("name") == queue:
                return dict(row)
        raise KeyError(queue)

    def leader(self, queue: str, via: Node | None = None) -> Node:
        """The node holding the queue's leader (quorum queue or stream)."""
        info = self.queue_info(queue, via)
        return self.node(str(info["leader"]))

    def wait_leader(self, queue: str, not_on: Node, timeout_s: float = 30) -> Node:
        """Wait until the queue's leader is on another node than `not_on` (an election)."""
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                via = next(n for n in self.nodes if n is not not_on and n.alive())
                node = self.leader(queue, via)
                if node is not not_on:
                    return node
            except (ClusterUnavailable, KeyError, StopIteration, subprocess.TimeoutExpired) as exc:
                last = exc
            time.sleep(0.5)
        raise AssertionError(f"no new leader for {queue} in {timeout_s}s ({last})")

    def running_nodes(self, via: Node) -> list[str]:
        out = self.ctl(via, "cluster_status", "--formatter", "json")
        return list(json.loads(out).get("running_nodes", []))

    def teardown(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                if node.os_pid():
                    # A paused VM ignores SIGTERM; let it go before it is killed.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(node.os_pid() or 0, signal.SIGCONT)
            with contextlib.suppress(Exception):
                self.kill(node)
        shutil.rmtree(self.base, ignore_errors=True)


def start_cluster(size: int = 3, timeout_s: float = 120) -> Cluster:
    """Start `size` nodes in parallel, join them into one cluster, return it.

    Raises ClusterUnavailable (with the nodes' logs) when that does not work.
    """
    sbin = _sbin()
    base = Path(tempfile.mkdtemp(prefix="facefleet-cluster-"))
    os.chmod(base, 0o755)
    tag = secrets.token_hex(3)
    cookie = secrets.token_hex(16).upper()
    cookie_file = base / ".erlang.cookie"
    cookie_file.write_text(cookie)
    cookie_file.chmod(0o400)
    (base / "rabbitmq-env.conf").write_text("")
    (base / "enabled_plugins").write_text("[rabbitmq_management].\n")
    nodes = [Node(i, f"ffc{i}-{tag}@localhost", base / f"n{i}") for i in range(1, size + 1)]
    cluster = Cluster(nodes, base, sbin, cookie)
    started = time.monotonic()
    try:
        for node in nodes:
            cluster._write_config(node)
            cluster.start_node(node)
        with ThreadPoolExecutor(size) as pool:
            list(pool.map(lambda n: cluster.wait_node(n, timeout_s), nodes))
        seed = nodes[0]
        for node in nodes[1:]:
            cluster.ctl(node, "stop_app")
            cluster.ctl(node, "join_cluster", seed.name)
            cluster.ctl(node, "start_app")
        running = cluster.running_nodes(seed)
        if sorted(running) != sorted(n.name for n in nodes):
            raise ClusterUnavailable(f"cluster did not form: running {running}")
    except ClusterUnavailable as exc:
        logs = "\n".join(cluster.tail(n) for n in nodes)
        cluster.teardown()
        raise ClusterUnavailable(f"{exc}\n{logs}") from exc
    except BaseException:
        cluster.teardown()
        raise
    cluster.start_s = time.monotonic() - started
    return cluster
