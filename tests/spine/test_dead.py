"""Dead letters end to end: `facefleet dead list` and `facefleet dead replay` against the real
broker and a real worker process, in both shapes of tests/spine/conftest.py (file: journals and
media in the data root; s3-postgres: PostgreSQL job store, S3-API media store).

A job that fails transiently until a given time (the sleep processor's `fail_until`)
dead-letters, is listed with its code and reason, is replayed, and completes; its history
reads queued .. dead_lettered, replayed, started .. completed, gapless, and the events stream
has the same events. A job that always fails is replayed (by tier, from its submission
record once its parked copy is gone) and dead-letters again after a fresh attempt budget. A
completed job is never replayed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import pika
import pytest

from facefleet.producer.sdk import JobClient
from facefleet.producer.watch import watch_events
from facefleet.settings import ProducerSettings
from facefleet.wire import DEAD_QUEUE, JobEvent, JobOptionValue, utcnow
from tests.conftest import Env

pytestmark = pytest.mark.integration


@pytest.fixture
def env(media_env: Env) -> Env:
    return media_env


def types(events: list[JobEvent]) -> list[str]:
    return [e.type for e in events if e.type != "progress"]


def wait_for(env: Env, job_id: str, done: Callable[[list[JobEvent]], bool]) -> list[JobEvent]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = env.events(job_id)
        if events and done(events):
            return events
        time.sleep(0.1)
    raise AssertionError(f"job {job_id}: {types(env.events(job_id))}")


def ends_in(kind: str, count: int = 1) -> Callable[[list[JobEvent]], bool]:
    return lambda events: events[-1].type == kind and types(events).count(kind) == count


def take_parked_copies(amqp_url: str, job_id: str, *, ack: bool) -> int:
    """Copies of a job in the parked queue (acked, i.e. removed, when asked; the others go
    back when the connection closes)."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        found = 0
        while True:
            method, props, _ = ch.basic_get(DEAD_QUEUE, auto_ack=False)
            if method is None:
                return found
            if props.message_id == job_id:
                found += 1
                if ack:
                    ch.basic_ack(method.delivery_tag)
    finally:
        conn.close()


def test_a_dead_letter_is_listed_replayed_and_completes(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.settings_env(monkeypatch)
    client = JobClient(ProducerSettings.load())
    client.apply_topology()
    env.start_worker(FACEFLEET_MAX_ATTEMPTS="2")
    src = env.data_root / "media" / "in.txt"
    src.parent.mkdir(exist_ok=True)
    src.write_text("the sleep processor does not read it")
    until = utcnow() + timedelta(seconds=6)
    quick: dict[str, JobOptionValue] = {"sleep_s": 0.2, "steps": 2}
    job = client.submit(
        env.tier, str(src), str(src), options={**quick, "fail_until": until.isoformat()}
    ).job_id
    doomed = client.submit(env.tier, str(src), str(src), options={"fail": "transient"}).job_id
    done = client.submit(env.tier, str(src), str(src), options=quick).job_id
    for dead in (job, doomed):
        events = wait_for(env, dead, ends_in("dead_lettered"))
        assert types(events) == ["queued", "started", "retrying", "dead_lettered"]
    wait_for(env, done, ends_in("completed"))

    listed = env.cli("dead", "list", "--tier", env.tier, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["job_id"]: r for r in map(json.loads, listed.stdout.splitlines())}
    assert set(rows) == {job, doomed}
    assert rows[job]["tier"] == env.tier and rows[job]["code"] == "internal_error"
    assert rows[job]["reason"].startswith("gave up after 2 attempts")
    assert datetime.fromisoformat(rows[job]["dead_lettered_at"]) <= utcnow()
    text = env.cli("dead", "list", "--tier", env.tier)
    assert job in text.stdout and "internal_error" in text.stdout

    # a completed job is never replayed (nor one that is not a job at all)
    refused = env.cli("dead", "replay", done)
    assert refused.returncode == 1
    assert f"job {done} completed" in refused.stderr and "never replayed" in refused.stderr
    assert types(env.events(done)) == ["queued", "started", "completed"]
    assert env.cli("dead", "replay", "not-a-job").returncode == 2

    # the job's failures are over: replay it (its request from the parked queue)
    time.sleep(max(0.0, (until - utcnow()).total_seconds() + 0.2))
    replayed = env.cli("dead", "replay", job, "--by", "test:replay")
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed {job}" in replayed.stdout and "parked queue" in replayed.stdout
    events = wait_for(env, job, ends_in("completed"))
    assert types(events) == [
        "queued",
        "started",
        "retrying",
        "dead_lettered",
        "replayed",
        "started",
        "completed",
    ]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    replay = next(e for e in events if e.type == "replayed")
    assert replay.payload.replayed_by == "test:replay"
    assert [e.payload.attempt for e in events if e.type == "started"] == [1, 1]  # fresh budget
    assert take_parked_copies(env.amqp_url, job, ack=False) == 0  # its parked copy is gone
    # the stream: the same events after the dead letter, in order
    streamed = watch_events(
        env.amqp_url, job, after_seq=replay.seq - 1, since=events[0].ts, timeout_s=20
    )
    assert [(e.seq, e.type) for e in streamed] == [
        (e.seq, e.type) for e in events if e.seq >= replay.seq
    ]
    # from the start: the old dead letter does not end the watch, the replay goes on to the end
    whole = watch_events(env.amqp_url, job, since=events[0].ts, timeout_s=30)
    assert [(e.seq, e.type) for e in whole] == [(e.seq, e.type) for e in events]
    watched = env.cli("watch", job, "--json")
    assert watched.returncode == 0, watched.stderr  # exit code of `completed`, not of the letter
    shown = [json.loads(line)["type"] for line in watched.stdout.splitlines()]
    assert [t for t in shown if t != "progress"] == types(events)
    again = env.cli("dead", "replay", job)
    assert again.returncode == 1 and "completed" in again.stderr

    # by tier, with the parked copy gone: from the submission record; fails again after a
    # fresh budget of two attempts
    assert take_parked_copies(env.amqp_url, doomed, ack=True) == 1
    by_tier = env.cli("dead", "replay", "--tier", env.tier, "--json")
    assert by_tier.returncode == 0, by_tier.stderr
    [outcome] = map(json.loads, by_tier.stdout.splitlines())
    assert outcome["job_id"] == doomed and outcome["outcome"] == "replayed"
    assert outcome["source"] == "submission record"
    events = wait_for(env, doomed, ends_in("dead_lettered", 2))
    assert types(events) == [
        "queued",
        "started",
        "retrying",
        "dead_lettered",
        "replayed",
        "started",
        "retrying",
        "dead_lettered",
    ]
    listed = env.cli("dead", "list", "--tier", env.tier, "--json")
    assert [json.loads(line)["job_id"] for line in listed.stdout.splitlines()] == [doomed]
    client.close()
