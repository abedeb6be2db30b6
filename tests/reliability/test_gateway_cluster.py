"""The gateway on the three-node cluster: its node killed, then an alarm. Submits fail over to
another node; while the broker blocks publishers they get 503 + Retry-After and the gateway
stays ready (its /readyz says broker_blocked), then submits go through again."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from facefleet.broker import Broker
from tests.cluster import Cluster
from tests.gateway.conftest import API_KEY, GatewayWorld, new_world, png
from tests.reliability.test_chaos import urls_from, wait_alarm

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture
def cworld(healthy: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayWorld]:
    # The world's worker and its queue cleanup use node 1 only; the gateway gets every node.
    with new_world(Broker(healthy.urls[0], "env"), tmp_path_factory) as world:
        yield world


def post(client: httpx.Client, tier: str) -> httpx.Response:
    return client.post(
        "/v1/jobs",
        headers={"Authorization": f"Bearer {API_KEY}"},
        files={"source": ("a.png", png()), "target": ("b.png", png(rgb=(4, 5, 6)))},
        data={"tier": tier, "options": '{"sleep_s": 0.05, "steps": 1}'},
    )


def wait_completed(world: GatewayWorld, job_id: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(e["type"] == "completed" for e in world.journal(job_id)):
            return
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not complete: {world.journal(job_id)}")


def test_gateway_fails_over_and_answers_503_while_blocked(
    cworld: GatewayWorld, healthy: Cluster
) -> None:
    cluster = healthy
    victim = cluster.nodes[1]
    gw = cworld.start_gateway(
        AMQP_URL=urls_from(cluster, victim),
        FACEFLEET_BLOCKED_TIMEOUT_S="3",
        FACEFLEET_RETRY_AFTER_S="7",
    )
    with gw.http() as client:
        first = post(client, cworld.env.tier)
        assert first.status_code == 202, first.text
        cluster.kill(victim)
        after = post(client, cworld.env.tier)
        assert after.status_code == 202, after.text  # through another node
        wait_completed(cworld, after.json()["job_id"])
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)  # the stream tail re-attaches on another node
        assert client.get("/readyz").status_code == 200
        cluster.start(victim)

        cluster.set_memory_alarm(cluster.nodes[2], True)
        try:
            wait_alarm(cluster, True)
            started = time.monotonic()
            blocked = post(client, cworld.env.tier)
            waited = time.monotonic() - started
            ready = client.get("/readyz")
        finally:
            cluster.set_memory_alarm(cluster.nodes[2], False)
        assert blocked.status_code == 503, blocked.text
        assert blocked.headers["Retry-After"] == "7"
        assert "blocks publishers" in blocked.json()["detail"]
        assert waited < 3 + 10, waited
        assert ready.status_code == 200 and ready.json()["broker_blocked"] is True, ready.text
        wait_alarm(cluster, False)
        again = post(client, cworld.env.tier)
        assert again.status_code == 202, again.text
        wait_completed(cworld, again.json()["job_id"])
