"""The cluster fixture itself: three nodes in one cluster, a queue replicated on all, a leader
that moves when its node is killed, and a node that comes back."""

from __future__ import annotations

import time
import uuid

import pika
import pytest

from tests.cluster import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_three_nodes_one_cluster(healthy: Cluster) -> None:
    running = healthy.running_nodes(healthy.nodes[0])
    assert sorted(running) == sorted(n.name for n in healthy.nodes)
    assert len(set(healthy.urls)) == 3


def test_kill_leader_elects_another_and_node_rejoins(healthy: Cluster) -> None:
    name = f"ff-cluster-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(healthy.urls[0]))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
        ch.basic_publish("", name, b"kept", pika.BasicProperties(delivery_mode=2))
    finally:
        conn.close()
    info = healthy.queue_info(name)
    assert len(info["members"]) == 3  # type: ignore[arg-type]
    old = healthy.leader(name)
    healthy.kill(old)
    new = healthy.wait_leader(name, not_on=old)
    assert new is not old
    healthy.start(old)
    survivor = next(n for n in healthy.nodes if n is not old)
    conn = pika.BlockingConnection(pika.URLParameters(survivor.url))
    try:
        ch = conn.channel()
        _method, _props, body = ch.basic_get(name, auto_ack=True)
        assert body == b"kept"
        ch.queue_delete(name)
    finally:
        conn.close()


def test_topology_places_replicas_and_leaders_from_settings(
    healthy: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FACEFLEET_QUORUM_GROUP_SIZE sets the replicas of the queues topology apply creates;
    FACEFLEET_LEADER_LOCATOR=balanced spreads their leaders although one node declares them
    all (client-local would put every leader on it)."""
    import json

    from facefleet.producer.sdk import JobClient
    from facefleet.settings import ProducerSettings
    from facefleet.wire import dead_notify_queue, job_queue
    from tests.conftest import delete_tier_queues

    tiers = [f"p{uuid.uuid4().hex[:8]}" for _ in range(6)]
    monkeypatch.setenv("AMQP_URL", healthy.urls[0])
    monkeypatch.setenv("FACEFLEET_TIERS", json.dumps([{"name": t} for t in tiers]))
    monkeypatch.setenv("FACEFLEET_QUORUM_GROUP_SIZE", "2")
    monkeypatch.setenv("FACEFLEET_LEADER_LOCATOR", "balanced")
    client = JobClient(ProducerSettings.load())
    try:
        client.apply_topology()
        infos = [healthy.queue_info(job_queue(t)) for t in tiers]
        assert all(len(i["members"]) == 2 for i in infos), infos  # type: ignore[arg-type]
        assert len(healthy.queue_info(dead_notify_queue(tiers[0]))["members"]) == 2  # type: ignore[arg-type]
        leaders = {i["leader"] for i in infos}
        assert len(leaders) > 1, f"every leader on {leaders}: balanced placement not applied"
    finally:
        client.close()
        for t in tiers:
            delete_tier_queues(healthy.urls[0], t)


def test_doctor_finds_alarms_lost_nodes_and_drifted_arguments(
    healthy: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`facefleet doctor` on the cluster: clean after topology apply (exit 0); an alarm, a node
    down (its replicas offline) and arguments that differ from the declared ones are each a
    FAIL with the fix (exit 1)."""
    import json
    import subprocess
    import sys

    from facefleet.producer.sdk import JobClient
    from facefleet.settings import ProducerSettings
    from facefleet.wire import DEAD_QUEUE, EVENTS_STREAM
    from tests.conftest import delete_queue, delete_tier_queues

    tier = f"d{uuid.uuid4().hex[:8]}"
    env = {
        "AMQP_URL": healthy.amqp_url,
        "FACEFLEET_TIERS": json.dumps([{"name": tier}]),
        "FACEFLEET_MANAGEMENT_URL": healthy.nodes[0].management_url,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for name in (DEAD_QUEUE, EVENTS_STREAM):  # made by other tests, maybe with other arguments
        delete_queue(healthy.urls[0], name)
    client = JobClient(ProducerSettings.load())

    def doctor(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "facefleet.cli", "doctor", "--quiet"],
            env={**dict(__import__("os").environ), **env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def doctor_until(text: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
        """The management API's node and queue rows lag by a stats interval (5 s)."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            found = doctor()
            if text in found.stdout or time.monotonic() > deadline:
                return found
            time.sleep(2)

    try:
        client.apply_topology()
        # A queue just declared shows its replicas online only after a stats interval: poll.
        deadline = time.monotonic() + 30
        while (clean := doctor()).returncode != 0 and time.monotonic() < deadline:
            time.sleep(2)
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert "FAIL" not in clean.stdout
        drifted = doctor(FACEFLEET_QUORUM_GROUP_SIZE="2")
        assert drifted.returncode == 1
        assert "arguments differ: x-quorum-initial-group-size" in drifted.stdout, drifted.stdout
        healthy.set_memory_alarm(healthy.nodes[2], True)
        try:
            alarmed = doctor_until(f"memory alarm on {healthy.nodes[2].name}")
        finally:
            healthy.set_memory_alarm(healthy.nodes[2], False)
        assert alarmed.returncode == 1
        assert f"memory alarm on {healthy.nodes[2].name}" in alarmed.stdout, alarmed.stdout
        healthy.kill(healthy.nodes[1])
        down = doctor_until(f"replicas offline on {healthy.nodes[1].name}")
        assert down.returncode == 1
        assert "does not answer" in down.stdout, down.stdout
        assert f"replicas offline on {healthy.nodes[1].name}" in down.stdout, down.stdout
    finally:
        client.close()
        if not healthy.nodes[1].alive():
            healthy.start(healthy.nodes[1])
        delete_tier_queues(healthy.urls[0], tier)
