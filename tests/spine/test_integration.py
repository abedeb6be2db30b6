"""The job spine against a real RabbitMQ and real worker processes (sleep/noop processors).

No broker mocks here: every test publishes with confirms, runs `facefleet worker` as a
subprocess, and reads the outcome from the job's journal and the events stream.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
import uuid

import pika
import pytest

from facefleet.producer.errors import InvalidJobError, TierFullError, UnroutableJobError
from facefleet.producer.sdk import JobClient
from facefleet.producer.watch import watch_events
from facefleet.settings import ProducerSettings
from facefleet.wire import (
    HEADER_DEAD_CODE,
    HEADER_DEAD_REASON,
    JOBS_EXCHANGE,
    JobEvent,
    job_queue,
)
from tests.conftest import DeadLetters, Env

pytestmark = pytest.mark.integration


def client_for(env: Env, monkeypatch: pytest.MonkeyPatch) -> JobClient:
    env.settings_env(monkeypatch)
    client = JobClient(ProducerSettings.load())
    client.apply_topology()
    return client


@pytest.fixture
def env(media_env: Env) -> Env:
    """Every test here runs in both shapes: file (data root) and s3-postgres (no shared volume)."""
    return media_env


def media(env: Env, name: str = "in.txt") -> str:
    path = env.data_root / "media" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("not really a photo; the sleep processor does not read it")
    return str(path)


def journal(env: Env, job_id: str) -> list[JobEvent]:
    return env.events(job_id)


def wait_terminal(env: Env, job_id: str, timeout_s: float = 30) -> list[JobEvent]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = journal(env, job_id)
        if events and events[-1].terminal:
            return events
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end: {[e.type for e in journal(env, job_id)]}")


def types(events: list[JobEvent]) -> list[str]:
    return [e.type for e in events if e.type != "progress"]


def assert_gapless(events: list[JobEvent]) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


def test_job_completes_with_ordered_events_and_durable_result(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(env, monkeypatch)
    env.start_worker()
    src = media(env)
    result = client.submit(env.tier, src, src, options={"sleep_s": 0.6, "steps": 3})
    events = wait_terminal(env, result.job_id)
    assert_gapless(events)
    assert types(events) == ["queued", "started", "completed"]
    assert any(e.type == "progress" for e in events)
    done = events[-1].payload
    assert done.result_uri is not None and done.manifest_uri is not None
    assert done.result_uri.startswith("s3://" if env.media_url else "file://")
    manifest = json.loads(env.read(done.manifest_uri))
    assert manifest["job_id"] == result.job_id
    assert env.read(done.result_uri)
    # The stream holds the same history, in order, for a watcher that starts late.
    streamed = list(watch_events(env.amqp_url, result.job_id, since=events[0].ts, timeout_s=20))
    assert [(e.seq, e.type) for e in streamed] == [(e.seq, e.type) for e in events]


def test_watch_resumes_after_a_seq_without_gaps(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_for(env, monkeypatch)
    env.start_worker()
    src = media(env)
    job = client.submit(env.tier, src, src, options={"sleep_s": 0.3}).job_id
    events = wait_terminal(env, job)
    resumed = list(watch_events(env.amqp_url, job, after_seq=2, since=events[0].ts, timeout_s=20))
    assert [e.seq for e in resumed] == [e.seq for e in events if e.seq > 2]


def test_same_idempotency_key_gives_one_job_and_one_execution(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(env, monkeypatch)
    src = media(env)
    first = client.submit(env.tier, src, src, idempotency_key="order-42", options={"sleep_s": 0.3})
    second = client.submit(env.tier, src, src, idempotency_key="order-42", options={"sleep_s": 0.3})
    assert not first.duplicate
    assert second.job_id == first.job_id and second.duplicate
    env.start_worker()
    events = wait_terminal(env, first.job_id)
    assert types(events).count("started") == 1
    assert types(events).count("completed") == 1


def test_duplicate_message_for_a_running_job_waits_and_is_not_run_twice(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two copies of one job in the queue (e.g. a re-published message) with two workers."""
    client = client_for(env, monkeypatch)
    src = media(env)
    result = client.submit(env.tier, src, src, options={"sleep_s": 1.5})
    assert result.request is not None
    # Publish the very same job message again, as a producer retry after a lost confirm would.
    ch = client._ch()
    ch.basic_publish(JOBS_EXCHANGE, env.tier, result.request.encode(), mandatory=True)
    env.start_worker()
    env.start_worker()
    events = wait_terminal(env, result.job_id)
    time.sleep(2.0)  # let the second copy be handled too
    events = journal(env, result.job_id)
    assert types(events) == ["queued", "started", "completed"]
    assert_queue_empty(env)


