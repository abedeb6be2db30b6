"""Replaying a dead letter (`facefleet dead replay`), as the job store sees it, on both backends:
`replayed` may follow `dead_lettered` and nothing else ends-then-reopens; after it the job is
open again (terminal(), summary, listing) and its attempts count afresh. The runner's side
(the attempt budget, stale broker dead letters) runs on a fake publisher, like
tests/unit/test_runner.py; the CLI and a real worker are in tests/spine/test_dead.py.
"""

# ruff: noqa: F811 - the conformance suite's fixtures are imported, and tests take them by name

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pytest

from facefleet.consumer.delivery import Delivery
from facefleet.consumer.metrics import WorkerMetrics
from facefleet.consumer.processors.sleep import SleepProcessor
from facefleet.consumer.runner import JobRunner
from facefleet.jobstore import (
    REPLAY_HEADER,
    JobStore,
    ReplayRefused,
    attempts_since_replay,
    ended,
    last_replay_seq,
    may_write,
    replay_generation,
    replay_refusal,
)
from facefleet.settings import WorkerSettings
from facefleet.storage import Storage
from facefleet.wire import (
    EventPayload,
    EventType,
    JobEvent,
    JobRequest,
    TierSpec,
    job_id_for_key,
    queued_event,
    utcnow,
)
from tests.jobstore.test_conformance import (  # noqa: F401 - fixtures
    Backend,
    backend,
    empty_backend,
    new_job,
    seqs,
    store,
)

sink: Callable[[JobEvent], None] = lambda e: None  # noqa: E731


def dead_job(store: JobStore, *, retries: int = 1) -> str:
    """queued, started, retrying x retries, dead_lettered (a job whose budget ran out)."""
    job = new_job()
    log = store.log(job, fsync=False, queued=_queued(job))
    log.append("started", EventPayload(worker="w1", attempt=1), sink)
    for n in range(retries):
        log.append("retrying", EventPayload(attempt=n + 1, delay_s=0.1), sink)
    message = f"gave up after {retries + 1} attempts: boom"
    log.append("dead_lettered", EventPayload(code="internal_error", message=message), sink)
    return job


def _queued(job: str) -> JobEvent:
    return JobEvent(
        job_id=job, seq=1, type="queued", ts=utcnow(), payload=EventPayload(tier="standard")
    )


# --- the log ----------------------------------------------------------------------------------


def test_a_replay_reopens_a_dead_lettered_job(backend: Backend) -> None:
    store = backend.open()
    job = dead_job(store)
    row = store.get_job(job)
    assert row is not None and (row.state, row.error_code) == ("dead_lettered", "internal_error")
    published: list[JobEvent] = []
    event = store.log(job).replay("cli:ops@host", published.append)
    assert (event.seq, event.type, event.payload.replayed_by) == (5, "replayed", "cli:ops@host")
    assert seqs(published) == [(5, "replayed")]  # durable, then published and confirmed
    # Another process sees an open job, waiting for a worker as when it was submitted.
    other = backend.open()
    log = other.log(job)
    assert log.terminal() is None
    row = other.get_job(job)
    assert row is not None
    assert (row.state, row.finished_at, row.error_code, row.last_seq) == ("queued", None, None, 5)
    assert job not in {r.job_id for r in other.list_jobs(state="dead_lettered", limit=1000).jobs}
    assert job in {r.job_id for r in other.list_jobs(state="queued", limit=1000).jobs}
    # ...and takes events again: the run after the replay, to its end
    log.append("started", EventPayload(worker="w2", attempt=1), published.append)
    row = other.get_job(job)
    assert row is not None and row.state == "running"
    end = log.append("completed", None, published.append)
    assert end is not None
    assert seqs(other.log(job).events()) == [
        (1, "queued"),
        (2, "started"),
        (3, "retrying"),
        (4, "dead_lettered"),
        (5, "replayed"),
        (6, "started"),
        (7, "completed"),
    ]
    terminal = backend.open().log(job).terminal()
    assert terminal is not None and terminal.type == "completed"
    row = backend.open().get_job(job)
    assert row is not None and (row.state, row.finished_at) == ("completed", end.ts)
    # and then nothing: a completed job is never replayed
    with pytest.raises(ReplayRefused, match="completed"):
        backend.open().log(job).replay("cli:ops@host", sink)


@pytest.mark.parametrize(
    ("events", "state"),
    [
        pytest.param(["completed"], "completed", id="completed"),
        pytest.param(["failed"], "failed", id="failed"),
        pytest.param(["cancelled"], "cancelled", id="cancelled"),
        pytest.param(["started"], "running", id="running"),
        pytest.param(["started", "retrying"], "running", id="retrying"),
        pytest.param(["queued"], "queued", id="queued"),
        pytest.param([], "unknown", id="no such job"),
    ],
)
def test_a_replay_is_refused_unless_the_job_was_dead_lettered(
    store: JobStore, events: list[EventType], state: str
) -> None:
    job = new_job()
    log = store.log(job, fsync=False)
    for kind in events:
        log.append(kind, EventPayload(code="invalid_request") if kind == "failed" else None, sink)
    before = seqs(store.log(job).events())
    published: list[JobEvent] = []
    with pytest.raises(ReplayRefused) as refused:
        store.log(job).replay("cli:ops@host", published.append)
    assert refused.value.state == state and refused.value.job_id == job
    assert (job in str(refused.value)) and (state in str(refused.value) or state == "unknown")
    assert published == [] and seqs(store.log(job).events()) == before
    # a plain append of `replayed` is refused alike (nothing written)
    assert store.log(job).append("replayed", None, published.append) is None
    assert seqs(store.log(job).events()) == before


