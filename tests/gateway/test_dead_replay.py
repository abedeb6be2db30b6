"""A replayed dead letter through the gateway, end to end: real broker, real sleep worker, real
gateway processes, `facefleet dead replay` as an operator runs it.

The gateway ends a job where the sync watcher and the SDKs do (`EndOfWatch`): a WebSocket that
gave its client a `dead_lettered` stays open for a replay and follows the replayed run to
`completed`; a history read does not stop at a dead letter that a replay followed; a dead letter
nobody replays closes the socket 1000 once the grace has passed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest

from facefleet.producer.watch import REPLAY_GRACE_S
from facefleet.wire import utcnow
from tests.gateway.conftest import API_KEY, Gateway, GatewayWorld, read_events, seqs
from tests.spine.test_dead import take_parked_copies

pytestmark = pytest.mark.integration


def wait_until_last(world: GatewayWorld, job_id: str, kind: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            journal = world.journal(job_id)
        except FileNotFoundError:
            journal = []
        if journal and journal[-1]["type"] == kind:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {kind}")


def kinds(frames: list[dict[str, Any]]) -> list[str]:
    return [f["type"] for f in frames]


def test_a_websocket_follows_a_replayed_dead_letter_to_completed(world: GatewayWorld) -> None:
    # A grace long enough to run `facefleet dead replay` while the first client waits.
    gw = world.start_gateway(FACEFLEET_REPLAY_GRACE_S="120")
    until = utcnow() + timedelta(seconds=8)
    job = world.submit(gw, sleep_s=0.3, steps=3, options={"fail_until": until.isoformat()})
    job_id, token = job["job_id"], job["token"]
    with ThreadPoolExecutor(1) as pool:
        live = pool.submit(read_events, gw.ws_url(job_id), first={"token": token}, timeout_s=120)
        wait_until_last(world, job_id, "dead_lettered")
        time.sleep(1.0)  # the dead letter reached the client: the socket stays open
        assert not live.done(), live.result()
        time.sleep(max(0.0, (until - utcnow()).total_seconds() + 0.2))
        replayed = world.env.cli("dead", "replay", job_id, "--by", "test:gateway")
        assert replayed.returncode == 0, replayed.stderr
        frames, code, reason = live.result(timeout=120)
    journal = world.journal(job_id)
    assert (code, reason) == (1000, "job ended")
    assert seqs(frames) == list(range(1, len(journal) + 1))
    assert kinds(frames) == [e["type"] for e in journal]
    dead = kinds(frames).index("dead_lettered")
    assert kinds(frames)[dead + 1] == "replayed" and kinds(frames)[-1] == "completed"
    replay_seq = frames[dead + 1]["seq"]

    # later clients: a history read goes past the dead letter to the replayed run's end
    frames, code, _ = read_events(gw.ws_url(job_id), first={"token": token}, timeout_s=60)
    assert (seqs(frames), code) == (list(range(1, len(journal) + 1)), 1000)
    frames, code, _ = read_events(
        gw.ws_url(job_id), first={"token": token, "after_seq": replay_seq - 1}, timeout_s=60
    )
    assert (seqs(frames), code) == (list(range(replay_seq, len(journal) + 1)), 1000)
    assert kinds(frames)[0] == "replayed" and kinds(frames)[-1] == "completed"
    with gw.http() as client:
        state = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
    assert state.status_code == 200, state.text
    assert state.json()["state"] == "completed"

    # `facefleet watch` through the gateway: the exit code of `completed`, not of the letter
    watched = subprocess.run(
        [sys.executable, "-m", "facefleet.cli", "watch", job_id, "--json", "--timeout", "60"],
        env=world.env.vars(FACEFLEET_GATEWAY_URL=gw.url, FACEFLEET_GATEWAY_API_KEY=API_KEY),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert watched.returncode == 0, watched.stderr
    shown = [json.loads(line) for line in watched.stdout.splitlines()]
    assert seqs(shown) == list(range(1, len(journal) + 1))
    assert kinds(shown)[-1] == "completed"


def test_a_dead_letter_nobody_replays_closes_1000_after_the_grace(
    world: GatewayWorld, gateway: Gateway
) -> None:
    job = world.submit(gateway, sleep_s=0.1, steps=1, options={"fail": "transient"})
    job_id = job["job_id"]
    try:
        wait_until_last(world, job_id, "dead_lettered")
        started = time.monotonic()
        frames, code, reason = read_events(
            gateway.ws_url(job_id), first={"token": job["token"]}, timeout_s=60
        )
        took = time.monotonic() - started
        assert kinds(frames)[-1] == "dead_lettered"
        assert seqs(frames) == list(range(1, len(world.journal(job_id)) + 1))
        assert (code, reason) == (1000, "job ended")
        assert took >= REPLAY_GRACE_S  # the default grace, as the sync watcher's and the SDK's
    finally:
        take_parked_copies(world.env.amqp_url, job_id, ack=True)
