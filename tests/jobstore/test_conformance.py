"""One suite for every job store backend: `file` (journals on tmp_path) and `postgres` (a real
PostgreSQL). Whatever the runner, the gateway and the CLI rely on is asserted here, on both.

Publishing goes to a fake (a list, or futures we resolve); the real broker path is in
tests/spine. Postgres tests share one database and are isolated by fresh job ids, except the
listing tests, which get an empty database (an empty data root on `file`).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from facefleet.jobstore import Claim, JobLog, JobStore, JobSummary
from facefleet.wire import EventPayload, EventType, JobEvent, JobRequest, queued_event, utcnow

BACKENDS = [
    pytest.param("file", id="file"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.integration),
]


@dataclass
class Backend:
    name: str
    url: str
    """What FACEFLEET_STORE_URL would say (a subprocess opens the store with it)."""
    opener: Callable[[], JobStore]
    opened: list[JobStore] = field(default_factory=list)

    def open(self) -> JobStore:
        """Another store instance on the same data (a second worker process, say)."""
        store = self.opener()
        self.opened.append(store)
        return store

    def close(self) -> None:
        for store in self.opened:
            store.close()


def _backend(name: str, request: pytest.FixtureRequest, root: Path, *, empty: bool) -> Backend:
    if name == "file":
        from facefleet.journal import FileJobStore
        from facefleet.storage import Storage

        return Backend(name, root.as_uri(), lambda: FileJobStore(Storage(root)))
    from facefleet.pgstore import PostgresJobStore

    url = request.getfixturevalue("fresh_pg_url")() if empty else request.getfixturevalue("pg_url")
    return Backend(name, url, lambda: PostgresJobStore(url, concurrency=4))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = _backend(request.param, request, tmp_path, empty=False)
    yield b
    b.close()


@pytest.fixture(params=BACKENDS)
def empty_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A backend with no jobs at all (a fresh database on postgres)."""
    b = _backend(request.param, request, tmp_path, empty=True)
    yield b
    b.close()


@pytest.fixture
def store(backend: Backend) -> JobStore:
    return backend.open()


def new_job() -> str:
    return str(uuid.uuid4())


def seqs(events: list[JobEvent]) -> list[tuple[int, str]]:
    return [(e.seq, e.type) for e in events]


def broken(_: JobEvent) -> None:
    raise ConnectionError("broker gone")


# --- the log: gapless, ordered, one queued, nothing after the end -----------------------------