def test_only_replayed_follows_dead_lettered(store: JobStore) -> None:
    job = dead_job(store)
    for kind in ("started", "progress", "retrying", "completed", "failed", "dead_lettered"):
        assert store.log(job).append(kind, None, sink) is None, kind  # type: ignore[arg-type]
    log = store.log(job)
    log.lock()
    try:
        assert log.write("started", None, sink) is None
        assert log.write("replayed", EventPayload(replayed_by="x"), sink) is not None
        assert log.write("started", None, sink) is not None  # open again, in the same batch
        store.sync([log])
        log.publish_written(sink)
        log.settle(sink)
    finally:
        log.unlock()
    assert [e.type for e in store.log(job).events()][-3:] == [
        "dead_lettered",
        "replayed",
        "started",
    ]


def test_a_replay_that_never_started_may_be_replayed_again(backend: Backend) -> None:
    """The CLI records `replayed` before it publishes the job: if it died in between, the log
    ends in `replayed` and no copy exists, so replaying again must work. (If the copy did go
    out, the second one is a harmless duplicate: a job runs once.) Once a worker started the
    job, it is running and a replay is refused."""
    store = backend.open()
    job = dead_job(store)
    first = store.log(job).replay("cli:a@h", sink)
    again = backend.open().log(job).replay("cli:b@h", sink)
    assert (first.seq, again.seq) == (5, 6)
    assert backend.open().log(job).terminal() is None
    backend.open().log(job).append("started", None, sink)
    with pytest.raises(ReplayRefused, match="running"):
        backend.open().log(job).replay("cli:c@h", sink)


def test_a_replayed_job_may_dead_letter_and_be_replayed_again(backend: Backend) -> None:
    store = backend.open()
    job = dead_job(store, retries=2)
    store.log(job).replay("cli:ops@h", sink)
    log = backend.open().log(job)
    log.append("started", None, sink)
    log.append("retrying", EventPayload(attempt=1), sink)
    log.append("dead_lettered", EventPayload(code="storage_error", message="again"), sink)
    row = backend.open().get_job(job)
    assert row is not None and (row.state, row.error_code) == ("dead_lettered", "storage_error")
    terminal = backend.open().log(job).terminal()
    assert terminal is not None and terminal.payload.message == "again"
    assert backend.open().log(job).append("started", None, sink) is None
    second = backend.open().log(job).replay("cli:ops@h", sink)
    events = backend.open().log(job).events()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert last_replay_seq(events) == second.seq == 10
    assert attempts_since_replay(events) == 0


def test_the_replay_is_published_after_earlier_unconfirmed_events(backend: Backend) -> None:
    """The log is an outbox: a `dead_lettered` whose publish failed goes out again, first."""
    store = backend.open()
    job = new_job()
    log = store.log(job, fsync=False)
    log.append("started", None, sink)

    def broken(_: JobEvent) -> None:
        raise ConnectionError("broker gone")

    with pytest.raises(ConnectionError):
        log.append("dead_lettered", EventPayload(code="internal_error"), broken)
    published: list[JobEvent] = []
    backend.open().log(job).replay("cli:ops@h", published.append)
    assert seqs(published) == [(3, "dead_lettered"), (4, "replayed")]


def test_a_replay_in_a_listing(empty_backend: Backend) -> None:
    """The summary row goes back to `queued` in both backends (postgres: the jobs row itself),
    and returns to `dead_lettered` with the new code when the replayed run dead-letters."""
    store = empty_backend.open()
    jobs = sorted(dead_job(store) for _ in range(3))
    store.log(jobs[0]).replay("cli:ops@h", sink)
    dead = {r.job_id for r in store.list_jobs(state="dead_lettered").jobs}
    queued = {r.job_id for r in store.list_jobs(state="queued").jobs}
    assert (dead, queued) == (set(jobs[1:]), {jobs[0]})


# --- the rules as functions (what both backends call) ----------------------------------------


def _events(*types: EventType) -> list[JobEvent]:
    job = new_job()
    return [JobEvent(job_id=job, seq=i, type=t, ts=utcnow()) for i, t in enumerate(types, 1)]


