"""`facefleet webhooks` end to end: a real broker, real worker and webhooks processes, the real
job store (journals; PostgreSQL too where it matters), a loopback receiver.

The receiver checks signatures with `standardwebhooks` (an independent implementation) and
dedupes on webhook-id, as a real receiver should.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from facefleet.producer.aio import AsyncJobClient
from facefleet.producer.sdk import JobClient
from facefleet.settings import ProducerSettings
from facefleet.wire import (
    HEADER_WEBHOOK_ATTEMPT,
    HEADER_WEBHOOK_REASON,
    HEADER_WEBHOOK_URL,
    JobEvent,
    JobRequest,
    webhook_failed_queue,
)
from tests.conftest import Env
from tests.webhooks.conftest import Receiver, Webhooks, queue_depth, take_all

pytestmark = pytest.mark.integration

Start = Callable[..., Webhooks]


def client_for(env: Env, monkeypatch: pytest.MonkeyPatch) -> JobClient:
    env.settings_env(monkeypatch)
    client = JobClient(ProducerSettings.load())
    client.apply_topology()
    return client


def media(env: Env) -> str:
    path = env.data_root / "media" / "in.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text("the sleep processor does not read it")
    return str(path)


def wait_terminal(env: Env, job_id: str, timeout_s: float = 30) -> list[JobEvent]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = env.events(job_id)
        if events and events[-1].terminal:
            return events
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end: {[e.type for e in env.events(job_id)]}")


def pending_for(amqp_url: str, queue: str, job_id: str) -> int:
    """Messages of one job still waiting in a queue (the test queues also collect the events of
    other tests running on the shared broker, so the depth alone says nothing)."""
    return sum(
        1
        for props, _ in take_all(amqp_url, queue, requeue=True)
        if (props.headers or {}).get("x-facefleet-job-id") == job_id
    )


def first_delivered(receiver: Receiver, job_id: str) -> list[tuple[str, bytes]]:
    """Dedupe on webhook-id, keeping the first 2xx of each: what a receiver acts on."""
    out: dict[str, bytes] = {}
    for a in receiver.of(job_id):
        if 200 <= a.status < 300 and a.id not in out:
            out[a.id] = a.body
    return list(out.items())


@pytest.fixture(params=["file", "postgres"])
def store_env(request: pytest.FixtureRequest, make_env: Callable[..., Env]) -> Env:
    if request.param == "postgres":
        return make_env(store_url=request.getfixturevalue("pg_url"))
    return make_env()


def test_a_jobs_events_are_posted_signed_in_seq_order(
    store_env: Env,
    receiver: Receiver,
    start_webhooks: Start,
    amqp_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = store_env
    client = client_for(env, monkeypatch)
    old = "whsec_" + "b2xkLXNlY3JldC1vbGQtc2VjcmV0LW9sZC1zZWNyZXQ="
    from tests.webhooks.conftest import new_secret

    new = new_secret()
    hooks = start_webhooks(env, secret=f"{old} {new}")
    env.start_worker()
    src = media(env)
    opts = {"sleep_s": 0.6, "steps": 3}
    every = client.submit(env.tier, src, src, options=opts, webhook_url=receiver.url).job_id
    only = client.submit(
        env.tier,
        src,
        src,
        options=opts,
        webhook_url=receiver.url + "?only=1",
        webhook_events=["completed", "started"],
    ).job_id
    silent = client.submit(env.tier, src, src, options=opts).job_id
    client.close()
    events = {job: wait_terminal(env, job) for job in (every, only, silent)}
    receiver.wait_for(
        lambda: any(a.id.startswith(every) and b'"completed"' in a.body for a in receiver.arrivals)
    )
    receiver.wait_for(lambda: len(first_delivered(receiver, only)) == 2)
    # The worker's second copy of `every`'s queued was seen (and dropped) before its started.
    receiver.wait_for(
        lambda: hooks.metric("facefleet_webhook_deliveries_total", outcome="duplicate") >= 1
    )

    # Every event but progress, once each after dedupe, in seq order, with stable ids; the
    # body is the event exactly as the job store holds it.
    want = [e for e in events[every] if e.type != "progress"]
    assert [e.type for e in want] == ["queued", "started", "completed"]
    got = first_delivered(receiver, every)
    assert [i for i, _ in got] == [f"{every}.{e.seq}" for e in want]
    assert [JobEvent.decode(b) for _, b in got] == want
    # One process POSTs each id once: the worker's second copy of `queued` is dropped.
    assert [a.id for a in receiver.of(every)] == [i for i, _ in got]
    assert not any(b'"progress"' in a.body for a in receiver.arrivals)
    # The filter, and a job without a webhook.
    assert [JobEvent.decode(b).type for _, b in first_delivered(receiver, only)] == [
        "started",
        "completed",
    ]
    assert receiver.of(silent) == []
    # Signatures: a receiver on either secret of the rotation verifies every POST.
    for arrival in receiver.arrivals:
        for secret in (old, new):
            Webhook(secret).verify(arrival.body, arrival.headers)
        assert arrival.headers["content-type"] == "application/json"
        assert arrival.headers["webhook-timestamp"].isdigit()
    assert hooks.metric("facefleet_webhook_deliveries_total", outcome="delivered") >= 5
    assert hooks.stop() == 0


def test_a_failing_receiver_gets_the_same_id_again_after_the_backoff(
    make_env: Callable[..., Env],
    start_webhooks: Start,
    amqp_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = Receiver(lambda _id, n: 503 if n < 2 else 200)  # two failures per id, then ok
    try:
        env = make_env()
        client = client_for(env, monkeypatch)
        hooks = start_webhooks(env, schedule="400ms,800ms")
        src = media(env)
        queued_only = client.submit(env.tier, src, src, webhook_url=receiver.url).job_id
        receiver.wait_for(lambda: len(receiver.of(queued_only)) == 3)
        first, second, third = receiver.of(queued_only)
        assert first.id == second.id == third.id == f"{queued_only}.1"
        assert [a.status for a in (first, second, third)] == [503, 503, 200]
        assert second.at - first.at >= 0.35 and third.at - second.at >= 0.75  # the schedule
        assert first.body == second.body == third.body
        for a in (first, second, third):
            Webhook(hooks.secret).verify(a.body, a.headers)

        # A whole job: every event gets through after its failures, once each after dedupe.
        env.start_worker()
        job = client.submit(
            env.tier, src, src, options={"sleep_s": 0.3}, webhook_url=receiver.url
        ).job_id
        client.close()
        events = [e for e in wait_terminal(env, job) if e.type != "progress"]
        receiver.wait_for(lambda: len(first_delivered(receiver, job)) == len(events))
        got = first_delivered(receiver, job)
        assert [JobEvent.decode(b) for _, b in got] == events
        for msg_id, _ in got:
            statuses = [a.status for a in receiver.of(job) if a.id == msg_id]
            assert statuses.count(200) == 1 and statuses[:2] == [503, 503]
        assert hooks.metric("facefleet_webhook_deliveries_total", outcome="retried") >= 8
        assert queue_depth(amqp_url, webhook_failed_queue(hooks.queue)) == 0
        assert hooks.stop() == 0
    finally:
        receiver.close()


def test_retries_end_parked_with_the_reason(
    make_env: Callable[..., Env],
    start_webhooks: Start,
    amqp_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = Receiver(lambda _id, _n: 500)
    try:
        env = make_env()
        client = client_for(env, monkeypatch)
        hooks = start_webhooks(env, schedule="200ms,200ms")
        src = media(env)
        job = client.submit(env.tier, src, src, webhook_url=receiver.url + "?token=s3cr3t").job_id
        client.close()
        failed = webhook_failed_queue(hooks.queue)
        receiver.wait_for(lambda: queue_depth(amqp_url, failed) == 1)
        assert [a.status for a in receiver.of(job)] == [500, 500, 500]
        [(props, body)] = take_all(amqp_url, failed, requeue=True)
        headers = props.headers or {}
        assert headers[HEADER_WEBHOOK_ATTEMPT] == 3
        assert headers[HEADER_WEBHOOK_REASON] == "gave up after 3 attempts: HTTP 500"
        assert headers[HEADER_WEBHOOK_URL] == receiver.url  # redacted: no query
        assert JobEvent.decode(body).job_id == job
        assert hooks.metric("facefleet_webhook_deliveries_total", outcome="failed") == 1
        assert hooks.stop() == 0

        # Once the receiver is fixed, an operator moves parked deliveries back: fresh attempts.
        [(props, body)] = take_all(amqp_url, failed, requeue=True)
        receiver.plan = lambda _id, _n: 200
        done = env.cli(
            "webhooks",
            "replay-failed",
            FACEFLEET_WEBHOOK_SECRET=hooks.secret,
            FACEFLEET_WEBHOOK_QUEUE=hooks.queue,
            FACEFLEET_WEBHOOK_RETRY_SCHEDULE="200ms,200ms",
        )
        assert done.returncode == 0, done.stderr
        assert "moved 1" in done.stdout
        assert queue_depth(amqp_url, failed) == 0
        start_webhooks(env, schedule="200ms,200ms", queue=hooks.queue)
        receiver.wait_for(lambda: [a.status for a in receiver.of(job)] == [500] * 3 + [200])
    finally:
        receiver.close()


def test_a_refused_target_is_parked_and_never_connected(
    env: Env,
    receiver: Receiver,
    start_webhooks: Start,
    amqp_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = client_for(env, monkeypatch)
    hooks = start_webhooks(env, allow=None)  # loopback is not allow-listed
    src = media(env)
    job = client.submit(env.tier, src, src, webhook_url=receiver.url).job_id
    client.close()
    failed = webhook_failed_queue(hooks.queue)
    receiver.wait_for(lambda: queue_depth(amqp_url, failed) == 1)
    [(props, body)] = take_all(amqp_url, failed)
    reason = str((props.headers or {})[HEADER_WEBHOOK_REASON])
    assert "loopback" in reason and "allow list" in reason, reason
    assert (props.headers or {})[HEADER_WEBHOOK_ATTEMPT] == 1  # not retried
    assert JobEvent.decode(body).job_id == job
    assert receiver.connections == 0 and receiver.arrivals == []
    assert hooks.metric("facefleet_webhook_attempts_total", result="refused") == 1
    assert hooks.stop() == 0


def test_410_gone_stops_a_jobs_webhooks(
    make_env: Callable[..., Env],
    start_webhooks: Start,
    amqp_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = Receiver(lambda _id, _n: 410)
    try:
        env = make_env()
        client = client_for(env, monkeypatch)
        hooks = start_webhooks(env)
        env.start_worker()
        src = media(env)
        job = client.submit(
            env.tier, src, src, options={"sleep_s": 0.3}, webhook_url=receiver.url
        ).job_id
        client.close()
        published = len(wait_terminal(env, job)) + 1  # the worker publishes `queued` again
        # The first POST answered 410; every later message of the job is acked unposted.
        receiver.wait_for(
            lambda: hooks.metric("facefleet_webhook_deliveries_total", outcome="gone") >= published
        )
        assert [a.id for a in receiver.of(job)] == [f"{job}.1"]
        assert queue_depth(amqp_url, webhook_failed_queue(hooks.queue)) == 0
        assert hooks.stop() == 0
    finally:
        receiver.close()


def test_sigterm_finishes_the_post_in_flight_and_exits_0(
    env: Env,
    start_webhooks: Start,
    amqp_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = Receiver(delay_s=1.5)
    try:
        client = client_for(env, monkeypatch)
        hooks = start_webhooks(env)
        src = media(env)
        job = client.submit(env.tier, src, src, webhook_url=receiver.url).job_id
        client.close()
        receiver.wait_for(lambda: bool(receiver.started))
        hooks.proc.send_signal(signal.SIGTERM)
        assert hooks.proc.wait(20) == 0
        assert [(a.id, a.status) for a in receiver.arrivals] == [(f"{job}.1", 204)]
        assert pending_for(amqp_url, hooks.queue, job) == 0  # acked before the exit
    finally:
        receiver.close()


def test_submit_cli_and_async_sdk_carry_the_webhook(
    env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    client_for(env, monkeypatch).close()
    src = media(env)
    done = env.cli(
        *env.submit_args(src, src),
        "--webhook",
        "https://hooks.example.com/ff",
        "--webhook-event",
        "completed",
        "--webhook-event",
        "failed",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["job_id"]
    record = ProducerSettings.load().media_store().submission(job_id)
    assert record is not None
    job = JobRequest.decode(record)
    assert job.webhook_url == "https://hooks.example.com/ff"
    assert job.webhook_events == ("completed", "failed")
    bad = env.cli(*env.submit_args(src, src), "--webhook", "ftp://example.com/x")
    assert bad.returncode == 2 and "https://" in bad.stderr
    bad = env.cli(
        *env.submit_args(src, src), "--webhook", "https://x.org", "--webhook-event", "everything"
    )
    assert bad.returncode == 2 and "--webhook-event" in bad.stderr

    async def submit() -> str:
        async with AsyncJobClient(ProducerSettings.load()) as aclient:
            result = await aclient.submit(
                env.tier, src, src, webhook_url="https://h.example/x", webhook_events=["completed"]
            )
            return result.job_id

    job = JobRequest.decode(
        ProducerSettings.load().media_store().submission(asyncio.run(submit())) or b""
    )
    assert (job.webhook_url, job.webhook_events) == ("https://h.example/x", ("completed",))


def test_topology_is_idempotent(amqp_url: str) -> None:
    import uuid

    from facefleet.amqp import connect
    from facefleet.webhooks import WebhookQueues, declare_webhook_topology
    from tests.conftest import delete_queue

    queues = WebhookQueues(f"ffwh-test-{uuid.uuid4().hex[:8]}")
    conn = connect(amqp_url, "test-webhook-topology")
    try:
        for _ in range(2):
            feats = declare_webhook_topology(conn, queues, [500, 5000, 5000])
        assert feats.version >= (3, 10)
        ch = conn.channel()
        for name in (queues.main, queues.failed, queues.retry(500), queues.retry(5000)):
            ch.queue_declare(name, passive=True)
    finally:
        for name in (queues.main, queues.failed, queues.retry(500), queues.retry(5000)):
            delete_queue(amqp_url, name)
        conn.close()


def test_a_lost_broker_connection_is_restored_and_nothing_is_lost(
    env: Env,
    receiver: Receiver,
    start_webhooks: Start,
    amqp_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sender's connections go through a proxy that goes down (a broker restart, a network
    cut): events published meanwhile wait in the durable queue and are POSTed once it is back."""
    from urllib.parse import urlparse

    from tests.spine.tcpproxy import TcpProxy

    client = client_for(env, monkeypatch)
    broker = urlparse(amqp_url)
    proxy = TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    try:
        proxied = amqp_url.replace(f":{broker.port or 5672}/", f":{proxy.port}/", 1)
        hooks = start_webhooks(env, AMQP_URL=proxied)
        src = media(env)
        before = client.submit(env.tier, src, src, webhook_url=receiver.url).job_id
        receiver.wait_for(lambda: len(receiver.of(before)) == 1)
        proxy.down()
        receiver.wait_for(lambda: hooks.get("/readyz")[0] == 503, timeout_s=10)
        during = client.submit(env.tier, src, src, webhook_url=receiver.url).job_id
        time.sleep(1.0)
        assert receiver.of(during) == []
        proxy.up()
        receiver.wait_for(lambda: len(receiver.of(during)) == 1, timeout_s=30)
        assert hooks.get("/readyz")[0] == 200
        assert "reconnecting" in hooks.log.read_text()
        assert hooks.stop() == 0
    finally:
        client.close()
        proxy.close()