@pytest.mark.parametrize("instances", ["one store, two threads", "two stores"])
def test_two_writers_share_one_gapless_sequence(backend: Backend, instances: str) -> None:
    job = new_job()
    first = backend.open()
    second = first if instances == "one store, two threads" else backend.open()
    published: list[JobEvent] = []
    logs = [first.log(job, fsync=False), second.log(job, fsync=False)]

    def write(log: JobLog) -> None:
        for _ in range(50):
            log.append("progress", EventPayload(fraction=0.1), published.append)

    threads = [threading.Thread(target=write, args=(log,)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # seq 1 is the producer's `queued`, recorded by the first writer; the stream is in order
    assert [e.seq for e in logs[0].events()] == list(range(1, 102))
    assert [e.seq for e in published] == list(range(1, 102))
    assert [e.type for e in logs[1].events()] == ["queued"] + ["progress"] * 100


def _request(job: str) -> JobRequest:
    return JobRequest(
        job_id=job,
        idempotency_key="k",
        tier="standard",
        created_at=utcnow() - timedelta(seconds=3),
        source_uri="file:///a.jpg",
        target_uri="file:///b.jpg",
        output_uri_prefix="file:///out/",
    )


@pytest.mark.parametrize(
    ("given", "first_type"),
    [
        pytest.param(True, "started", id="the producer's queued event"),
        pytest.param(False, "started", id="a bare queued event when none is given"),
        pytest.param(True, "queued", id="no second queued when the first event is queued"),
    ],
)
def test_the_first_writer_records_the_queued_event_once(
    store: JobStore, given: bool, first_type: EventType
) -> None:
    job = new_job()
    queued = queued_event(_request(job)) if given else None
    published: list[JobEvent] = []
    log = store.log(job, fsync=False, queued=queued)
    before = utcnow()
    log.append(first_type, None, published.append)
    assert published[0].seq == 1 and published[0].type == "queued"
    if first_type == "queued":
        assert seqs(published) == [(1, "queued")]
    elif queued is not None:
        assert published[0] == queued  # the very event the producer published: seq, ts, payload
        assert seqs(published) == [(1, "queued"), (2, "started")]
    else:
        assert published[0].ts >= before and published[0].payload == EventPayload()
    # a log that has events already gets no second `queued`, whichever object writes
    store.log(job, fsync=False, queued=queued).append("completed", None, published.append)
    types = [e.type for e in store.log(job).events()]
    assert types.count("queued") == 1 and types[-1] == "completed"
    assert [e.seq for e in store.log(job).events()] == list(range(1, len(types) + 1))


def test_events_are_read_back_as_written(store: JobStore) -> None:
    job = new_job()
    payload = EventPayload(fraction=0.25, stage="swap", eta_s=1e-7, frames_done=3, frames_total=12)
    written = store.log(job, fsync=False).append("progress", payload, lambda e: None)
    assert written is not None
    again = store.log(job).events()
    assert again[-1] == written
    assert again[-1].payload == payload
    assert store.log(job).terminal() is None
    assert store.log(new_job()).events() == []


@pytest.mark.parametrize("end", ["completed", "failed", "cancelled", "dead_lettered"])
def test_nothing_is_appended_after_a_terminal_event(store: JobStore, end: EventType) -> None:
    job = new_job()
    log = store.log(job, fsync=False)
    sink: list[JobEvent] = []
    assert log.append(end, None, sink.append) is not None
    assert log.append("completed", None, sink.append) is None
    assert log.append("failed", None, sink.append) is None
    assert store.log(job).append("progress", None, sink.append) is None
    log.lock()
    try:
        assert log.write("started", None, sink.append) is None
    finally:
        log.unlock()
    assert [e.type for e in store.log(job).events()] == ["queued", end]
    terminal = store.log(job).terminal()
    assert terminal is not None and terminal.type == end
    assert seqs(sink) == [(1, "queued"), (2, end)]


def test_writing_needs_the_job_lock(store: JobStore) -> None:
    with pytest.raises(AssertionError, match="job lock"):
        store.log(new_job()).write("started", None, lambda e: None)


def test_an_unlocked_reader_sees_other_writers_events(backend: Backend) -> None:
    job = new_job()
    reader = backend.open().log(job)
    assert reader.events() == []
    writer = backend.open().log(job, fsync=False)
    writer.append("started", None, lambda e: None)
    assert seqs(reader.events()) == [(1, "queued"), (2, "started")]
    writer.append("failed", EventPayload(code="corrupt_media"), lambda e: None)
    assert seqs(reader.events())[-1] == (3, "failed")
    assert reader.terminal() is not None


# --- the outbox -------------------------------------------------------------------------------


def test_an_event_whose_publish_failed_is_republished_by_the_next_writer(
    backend: Backend,
) -> None:
    job = new_job()
    with pytest.raises(ConnectionError):
        backend.open().log(job, fsync=False).append("started", None, broken)
    # durable before it was published: there it is
    assert seqs(backend.open().log(job).events()) == [(1, "queued"), (2, "started")]
    published: list[JobEvent] = []
    backend.open().log(job).append("completed", None, published.append)
    assert seqs(published) == [(1, "queued"), (2, "started"), (3, "completed")]


def test_a_confirmed_event_is_not_republished_by_the_next_writer(backend: Backend) -> None:
    job = new_job()
    first: list[JobEvent] = []
    backend.open().log(job, fsync=False).append("queued", None, first.append)
    later: list[JobEvent] = []
    backend.open().log(job, fsync=False).append("started", None, later.append)
    last: list[JobEvent] = []
    backend.open().log(job, fsync=False).append("completed", None, last.append)
    assert seqs(first) == [(1, "queued")]
    assert seqs(later) == [(2, "started")]
    assert seqs(last) == [(3, "completed")]


class Confirms:
    """A publisher whose confirms arrive when the test says (futures)."""

    def __init__(self) -> None:
        self.sent: list[JobEvent] = []
        self.futures: list[Future[None]] = []

    def __call__(self, event: JobEvent) -> Future[None]:
        self.sent.append(event)
        fut: Future[None] = Future()
        self.futures.append(fut)
        return fut

    def confirm_all(self) -> None:
        for fut in self.futures:
            if not fut.done():
                fut.set_result(None)


def test_a_nacked_publish_is_republished_once_by_settle(store: JobStore) -> None:
    job = new_job()
    confirms = Confirms()
    log = store.log(job, fsync=False)
    log.lock()
    try:
        log.write("started", None, confirms)
        store.sync([log])
        log.publish_written(confirms)
        confirms.futures[1].set_exception(ConnectionError("nack"))
        confirms.futures[0].set_result(None)
        threading.Timer(0.05, confirms.confirm_all).start()  # the republished one's confirm
        log.settle(confirms)
    finally:
        log.unlock()
    assert seqs(confirms.sent) == [(1, "queued"), (2, "started"), (2, "started")]
    nxt: list[JobEvent] = []
    store.log(job, fsync=False).append("completed", None, nxt.append)
    assert seqs(nxt) == [(3, "completed")]  # both were confirmed in the end


def test_wait_false_leaves_the_confirm_to_the_next_waiting_append(store: JobStore) -> None:
    job = new_job()
    confirms = Confirms()
    log = store.log(job, fsync=False)
    log.lock()
    try:
        event = log.append("progress", EventPayload(fraction=0.5), confirms, wait=False)
        assert event is not None and event.seq == 2
        assert all(not f.done() for f in confirms.futures)  # returned without the confirm
        waiter = threading.Thread(
            target=log.append, args=("progress", EventPayload(fraction=0.9), confirms)
        )
        waiter.start()
        time.sleep(0.2)
        assert waiter.is_alive()  # the waiting append waits for every earlier confirm
        confirms.confirm_all()
        deadline = time.monotonic() + 5
        while waiter.is_alive() and time.monotonic() < deadline:
            confirms.confirm_all()
            time.sleep(0.01)
        waiter.join(5)
        assert not waiter.is_alive()
    finally:
        log.unlock()
    assert seqs(confirms.sent) == [(1, "queued"), (2, "progress"), (3, "progress")]


# --- the batch lane ---------------------------------------------------------------------------


def test_a_batch_writes_under_held_locks_then_syncs_once_then_publishes(store: JobStore) -> None:
    """The batch lane's order: claim and lock each job in job-id order, write every job's
    event, one sync, publish in order, settle, unlock."""
    jobs = sorted(new_job() for _ in range(5))
    claims = [store.claim(job) for job in jobs]
    assert all(c.try_acquire() for c in claims)
    logs = [store.log(job) for job in jobs]
    published: list[JobEvent] = []
    try:
        for log, claim in zip(logs, claims, strict=True):
            log.lock(claim)
            assert log.write("started", None, published.append) is not None
        assert published == []  # nothing leaves before the sync
        store.sync(logs)
        for log in logs:
            log.publish_written(published.append)
            log.settle(published.append)
    finally:
        for log in logs:
            log.unlock()
        for claim in claims:
            claim.release()
    assert [(e.job_id, e.seq, e.type) for e in published] == [
        (j, seq, kind) for j in jobs for seq, kind in ((1, "queued"), (2, "started"))
    ]
    again: list[JobEvent] = []
    store.log(jobs[0], fsync=False).append("completed", None, again.append)
    assert seqs(again) == [(3, "completed")]
    assert seqs(store.log(jobs[1]).events()) == [(1, "queued"), (2, "started")]


def test_an_append_inside_a_batch_publishes_the_batchs_earlier_event_first(
    store: JobStore,
) -> None:
    """A job that appends (progress, failed) between the batch's write and its sync makes
    its `started` durable and publishes it first: the stream stays in seq order."""
    jobs = sorted(new_job() for _ in range(2))
    logs = [store.log(job) for job in jobs]
    published: list[JobEvent] = []
    try:
        for log in logs:
            log.lock()
            log.write("started", None, published.append)
        logs[0].append("failed", EventPayload(code="corrupt_media"), published.append)
        assert seqs(published) == [(1, "queued"), (2, "started"), (3, "failed")]
        store.sync(logs)
        for log in logs:
            log.publish_written(published.append)
            log.settle(published.append)
    finally:
        for log in logs:
            log.unlock()
    assert [(e.job_id, e.seq) for e in published] == [
        (jobs[0], 1),
        (jobs[0], 2),
        (jobs[0], 3),
        (jobs[1], 1),
        (jobs[1], 2),
    ]


def test_the_batch_operations_do_what_the_per_job_ones_do(backend: Backend) -> None:
    """acquire / lock / settle / unlock / release for a whole batch (postgres: one statement
    each): the same claims, locks, events and publish marks as job by job."""
    store, other = backend.open(), backend.open()
    jobs = [new_job() for _ in range(6)]
    taken_elsewhere = other.claim(jobs[2])
    assert taken_elsewhere.try_acquire()
    claims = [store.claim(job) for job in jobs]
    twin = store.claim(jobs[0])  # a second delivery of jobs[0] in the same batch
    assert store.acquire([*claims, twin]) == [True, True, False, True, True, True, False]
    mine = [c for c, job in zip(claims, jobs, strict=True) if job != jobs[2]]
    logs = [store.log(c.job_id) for c in mine]
    published: list[JobEvent] = []
    try:
        store.lock(logs, mine)
        for log in logs:
            assert log.write("started", None, published.append) is not None
        store.sync(logs)
        for log in logs:
            log.publish_written(published.append)
        store.settle(logs, published.append)
    finally:
        store.unlock(logs)
        store.release(mine)
    assert sorted((e.job_id, e.seq) for e in published) == sorted(
        (c.job_id, seq) for c in mine for seq in (1, 2)
    )
    again: list[JobEvent] = []  # the marks were recorded: nothing is published twice
    for c in mine:
        store.log(c.job_id).append("completed", None, again.append)
    assert sorted((e.job_id, e.seq) for e in again) == sorted((c.job_id, 3) for c in mine)
    # released: another store takes every claim; the one held elsewhere is still held
    assert other.acquire([other.claim(c.job_id) for c in mine]) == [True] * len(mine)
    assert store.acquire([store.claim(jobs[2])]) == [False]
    taken_elsewhere.release()


def test_a_batch_lock_waits_for_a_job_locked_elsewhere_without_holding_up_the_others(
    backend: Backend,
) -> None:
    """One job of the batch is locked by another process: the batch lock waits for it (and
    holds none of the jobs after it while it waits, so two batches never deadlock)."""
    jobs = sorted(new_job() for _ in range(3))
    holder = backend.open().log(jobs[1], fsync=False)
    holder.lock()
    store = backend.open()
    logs = [store.log(job, fsync=False) for job in jobs]
    done = threading.Event()

    def batch() -> None:
        store.lock(logs)
        done.set()

    thread = threading.Thread(target=batch)
    thread.start()
    try:
        assert not done.wait(0.3)
        late = backend.open().log(jobs[2], fsync=False)  # after the waited-for job: free
        late.append("progress", None, lambda e: None)
    finally:
        holder.unlock()
    thread.join(10)
    assert done.is_set()
    try:
        assert seqs(logs[2].events()) == [(1, "queued"), (2, "progress")]
        assert [log.events() for log in logs[:2]] == [[], []]
    finally:
        store.unlock(logs)


def test_a_second_lock_of_a_job_waits_for_the_first(backend: Backend) -> None:
    job = new_job()
    holder = backend.open().log(job, fsync=False)
    holder.lock()
    got = threading.Event()

    def other() -> None:
        log = backend.open().log(job, fsync=False)
        log.append("progress", None, lambda e: None)
        got.set()

    thread = threading.Thread(target=other)
    try:
        holder.write("started", None, lambda e: None)
        thread.start()
        assert not got.wait(0.3)
        backend.opened[0].sync([holder])
        holder.publish_written(lambda e: None)
        holder.settle(lambda e: None)
    finally:
        holder.unlock()
    thread.join(10)
    assert got.is_set()
    assert seqs(backend.open().log(job).events()) == [
        (1, "queued"),
        (2, "started"),
        (3, "progress"),
    ]


# --- claims -----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["same store", "another store"])
def test_a_live_claim_is_respected_and_a_released_one_is_taken_over(
    backend: Backend, where: str
) -> None:
    job = new_job()
    mine = backend.open()
    theirs = mine if where == "same store" else backend.open()
    first, second = mine.claim(job), theirs.claim(job)
    assert isinstance(first, Claim)
    assert first.try_acquire()
    assert first.try_acquire()  # held: still ours
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    first.release()  # a late release by the old holder must not free the new holder's claim
    assert not mine.claim(job).try_acquire()
    assert not backend.open().claim(job).try_acquire()
    second.release()
    assert backend.open().claim(job).try_acquire()


def test_claims_of_different_jobs_do_not_interfere(store: JobStore) -> None:
    claims = [store.claim(new_job()) for _ in range(8)]
    results: list[bool] = []
    threads = [threading.Thread(target=lambda c=c: results.append(c.try_acquire())) for c in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 8
    for c in claims:
        c.release()


_HOLDER = """\
import sys, time
from facefleet.stores import open_job_store
store = open_job_store(sys.argv[1])
assert store.claim(sys.argv[2]).try_acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_the_claim_of_a_killed_holder_is_free_at_once(backend: Backend) -> None:
    """kill -9: the kernel drops the dead process's lock (file) or its connection and so its
    session's advisory locks (postgres); no lease has to run out first."""
    job = new_job()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, backend.url, job], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        waiter = backend.open().claim(job)
        assert not waiter.try_acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        t0 = time.monotonic()
        while not waiter.try_acquire():
            assert time.monotonic() - t0 < 2.0, "the dead holder's claim was not dropped"
            time.sleep(0.01)
        waiter.release()
    finally:
        holder.kill()
        holder.wait(10)


# --- cancel markers ---------------------------------------------------------------------------


def test_an_unknown_job_has_no_cancel_marker(store: JobStore) -> None:
    assert store.cancel_reasons([new_job()]) == {}


def test_cancel_reasons_answers_for_several_jobs_at_once(store: JobStore) -> None:
    jobs = [new_job() for _ in range(4)]
    store.request_cancel(jobs[1], "one")
    store.request_cancel(jobs[3], "three")
    assert store.cancel_reasons(jobs) == {jobs[1]: "one", jobs[3]: "three"}
    assert store.cancel_reasons([]) == {}


def test_a_cancel_request_is_recorded(backend: Backend) -> None:
    job = new_job()
    backend.open().request_cancel(job, "user asked")
    assert backend.open().cancel_reasons([job]).get(job) == "user asked"
    # a job with only a cancel marker has no events and is not listed
    assert backend.open().log(job).events() == []
    assert backend.open().get_job(job) is None


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("file", id="file"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.integration),
    ],
    indirect=True,
)
def test_the_first_cancel_reason_wins(backend: Backend) -> None:
    job = new_job()
    backend.open().request_cancel(job, "first")
    backend.open().request_cancel(job, "second")
    assert backend.open().cancel_reasons([job]).get(job) == "first"