def test_the_rules() -> None:
    dead = _events("queued", "started", "retrying", "dead_lettered")
    end = ended(dead)
    assert end is not None and end.type == "dead_lettered"
    assert replay_refusal(dead) is None and may_write(dead, "replayed")
    assert not may_write(dead, "started")
    reopened = _events("queued", "started", "dead_lettered", "replayed", "started", "retrying")
    assert ended(reopened) is None and may_write(reopened, "progress")
    assert replay_refusal(reopened) == "running" and not may_write(reopened, "replayed")
    assert attempts_since_replay(reopened) == 1 and attempts_since_replay(dead) == 1
    assert last_replay_seq(reopened) == 4 and last_replay_seq(dead) == 0
    for kind in ("completed", "failed", "cancelled"):
        done = _events("queued", "started", kind)  # type: ignore[arg-type]
        assert replay_refusal(done) == kind and not may_write(done, "replayed")
    assert replay_refusal([]) == "unknown"
    assert replay_generation(None) == 0
    assert replay_generation({REPLAY_HEADER: 7}) == 7
    assert replay_generation({REPLAY_HEADER: b"7"}) == 7
    assert replay_generation({REPLAY_HEADER: "x"}) == 0


# --- the runner: a fresh attempt budget, stale broker dead letters ----------------------------


class FakePublisher:
    """Records; never sends (the real broker path is in tests/spine/test_dead.py)."""

    def __init__(self) -> None:
        self.sent: list[JobEvent] = []
        self.published: list[tuple[str, str, bytes, pika.BasicProperties]] = []

    def publish_event(self, event: JobEvent) -> None:
        self.sent.append(event)

    def burst(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties
    ) -> None:
        self.published.append((exchange, routing_key, body, properties))


def make_runner(tmp_path: Path, store: JobStore, max_attempts: int) -> JobRunner:
    return JobRunner(
        WorkerSettings(
            data_root=tmp_path, retry_base_s=0.01, retry_max_s=0.01, max_attempts=max_attempts
        ),
        TierSpec("standard", max_job_s=60),
        SleepProcessor(),
        Storage(tmp_path),
        WorkerMetrics(),
        FakePublisher(),  # type: ignore[arg-type]
        "test-worker",
        store=store,
    )


def delivery_for(
    runner: JobRunner, headers: dict[str, Any] | None = None, **options: Any
) -> tuple[JobRequest, Delivery]:
    media = runner.storage.root / "in.txt"
    media.write_text("x")
    uri = runner.storage.uri(media)
    key = uuid.uuid4().hex
    job = JobRequest(
        job_id=job_id_for_key(key),
        idempotency_key=key,
        tier=runner.tier.name,
        created_at=utcnow(),
        source_uri=uri,
        target_uri=uri,
        output_uri_prefix=runner.storage.default_output_prefix(),
        options={"sleep_s": 0, "steps": 1, **options},
    )
    props = pika.BasicProperties(message_id=job.job_id, headers=headers or {})
    return job, Delivery(1, job.encode(), props, redelivered=False)


def types(events: list[JobEvent]) -> list[str]:
    return [e.type for e in events if e.type != "progress"]


def test_a_replayed_job_gets_a_fresh_attempt_budget(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    runner = make_runner(tmp_path, store, max_attempts=2)
    job, delivery = delivery_for(runner, fail="transient")
    assert runner.handle(delivery) == "ack"
    events = store.log(job.job_id).events()
    assert types(events) == ["queued", "started", "retrying", "dead_lettered"]
    assert events[0] == queued_event(job)
    store.log(job.job_id).replay("cli:ops@h", sink)
    # the replayed copy: two attempts again (not one: the first round's `retrying` is spent)
    assert runner.handle(delivery) == "ack"
    events = store.log(job.job_id).events()
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
    started = [e for e in events if e.type == "started"]
    assert [e.payload.attempt for e in started] == [1, 1]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


def test_a_stale_broker_dead_letter_does_not_end_a_replayed_job(
    backend: Backend, tmp_path: Path
) -> None:
    """The broker dead-lettered the job (delivery limit) and a worker recorded it; the job was
    replayed. The same notification coming again (redelivered after a worker died before its
    ack) carries no replay seq: it is older than the replay and is ignored. A dead letter of
    the replayed copy (it carries the seq) is recorded."""
    store = backend.open()
    runner = make_runner(tmp_path, store, max_attempts=3)
    job, _ = delivery_for(runner)
    death = {"x-first-death-reason": "delivery_limit"}
    task = runner.broker_dead_letter(death, job.encode())
    assert task is not None
    task()
    assert types(store.log(job.job_id).events()) == ["queued", "dead_lettered"]
    replayed = store.log(job.job_id).replay("cli:ops@h", sink)
    again = runner.broker_dead_letter(death, job.encode())
    assert again is not None
    again()
    assert types(store.log(job.job_id).events()) == ["queued", "dead_lettered", "replayed"]
    assert store.log(job.job_id).terminal() is None
    fresh = runner.broker_dead_letter({**death, REPLAY_HEADER: replayed.seq}, job.encode())
    assert fresh is not None
    fresh()
    events = store.log(job.job_id).events()
    assert types(events) == ["queued", "dead_lettered", "replayed", "dead_lettered"]
    assert events[-1].payload.code == "delivery_limit"