def assert_queue_empty(env: Env, timeout_s: float = 15) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            frame = conn.channel().queue_declare(job_queue(env.tier), passive=True)
            if frame.method.message_count == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{frame.method.message_count} jobs left in the queue")
            conn.sleep(0.2)
    finally:
        conn.close()


def test_unroutable_tier_raises_a_clear_error(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_for(env, monkeypatch)
    src = media(env)
    with pytest.raises(UnroutableJobError, match="no queue is bound"):
        client.submit("nosuchtier" + uuid.uuid4().hex[:6], src, src)


def test_full_tier_raises_tier_full(make_env, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Quorum queues may overshoot reject-publish by a message or two (anchors.md B11)."""
    env = make_env(max_length=2)
    client = client_for(env, monkeypatch)
    src = media(env)
    accepted = 0
    with pytest.raises(TierFullError) as info:
        for _ in range(6):
            client.submit(env.tier, src, src)
            accepted += 1
    assert 2 <= accepted <= 4
    assert info.value.tier == env.tier
    assert "retry later" in str(info.value)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        pytest.param("/etc/passwd", "outside the media store", id="path-outside-data-root"),
        pytest.param("ftp://example.invalid/a.jpg", "outside the media store", id="ftp-uri"),
        pytest.param("https:///a.jpg", "no host in the URL", id="https-without-host"),
        pytest.param("missing/file.jpg", "no such file", id="missing-local-file"),
    ],
)
def test_bad_media_is_refused_before_anything_is_queued(
    env: Env, monkeypatch: pytest.MonkeyPatch, source: str, message: str
) -> None:
    client = client_for(env, monkeypatch)
    if source == "/etc/passwd":
        source = "file:///etc/passwd"
    with pytest.raises(InvalidJobError, match=message):
        client.submit(env.tier, source, media(env))


def test_permanent_error_fails_at_once_with_its_code(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(env, monkeypatch)
    env.start_worker()
    src = media(env)
    job = client.submit(env.tier, src, src, options={"fail": "permanent"}).job_id
    events = wait_terminal(env, job)
    assert types(events) == ["queued", "started", "failed"]
    assert events[-1].payload.code == "invalid_request"
    assert events[-1].payload.retryable is False


def test_transient_errors_retry_with_backoff_then_dead_letter(
    env: Env, monkeypatch: pytest.MonkeyPatch, dead_letters: DeadLetters
) -> None:
    client = client_for(env, monkeypatch)
    env.start_worker(FACEFLEET_MAX_ATTEMPTS="3")
    src = media(env)
    job = client.submit(env.tier, src, src, options={"fail": "transient"}).job_id
    events = wait_terminal(env, job)
    assert types(events) == ["queued", "started", "retrying", "retrying", "dead_lettered"]
    delays = [e.payload.delay_s or 0 for e in events if e.type == "retrying"]
    assert delays[1] > delays[0]  # exponential backoff (jitter is ±20%, the base doubles)
    props, _ = dead_letters.wait_for(lambda p, b: p.message_id == job)
    assert "gave up after 3 attempts" in props.headers[HEADER_DEAD_REASON]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b"\x00\xffnot json", "not JSON", id="not-json"),
        pytest.param(b"[1, 2]", "expected an object", id="json-array"),
        pytest.param(
            json.dumps({"schema_version": 99, "job_id": str(uuid.uuid4())}).encode(),
            "unsupported schema_version 99",
            id="unknown-schema-version",
        ),
        pytest.param(
            json.dumps({"schema_version": 1, "job_id": str(uuid.uuid4()), "tier": "x"}).encode(),
            "invalid JobRequest",
            id="missing-fields",
        ),
    ],
)
def test_malformed_message_is_dead_lettered_with_reason_and_worker_goes_on(
    env: Env,
    monkeypatch: pytest.MonkeyPatch,
    dead_letters: DeadLetters,
    body: bytes,
    reason: str,
) -> None:
    client = client_for(env, monkeypatch)
    worker = env.start_worker()
    marker = uuid.uuid4().hex
    client._ch().basic_publish(
        JOBS_EXCHANGE, env.tier, body, pika.BasicProperties(correlation_id=marker), mandatory=True
    )
    props, dead_body = dead_letters.wait_for(lambda p, b: p.correlation_id == marker or b == body)
    assert dead_body == body
    assert reason in props.headers[HEADER_DEAD_REASON]
    assert props.headers[HEADER_DEAD_CODE] in ("invalid_request", "unsupported_schema")
    # The worker is alive and still serves good jobs.
    src = media(env)
    job = client.submit(env.tier, src, src, options={"sleep_s": 0.1}).job_id
    assert wait_terminal(env, job)[-1].type == "completed"
    assert worker.proc.poll() is None
    parsed = json.loads(body) if body.startswith(b"{") else None
    if parsed and "job_id" in parsed:
        assert journal(env, parsed["job_id"])[-1].type == "dead_lettered"


def test_cancel_running_job_between_steps(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_for(env, monkeypatch)
    env.start_worker()
    src = media(env)
    job = client.submit(env.tier, src, src, options={"sleep_s": 20}).job_id
    deadline = time.monotonic() + 15
    while "started" not in types(journal(env, job)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client.cancel(job, "user changed their mind")
    events = wait_terminal(env, job, timeout_s=10)
    assert events[-1].type == "cancelled"
    assert events[-1].payload.message == "user changed their mind"


def test_cancel_queued_job_before_any_worker_takes_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(env, monkeypatch)
    src = media(env)
    job = client.submit(env.tier, src, src, options={"sleep_s": 5}).job_id
    client.cancel(job)
    env.start_worker()
    events = wait_terminal(env, job)
    assert types(events) == ["queued", "cancelled"]


def test_sigterm_drains_the_running_job_then_exits_zero(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(env, monkeypatch)
    worker = env.start_worker()
    src = media(env)
    job = client.submit(env.tier, src, src, options={"sleep_s": 2}).job_id
    while "started" not in types(journal(env, job)):
        time.sleep(0.05)
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert types(journal(env, job)) == ["queued", "started", "completed"]


def test_sigterm_requeues_what_cannot_finish_within_the_drain_deadline(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(env, monkeypatch)
    worker = env.start_worker(FACEFLEET_DRAIN_TIMEOUT_S="1")
    src = media(env)
    job = client.submit(env.tier, src, src, options={"sleep_s": 4}).job_id
    while "started" not in types(journal(env, job)):
        time.sleep(0.05)
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert not journal(env, job)[-1].terminal  # requeued, not failed
    env.start_worker()
    events = wait_terminal(env, job)
    assert types(events)[-1] == "completed"
    assert types(events).count("completed") == 1


def test_heartbeats_keep_flowing_during_a_job_longer_than_the_heartbeat(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """heartbeat=2 s means the broker drops a silent connection after ~4 s; the job runs 8 s."""
    client = client_for(env, monkeypatch)
    sep = "&" if "?" in env.amqp_url else "?"
    worker = env.start_worker(AMQP_URL=f"{env.amqp_url}{sep}heartbeat=2")
    src = media(env)
    job = client.submit(env.tier, src, src, options={"sleep_s": 8, "steps": 2}).job_id
    events = wait_terminal(env, job, timeout_s=40)
    assert types(events) == ["queued", "started", "completed"]
    assert "connection lost" not in worker.log.read_text()


def kill_workers_while_jobs_run(
    env: Env, jobs: list[str], *, every_s: float, kills: int = 4, **worker_env: str
) -> int:
    """Two workers; once a job has started, kill -9 one of them every `every_s`, `kills`
    times, starting a new one each time, until every job ended (at most 120 s). Returns how
    many jobs a kill interrupted (started more than once): at least one, or the test proved
    nothing (on a loaded machine the jobs may all end before the last kills)."""
    workers = [env.start_worker(**worker_env), env.start_worker(**worker_env)]
    done = 0
    deadline = time.monotonic() + 120
    while not any("started" in types(journal(env, j)) for j in jobs):
        assert time.monotonic() < deadline, "no job started"
        time.sleep(0.05)
    while time.monotonic() < deadline:
        if all((ev := journal(env, j)) and ev[-1].terminal for j in jobs):
            break
        if done < kills:
            time.sleep(every_s)
            victim = workers[done % 2]
            victim.signal(signal.SIGKILL)
            victim.wait(10)
            done += 1
            workers[(done - 1) % 2] = env.start_worker(**worker_env)
        else:
            time.sleep(0.2)
    assert done >= 1
    return sum(types(journal(env, j)).count("started") > 1 for j in jobs)


@pytest.mark.parametrize("depth", [1, 3], ids=["sequential", "pipelined"])
def test_kill_9_mid_job_repeatedly_every_job_completes_exactly_once(
    env: Env, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    client = client_for(env, monkeypatch)
    src = media(env)
    jobs = [
        client.submit(env.tier, src, src, options={"sleep_s": 1.2, "steps": 6}).job_id
        for _ in range(6 * depth)  # a pipelined worker runs `depth` at once: as many rounds
    ]
    assert (
        kill_workers_while_jobs_run(env, jobs, every_s=0.7, FACEFLEET_PIPELINE_DEPTH=str(depth))
        >= 1
    )
    for job in jobs:
        events = journal(env, job)
        assert_gapless(events)
        assert types(events).count("completed") == 1, types(events)
        assert events[-1].type == "completed"
        streamed = list(watch_events(env.amqp_url, job, since=events[0].ts, timeout_s=20))
        assert [e.type for e in streamed].count("completed") == 1
    assert_queue_empty(env)


def test_job_that_keeps_killing_workers_is_dead_lettered_by_the_delivery_limit(
    make_env, monkeypatch: pytest.MonkeyPatch, dead_letters: DeadLetters
) -> None:  # type: ignore[no-untyped-def]
    env = make_env(delivery_limit=2)
    client = client_for(env, monkeypatch)
    src = media(env)
    job = client.submit(env.tier, src, src, options={"sleep_s": 0.4, "chaos_kill": True}).job_id
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        events = journal(env, job)
        if events and events[-1].terminal:
            break
        worker = env.start_worker(FACEFLEET_ALLOW_CHAOS="true", wait_ready=False)
        with contextlib.suppress(Exception):
            worker.wait(8)
    events = wait_terminal(env, job, timeout_s=20)
    assert events[-1].type == "dead_lettered"
    assert events[-1].payload.code == "delivery_limit"
    assert types(events).count("started") >= 2


@pytest.mark.parametrize(
    ("concurrency", "depth"),
    [
        pytest.param(1, 1, id="prefetch-1"),
        pytest.param(3, 1, id="prefetch-3"),
        pytest.param(1, 3, id="pipelined-3"),
    ],
)
def test_scaledjob_worker_exits_after_its_share_of_jobs(
    env: Env, monkeypatch: pytest.MonkeyPatch, concurrency: int, depth: int
) -> None:
    """FACEFLEET_MAX_JOBS=2 runs exactly two jobs, even when more were prefetched (those are
    given back, not lost): a later worker finishes the rest, each job once."""
    client = client_for(env, monkeypatch)
    src = media(env)
    jobs = [client.submit(env.tier, src, src, options={"sleep_s": 0.1}).job_id for _ in range(5)]
    worker = env.start_worker(
        FACEFLEET_MAX_JOBS="2",
        FACEFLEET_CONCURRENCY=str(concurrency),
        FACEFLEET_PIPELINE_DEPTH=str(depth),
        wait_ready=False,
    )
    assert worker.wait(30) == 0
    # a job no worker took yet has an empty journal (its `queued` is in the stream only)
    assert sum(1 for j in jobs if types(journal(env, j))[-1:] == ["completed"]) == 2
    env.start_worker()
    for j in jobs:
        assert types(wait_terminal(env, j, timeout_s=30)).count("completed") == 1


def test_scaledjob_worker_exits_when_idle(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    client_for(env, monkeypatch)
    worker = env.start_worker(FACEFLEET_IDLE_EXIT_S="1", wait_ready=False)
    assert worker.wait(30) == 0


def test_worker_reconnects_after_the_link_is_cut_and_completes_once(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's connections go through a proxy that drops them mid-job (a network cut or a
    broker restart): the worker reconnects, the broker redelivers the unacked job, and the job
    still ends with exactly one `completed`."""
    from urllib.parse import urlparse

    from tests.spine.tcpproxy import TcpProxy

    client = client_for(env, monkeypatch)
    broker = urlparse(env.amqp_url)
    proxy = TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    try:
        proxied = env.amqp_url.replace(f":{broker.port or 5672}/", f":{proxy.port}/", 1)
        if f":{broker.port}" not in env.amqp_url:
            proxied = env.amqp_url.replace(
                f"@{broker.hostname}/", f"@{broker.hostname}:{proxy.port}/", 1
            )
        worker = env.start_worker(AMQP_URL=proxied)
        src = media(env)
        first = client.submit(env.tier, src, src, options={"sleep_s": 3, "steps": 6}).job_id
        while "started" not in types(journal(env, first)):
            time.sleep(0.05)
        proxy.cut()
        events = wait_terminal(env, first, timeout_s=60)
        assert types(events) == ["queued", "started", "completed"]
        second = client.submit(env.tier, src, src, options={"sleep_s": 0.2}).job_id
        assert wait_terminal(env, second, timeout_s=60)[-1].type == "completed"
        assert_queue_empty(env)
        assert worker.proc.poll() is None
        assert "reconnecting" in worker.log.read_text()
    finally:
        proxy.close()


def test_queue_declared_with_other_arguments_is_kept_with_a_warning(
    make_env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """An older release (or a broker before 3.12) declared the tier's queue with other arguments:
    workers must still start and serve it, and say how to converge."""
    from facefleet.amqp import connect, declare_topology
    from facefleet.wire import TierSpec

    env = make_env(max_length=50)
    client = client_for(env, monkeypatch)  # declares with max_length 50
    conn = connect(env.amqp_url, "test-drift")
    try:
        with caplog.at_level("WARNING", logger="facefleet.amqp"):
            declare_topology(conn, [TierSpec(env.tier, max_job_s=60, max_length=70)])
    finally:
        conn.close()
    assert "exists with other arguments" in caplog.text and "policy" in caplog.text
    env.tiers[0]["max_length"] = 70
    env.start_worker()
    src = media(env)
    job = client.submit(env.tier, src, src, options={"sleep_s": 0.1}).job_id
    assert wait_terminal(env, job)[-1].type == "completed"


def test_draining_more_often_than_the_delivery_limit_never_dead_letters_the_job(
    make_env, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Up to RabbitMQ 4.2 every requeue counts towards x-delivery-limit (anchors.md B7). A worker
    that gives a job back on purpose (SIGTERM drain) republishes a fresh copy instead, so a job
    drained more often than the limit still completes, and its attempt number stays 1."""
    limit = 2
    env = make_env(delivery_limit=limit)
    client = client_for(env, monkeypatch)
    src = media(env)
    job = client.submit(env.tier, src, src, options={"sleep_s": 3, "steps": 6}).job_id
    drains = limit + 2
    for n in range(1, drains + 1):
        worker = env.start_worker(FACEFLEET_DRAIN_TIMEOUT_S="0.3")
        deadline = time.monotonic() + 30
        while types(journal(env, job)).count("started") < n:
            events = journal(env, job)
            assert not events[-1].terminal, f"drain {n}: job ended early: {types(events)}"
            assert time.monotonic() < deadline, f"drain {n}: job not redelivered: {types(events)}"
            time.sleep(0.05)
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        assert not journal(env, job)[-1].terminal, types(journal(env, job))
    env.start_worker()
    events = wait_terminal(env, job, timeout_s=60)
    assert types(events) == ["queued", *["started"] * (drains + 1), "completed"]
    assert {e.payload.attempt for e in events if e.type == "started"} == {1}
    assert_gapless(events)
    assert_queue_empty(env)


def test_job_queue_is_declared_with_at_least_once_dead_lettering(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read back from the real broker: re-declaring the tier's queue without the strategy is
    refused as inequivalent (406), and with the contract's arguments it is accepted."""
    from facefleet.amqp import connect, features
    from facefleet.wire import TierSpec, job_queue_arguments

    client_for(env, monkeypatch)  # topology apply
    conn = connect(env.amqp_url, "test-dead-letter-strategy")
    try:
        feats = features(conn)
        args = job_queue_arguments(TierSpec(env.tier, max_job_s=60, delivery_limit=5), feats)
        if not feats.at_least_once_dead_lettering:
            assert "x-dead-letter-strategy" not in args
            pytest.skip(f"broker {feats.version} < 3.10 has no at-least-once dead lettering")
        assert args["x-dead-letter-strategy"] == "at-least-once"
        conn.channel().queue_declare(job_queue(env.tier), durable=True, arguments=args)
        without = {k: v for k, v in args.items() if k != "x-dead-letter-strategy"}
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            conn.channel().queue_declare(job_queue(env.tier), durable=True, arguments=without)
        assert info.value.reply_code == 406
        assert "x-dead-letter-strategy" in info.value.reply_text
    finally:
        conn.close()


def test_publisher_close_waits_for_confirms_in_flight(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's ThreadedPublisher pipelines confirms; close() right after a burst still lets
    every publish reach the broker and resolve, instead of dropping the ones in flight."""
    from facefleet.amqp import ThreadedPublisher
    from facefleet.wire import EVENTS_EXCHANGE, EventPayload, utcnow

    client_for(env, monkeypatch).close()
    job_id = str(uuid.uuid4())
    conn = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
    ch = conn.channel()
    queue = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(queue, EVENTS_EXCHANGE, f"job.{job_id}.#")
    publisher = ThreadedPublisher(env.amqp_url, "test-publisher")
    publisher.start()
    futures = [
        publisher.publish_event(
            JobEvent(job_id=job_id, seq=n, type="progress", ts=utcnow(), payload=EventPayload())
        )
        for n in range(1, 201)
    ]
    publisher.close()
    assert all(f.done() and f.exception() is None for f in futures)
    seqs = []
    for _ in range(200):
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        seqs.append(JobEvent.decode(body).seq)
    conn.close()
    assert seqs == list(range(1, 201))  # all of them, in publish order


class CountingServer:
    """A loopback HTTP server that serves one body and counts the connections it accepts."""

    def __init__(self, body: bytes) -> None:
        import http.server
        import threading

        counter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def get_request(self):  # type: ignore[no-untyped-def]
                counter.connections += 1
                return super().get_request()

        self.connections = 0
        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    ("allow", "outcome", "code"),
    [
        pytest.param(None, "failed", "fetch_refused", id="loopback-refused-by-default"),
        pytest.param("127.0.0.1/32", "completed", None, id="loopback-allowed"),
    ],
)
def test_url_inputs_are_fetched_only_where_allowed(
    env: Env, monkeypatch: pytest.MonkeyPatch, allow: str | None, outcome: str, code: str | None
) -> None:
    """An http(s):// input goes through the SSRF guard: loopback is refused (and never
    connected to) unless FACEFLEET_FETCH_ALLOW lists it; the refusal is the job's own code."""
    server = CountingServer(b"\x89PNG\r\n\x1a\n" + b"x" * 100)
    try:
        client = client_for(env, monkeypatch)
        extra = {} if allow is None else {"FACEFLEET_FETCH_ALLOW": allow}
        env.start_worker(**extra)
        url = f"http://127.0.0.1:{server.port}/photo.png"
        job = client.submit(env.tier, media(env), url, options={"sleep_s": 0}).job_id
        events = wait_terminal(env, job)
        assert events[-1].type == outcome, events[-1]
        assert events[-1].payload.code == code
        assert server.connections == (0 if allow is None else 1)
    finally:
        server.close()