# --- listing ----------------------------------------------------------------------------------

T0 = datetime(2031, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


@dataclass(frozen=True)
class Spec:
    job_id: str
    created: datetime
    tier: str
    outcome: str
    """queued | running | completed | failed:<code>"""


def make_job(store: JobStore, spec: Spec) -> None:
    queued = JobEvent(
        job_id=spec.job_id,
        seq=1,
        type="queued",
        ts=spec.created,
        payload=EventPayload(tier=spec.tier),
    )
    log = store.log(spec.job_id, queued=queued, fsync=False)
    sink: Callable[[JobEvent], None] = lambda e: None  # noqa: E731
    if spec.outcome == "queued":
        log.append("retrying", EventPayload(delay_s=1.0), sink)  # still waiting to start
        return
    log.append("started", EventPayload(worker="w1"), sink)
    if spec.outcome == "completed":
        log.append("completed", None, sink)
    elif spec.outcome.startswith("failed:"):
        code = spec.outcome.split(":", 1)[1]
        log.append("failed", EventPayload(code=code, message="no"), sink)  # type: ignore[arg-type]


def specs() -> list[Spec]:
    """25 jobs: 4 states, 2 tiers, created a minute apart, with ties (several jobs per
    timestamp, so pages cut through a tie and job id decides)."""
    outcomes = [
        "queued",
        "running",
        "completed",
        "failed:corrupt_media",
        "failed:deadline_exceeded",
    ]
    rng = uuid.UUID(int=0x5EED)
    out = []
    for i in range(25):
        job = str(uuid.uuid5(rng, f"job-{i}"))
        out.append(
            Spec(
                job,
                T0 + timedelta(minutes=i // 3),
                "gold" if i % 4 == 0 else "standard",
                outcomes[i % len(outcomes)],
            )
        )
    return out


def expected(
    rows: list[Spec],
    *,
    state: str | None = None,
    tier: str | None = None,
    since: datetime | None = None,
) -> list[str]:
    keep = [
        r
        for r in rows
        if (state is None or r.outcome.split(":")[0] == state)
        and (tier is None or r.tier == tier)
        and (since is None or r.created >= since)
    ]
    keep.sort(key=lambda r: (-r.created.timestamp(), r.job_id))
    return [r.job_id for r in keep]


def walk(store: JobStore, limit: int, **filters: object) -> tuple[list[JobSummary], list[str]]:
    rows: list[JobSummary] = []
    cursors: list[str] = []
    cursor = None
    while True:
        page = store.list_jobs(limit=limit, cursor=cursor, **filters)  # type: ignore[arg-type]
        rows += page.jobs
        assert len(page.jobs) <= limit
        if page.cursor is None:
            return rows, cursors
        cursors.append(page.cursor)
        cursor = page.cursor


@pytest.fixture
def listed(empty_backend: Backend) -> tuple[JobStore, list[Spec]]:
    store = empty_backend.open()
    rows = specs()
    for spec in rows:
        make_job(store, spec)
    return store, rows


FILTERS = [
    pytest.param({}, id="all"),
    pytest.param({"state": "queued"}, id="queued"),
    pytest.param({"state": "running"}, id="running"),
    pytest.param({"state": "completed"}, id="completed"),
    pytest.param({"state": "failed"}, id="failed"),
    pytest.param({"tier": "gold"}, id="tier"),
    pytest.param({"since": T0 + timedelta(minutes=4)}, id="since (inclusive)"),
    pytest.param({"state": "failed", "tier": "standard"}, id="state and tier"),
    pytest.param({"state": "cancelled"}, id="no match"),
]


@pytest.mark.parametrize("filters", FILTERS)
@pytest.mark.parametrize("limit", [1, 4, 1000])
def test_list_jobs_filters_orders_and_pages(
    listed: tuple[JobStore, list[Spec]], filters: dict[str, object], limit: int
) -> None:
    store, rows = listed
    got, cursors = walk(store, limit, **filters)
    want = expected(rows, **filters)  # type: ignore[arg-type]
    assert [r.job_id for r in got] == want
    assert len(cursors) == max(0, (len(want) - 1) // limit)


def test_list_jobs_summarizes_each_job(listed: tuple[JobStore, list[Spec]]) -> None:
    store, rows = listed
    by_id = {r.job_id: r for r in walk(store, 1000)[0]}
    assert len(by_id) == 25
    for spec in rows:
        row = by_id[spec.job_id]
        state, _, code = spec.outcome.partition(":")
        assert row.state == state
        assert row.tier == spec.tier
        assert row.created_at == spec.created
        assert row.error_code == (code or None)
        assert (row.finished_at is not None) == (state in ("completed", "failed"))
        assert row.last_seq == {"queued": 2, "running": 2}.get(state, 3)
        assert store.get_job(spec.job_id) == row
    assert store.get_job(new_job()) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"cursor": "not a cursor!"}, "bad cursor", id="bad cursor"),
        pytest.param({"cursor": "%%%%"}, "bad cursor", id="not base64"),
        pytest.param({"limit": 0}, "limit", id="limit 0"),
        pytest.param({"limit": 1001}, "limit", id="limit over 1000"),
    ],
)
def test_list_jobs_refuses_bad_arguments(
    store: JobStore, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        store.list_jobs(**kwargs)  # type: ignore[arg-type]


def test_a_job_moves_through_its_states(store: JobStore) -> None:
    job = new_job()
    request = _request(job)
    log = store.log(job, fsync=False, queued=queued_event(request))
    assert store.get_job(job) is None
    sink: Callable[[JobEvent], None] = lambda e: None  # noqa: E731
    log.append("started", None, sink)
    row = store.get_job(job)
    assert row is not None and (row.state, row.tier, row.last_seq) == ("running", "standard", 2)
    log.append("progress", EventPayload(fraction=0.5), sink)
    log.append("retrying", EventPayload(attempt=2, delay_s=1.0), sink)
    row = store.get_job(job)
    assert row is not None and (row.state, row.finished_at, row.last_seq) == ("running", None, 4)
    end = log.append("failed", EventPayload(code="no_face_in_source"), sink)
    row = store.get_job(job)
    assert end is not None and row is not None
    assert (row.state, row.error_code, row.finished_at) == ("failed", "no_face_in_source", end.ts)
    assert row.created_at == request.created_at


@pytest.mark.integration
def test_both_backends_give_identical_pages(
    tmp_path: Path, fresh_pg_url: Callable[[bool], str]
) -> None:
    """The same events in both backends: the same rows, in the same order, cut into the same
    pages with the same cursors (and either backend's cursor works on the other)."""
    from facefleet.journal import FileJobStore
    from facefleet.pgstore import PostgresJobStore
    from facefleet.storage import Storage

    file_store = FileJobStore(Storage(tmp_path))
    pg_store = PostgresJobStore(fresh_pg_url(True))
    try:
        for spec in specs():
            make_job(file_store, spec)
            make_job(pg_store, spec)

        def comparable(rows: list[JobSummary]) -> list[tuple[object, ...]]:
            # finished_at is the terminal event's own time, which differs between the two runs
            return [
                (r.job_id, r.state, r.tier, r.created_at, r.error_code, r.last_seq) for r in rows
            ]

        for param in FILTERS:
            filters = param.values[0]
            for limit in (1, 2, 7):
                a_rows, a_cursors = walk(file_store, limit, **filters)  # type: ignore[arg-type]
                b_rows, b_cursors = walk(pg_store, limit, **filters)  # type: ignore[arg-type]
                assert comparable(a_rows) == comparable(b_rows), (filters, limit)
                assert a_cursors == b_cursors, (filters, limit)
                for cursor in a_cursors:
                    a = file_store.list_jobs(limit=limit, cursor=cursor, **filters)  # type: ignore[arg-type]
                    b = pg_store.list_jobs(limit=limit, cursor=cursor, **filters)  # type: ignore[arg-type]
                    assert comparable(a.jobs) == comparable(b.jobs)
                    assert a.cursor == b.cursor
    finally:
        pg_store.close()
        file_store.close()
