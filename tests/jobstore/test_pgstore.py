"""What only the PostgreSQL backend has: start-up checks, migrations, one transaction per
sync, renumbering, claims lost with their session. A real server (tests/pg.py), no mocks."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from facefleet.jobstore import JobStore, StoreError
from facefleet.pgstore import (
    _MARK_MANY,
    _REFRESH_MANY,
    PostgresClaim,
    PostgresJobStore,
    _array,
    _migration,
    latest_version,
    migrate,
    migrations,
    redact,
)
from facefleet.wire import EventPayload, JobEvent, utcnow
from tests.pg import terminate_holder_of_claim

pytestmark = pytest.mark.integration


@pytest.fixture
def stores(pg_url: str) -> Iterator[Callable[[], PostgresJobStore]]:
    opened: list[PostgresJobStore] = []

    def open_store() -> PostgresJobStore:
        store = PostgresJobStore(pg_url)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


def new_job() -> str:
    return str(uuid.uuid4())


def seqs(events: list[JobEvent]) -> list[tuple[int, str]]:
    return [(e.seq, e.type) for e in events]


def nothing(_: JobEvent) -> None:
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- start-up ---------------------------------------------------------------------------------


def test_an_unreachable_server_is_named_without_the_password() -> None:
    port = free_port()
    url = f"postgresql://facefleet:s3cret-pw@127.0.0.1:{port}/jobs"
    t0 = time.monotonic()
    with pytest.raises(StoreError) as err:
        PostgresJobStore(url, connect_timeout_s=2)
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message
    assert "s3cret-pw" not in message
    assert "refused" in message.lower()  # the cause
    assert time.monotonic() - t0 < 10
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}") as err:
        migrate(url, connect_timeout_s=2)
    assert "s3cret-pw" not in str(err.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h:5433/db", "postgresql://u:***@h:5433/db"),
        (
            "postgresql://u@h/db?password=pw&sslmode=require",
            "postgresql://u@h/db?password=%2A%2A%2A&sslmode=require",
        ),
        ("postgres://h/db", "postgres://h/db"),
    ],
)
def test_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_a_bad_url_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="bad job store URL"):
        PostgresJobStore("postgresql://h/db?nosuchoption=1")


def test_an_empty_database_says_to_migrate(fresh_pg_url: Callable[[bool], str]) -> None:
    with pytest.raises(StoreError) as err:
        PostgresJobStore(fresh_pg_url(False))
    assert str(err.value) == (
        f"job store schema at version 0, this build needs {latest_version()}: "
        "run `facefleet store migrate`"
    )


def test_a_schema_ahead_of_the_build_is_refused(fresh_pg_url: Callable[[bool], str]) -> None:
    url = fresh_pg_url(True)
    ahead = latest_version() + 1
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, 'from_the_future')",
            (ahead,),
        )
    with pytest.raises(StoreError, match=f"version {ahead}.*older than the schema"):
        PostgresJobStore(url)


@pytest.mark.parametrize(
    ("compatible_from", "starts"),
    [
        pytest.param(None, False, id="recorded by a migrator without markers: strict"),
        pytest.param("ahead", False, id="needs builds of its own version"),
        pytest.param("latest", True, id="runs with this build"),
        pytest.param(1, True, id="runs with any build"),
    ],
)
def test_a_schema_ahead_runs_with_the_builds_its_migrations_allow(
    fresh_pg_url: Callable[[bool], str], compatible_from: int | str | None, starts: bool
) -> None:
    """A rolling upgrade: the pre-upgrade hook migrated, and pods of the release before start
    (a restart, a scale-up) while the rollout runs."""
    url = fresh_pg_url(True)
    ahead = latest_version() + 1
    marker = {"ahead": ahead, "latest": latest_version()}.get(
        compatible_from if isinstance(compatible_from, str) else "", compatible_from
    )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, compatible_from) "
            "VALUES (%s, 'from_the_future', %s)",
            (ahead, marker),
        )
    if starts:
        PostgresJobStore(url).close()
        return
    with pytest.raises(StoreError, match=f"version {ahead}, .* needs? builds of version {ahead}"):
        PostgresJobStore(url)


def test_a_schema_table_from_before_the_markers_is_read_strictly_and_upgraded(
    fresh_pg_url: Callable[[bool], str],
) -> None:
    url = fresh_pg_url(True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE schema_migrations DROP COLUMN compatible_from")
        conn.execute("DELETE FROM schema_migrations WHERE version = %s", (latest_version(),))
        conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, 'from_the_future')",
            (latest_version() + 1,),
        )
    with pytest.raises(StoreError, match="older than the schema"):
        PostgresJobStore(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE version > %s", (latest_version() - 1,))
    assert migrate(url) == [migrations()[-1].name]
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT compatible_from FROM schema_migrations WHERE version = %s",
            (latest_version(),),
        ).fetchone()
    assert row == (migrations()[-1].compatible_from,)


@pytest.mark.parametrize(
    ("sql", "compatible_from", "error"),
    [
        pytest.param("DROP INDEX x;", 3, None, id="no marker: its own version"),
        pytest.param("-- facefleet-compatible-from: 2\nDROP INDEX x;", 2, None, id="marked"),
        pytest.param("-- facefleet-compatible-from: 4\n", None, "must lie in 1..3", id="later"),
        pytest.param("-- facefleet-compatible-from: 0\n", None, "must lie in 1..3", id="zero"),
    ],
)
def test_a_migration_says_which_builds_run_on_it(
    sql: str, compatible_from: int | None, error: str | None
) -> None:
    if error is not None:
        with pytest.raises(StoreError, match=error):
            _migration(3, "0003_x", sql)
        return
    assert _migration(3, "0003_x", sql).compatible_from == compatible_from


def test_the_store_url_hides_the_password(pg_url: str) -> None:
    with_password = pg_url.replace("postgres@", "postgres:hunter2@")  # trust auth ignores it
    with PostgresJobStore(with_password) as store:
        assert "hunter2" not in store.url
        assert store.url == pg_url.replace("postgres@", "postgres:***@")
        assert store.get_job(new_job()) is None


def test_sessions_carry_the_timeouts_and_keepalives(pg_url: str) -> None:
    with PostgresJobStore(pg_url, statement_timeout_s=7, keepalives_idle_s=11) as store:
        with store._pool.connection() as conn:
            show = {
                name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                for name in ("statement_timeout", "TimeZone", "tcp_keepalives_idle")
            }
        assert show == {"statement_timeout": "7s", "TimeZone": "UTC", "tcp_keepalives_idle": "11"}
        session = store._session
        assert session.call("SHOW idle_session_timeout", ())[0] == "0"
        assert session.call("SHOW tcp_keepalives_count", ())[0] == "3"
        assert session.call("SHOW tcp_keepalives_interval", ())[0] == "5"


def test_a_server_idle_timeout_ends_neither_claims_nor_statements(
    fresh_pg_url: Callable[[bool], str],
) -> None:
    """The claims session is idle between claims by design: it opts out of a server-wide
    idle_session_timeout; pooled connections the server ended are replaced unnoticed."""
    url = fresh_pg_url(True)
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} SET idle_session_timeout = '300ms'")
    with PostgresJobStore(url) as store, PostgresJobStore(url) as other:
        job = new_job()
        claim = store.claim(job)
        assert claim.try_acquire()
        time.sleep(1.0)
        assert store.check_claims() == []
        assert not other.claim(job).try_acquire()
        assert store.log(job, fsync=False).append("started", None, nothing) is not None
        assert store.get_job(job) is not None
        claim.release()


# --- migrations -------------------------------------------------------------------------------


def test_migrate_applies_each_file_once(fresh_pg_url: Callable[[bool], str]) -> None:
    url = fresh_pg_url(False)
    names = [m.name for m in migrations()]
    assert names[0] == "0001_init"
    assert migrate(url) == names
    assert migrate(url) == []
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT version, name, compatible_from FROM schema_migrations ORDER BY 1"
        ).fetchall()
    assert rows == [(m.version, m.name, m.compatible_from) for m in migrations()]
    PostgresJobStore(url).close()


def test_concurrent_migrators_apply_each_file_once(fresh_pg_url: Callable[[bool], str]) -> None:
    url = fresh_pg_url(False)
    start = threading.Barrier(4)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        start.wait()
        try:
            results.append(migrate(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(name for r in results for name in r) == [m.name for m in migrations()]
    PostgresJobStore(url).close()


# --- sync -------------------------------------------------------------------------------------


def test_a_batch_sync_is_one_transaction(stores: Callable[[], PostgresJobStore]) -> None:
    store = stores()
    jobs = sorted(new_job() for _ in range(6))
    logs = [store.log(job) for job in jobs]
    for log in logs:
        log.lock()
    try:
        for log in logs:
            log.write("started", EventPayload(worker="w"), nothing)
        store.sync(logs)
    finally:
        for log in logs:
            log.unlock()
    ids = [uuid.UUID(j) for j in jobs]
    with psycopg.connect(store._params.url) as conn:
        events = conn.execute(
            "SELECT DISTINCT xmin::text FROM job_events WHERE job_id = ANY(%s)", (ids,)
        ).fetchall()
        rows = conn.execute(
            "SELECT DISTINCT xmin::text FROM jobs WHERE job_id = ANY(%s)", (ids,)
        ).fetchall()
        count = conn.execute(
            "SELECT count(*) FROM job_events WHERE job_id = ANY(%s)", (ids,)
        ).fetchone()
    assert count == (12,)
    assert len(events) == 1  # every event and every summary row: one transaction
    assert rows == events


def test_a_row_created_while_a_sync_waits_is_taken_as_an_existing_one(
    stores: Callable[[], PostgresJobStore], pg_url: str
) -> None:
    """The gateway's record_submitted creates a job's row after a worker's sync found none: the
    sync's insert waits for it, finds the row, and plans again on it (its own `queued` dropped,
    its event after the recorded one), as for a row that was there all along."""
    store = stores()
    job = new_job()
    log = store.log(job)
    failed: list[BaseException] = []

    def sync() -> None:
        try:
            store.sync([log])
        except BaseException as exc:
            failed.append(exc)

    log.lock()
    try:
        log.write("started", None, nothing)
        with psycopg.connect(pg_url) as gateway, psycopg.connect(pg_url, autocommit=True) as look:
            gateway.execute(
                "INSERT INTO jobs (job_id, state, last_seq) VALUES (%s, 'queued', 1)",
                (uuid.UUID(job),),
            )
            gateway.execute(
                "INSERT INTO job_events (job_id, seq, type, ts, body, published) "
                "VALUES (%s, 1, 'queued', now(), %s, true)",
                (
                    uuid.UUID(job),
                    JobEvent(job_id=job, seq=1, type="queued", ts=utcnow()).encode().decode(),
                ),
            )
            syncing = threading.Thread(target=sync)
            syncing.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                row = look.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                ).fetchone()
                if row and row[0]:
                    break
                time.sleep(0.01)
            else:
                pytest.fail("the sync never waited for the uncommitted row")
            gateway.commit()
            syncing.join(10)
    finally:
        log.unlock()
    assert failed == []
    assert seqs(stores().log(job).events()) == [(1, "queued"), (2, "started")]
    row = stores().get_job(job)
    assert row is not None and (row.state, row.last_seq) == ("running", 2)


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param(_REFRESH_MANY, id="loading a batch's logs under their locks"),
        pytest.param(_MARK_MANY, id="marking a batch's events published"),
    ],
)
def test_a_batch_looks_its_events_up_by_job(fresh_pg_url: Callable[[bool], str], sql: str) -> None:
    """A young job_events table (thousands of rows, no statistics yet: too few for the planner
    to prefer the primary key on its own) is not read whole for a batch's statement."""
    url = fresh_pg_url(True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO jobs (job_id) SELECT gen_random_uuid() FROM generate_series(1, 4000)"
        )
        conn.execute(
            "INSERT INTO job_events SELECT job_id, s, 'progress', now(), '{}'::jsonb, s = 1 "
            "FROM jobs, generate_series(1, 3) AS s"
        )
        ids = [uuid.uuid4() for _ in range(32)]
        row = conn.execute(
            "EXPLAIN (FORMAT JSON) " + sql, (_array(ids), _array([3] * len(ids)))
        ).fetchone()
    assert row is not None
    scans: list[tuple[str, str]] = []
    todo = [row[0][0]["Plan"]]
    while todo:
        node = todo.pop()
        scans.append((node["Node Type"], node.get("Relation Name", "")))
        todo.extend(node.get("Plans", []))
    assert ("Seq Scan", "job_events") not in scans, scans
    assert any(name == "job_events" for _, name in scans), scans


def test_a_failed_sync_writes_nothing(stores: Callable[[], PostgresJobStore]) -> None:
    store = stores()
    jobs = sorted(new_job() for _ in range(3))
    for job in jobs:
        store.log(job, fsync=False).append("started", None, nothing)
    # someone wrote seq 3 of the last job behind the store's back: its insert will collide
    with psycopg.connect(store._params.url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO job_events (job_id, seq, type, ts, body, published) "
            "VALUES (%s, 3, 'progress', now(), %s, true)",
            (
                uuid.UUID(jobs[-1]),
                JobEvent(job_id=jobs[-1], seq=3, type="progress", ts=utcnow()).encode().decode(),
            ),
        )
    logs = [store.log(job) for job in jobs]
    published: list[JobEvent] = []
    try:
        for log in logs:
            log.lock()
            log.write("progress", None, published.append)
        with pytest.raises(psycopg.errors.UniqueViolation):
            store.sync(logs)
    finally:
        for log in logs:
            log.unlock()
    assert published == []
    for job in jobs[:-1]:
        assert seqs(store.log(job).events()) == [(1, "queued"), (2, "started")]


def test_publishing_without_a_sync_stores_the_events_first(
    stores: Callable[[], PostgresJobStore],
) -> None:
    """A caller that skips sync (fsync off) still gets its events stored before they are
    published (a journal's written line is in the file already)."""
    store = stores()
    job = new_job()
    log = store.log(job, fsync=False)
    published: list[JobEvent] = []
    log.lock()
    try:
        log.write("started", None, published.append)
        log.publish_written(published.append)
        log.settle(published.append)
    finally:
        log.unlock()
    assert seqs(published) == [(1, "queued"), (2, "started")]
    assert seqs(stores().log(job).events()) == [(1, "queued"), (2, "started")]


def test_unlock_drops_events_written_but_not_synced(
    stores: Callable[[], PostgresJobStore],
) -> None:
    store = stores()
    job = new_job()
    log = store.log(job)
    log.lock()
    log.write("started", None, nothing)
    assert seqs(log.events()) == [(1, "queued"), (2, "started")]
    log.unlock()
    assert log.events() == []
    assert store.get_job(job) is None
    assert log.append("started", None, nothing) is not None
    assert seqs(log.events()) == [(1, "queued"), (2, "started")]


def _lose_lock_session(store: PostgresJobStore) -> None:
    """End the store's claims session (and so the job locks on it) behind its back."""
    pid = store.claims_backend_pid
    assert pid is not None
    with psycopg.connect(store._params.url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


@pytest.mark.parametrize(
    ("before", "theirs", "mine", "after"),
    [
        pytest.param(
            ["started"],
            "progress",
            "progress",
            ["queued", "started", "progress", "progress"],
            id="renumbered after the other writer",
        ),
        pytest.param(
            [],
            "started",
            "started",
            ["queued", "started", "started"],
            id="no second queued when the log was empty",
        ),
        pytest.param(
            ["started"],
            "completed",
            "progress",
            ["queued", "started", "completed"],
            id="dropped when the job ended meanwhile",
        ),
    ],
)
def test_another_writer_getting_in_before_the_sync(
    stores: Callable[[], PostgresJobStore],
    before: list[str],
    theirs: str,
    mine: str,
    after: list[str],
) -> None:
    """Only possible when this store's lock session was lost: the buffered events were not
    published, so they are renumbered after the other writer's (or dropped after an end)."""
    mine_store, their_store = stores(), stores()
    job = new_job()
    for kind in before:
        mine_store.log(job, fsync=False).append(kind, None, nothing)  # type: ignore[arg-type]
    log = mine_store.log(job)
    published: list[JobEvent] = []
    log.lock()
    try:
        provisional = log.write(mine, None, published.append)  # type: ignore[arg-type]
        assert provisional is not None and provisional.seq == len(before) + 2
        _lose_lock_session(mine_store)
        their_store.log(job, fsync=False).append(theirs, None, nothing)  # type: ignore[arg-type]
        mine_store.sync([log])
        log.publish_written(published.append)
        log.settle(published.append)
    finally:
        log.unlock()
    events = stores().log(job).events()
    assert [e.type for e in events] == after
    assert [e.seq for e in events] == list(range(1, len(after) + 1))
    if after[-1] == mine:
        assert seqs(published)[-1] == (len(after), mine)
    else:
        assert [e for e in published if e.type == mine] == []
    row = stores().get_job(job)
    assert row is not None and row.last_seq == len(after)


def test_append_returns_the_final_event(stores: Callable[[], PostgresJobStore]) -> None:
    mine, theirs = stores(), stores()
    job = new_job()
    mine.log(job, fsync=False).append("started", None, nothing)
    log = mine.log(job, fsync=False)
    log.lock()
    try:
        _lose_lock_session(mine)
        theirs.log(job, fsync=False).append("progress", None, nothing)
        # its write saw seq 2 last and took 3; the other writer had taken 3 meanwhile
        event = log.append("progress", EventPayload(fraction=0.5), nothing)
        assert event is not None and event.seq == 4
    finally:
        log.unlock()
    assert [e.seq for e in mine.log(job).events()] == [1, 2, 3, 4]


# --- claims -----------------------------------------------------------------------------------


def test_claims_are_lost_with_their_session(
    pg_url: str, stores: Callable[[], PostgresJobStore]
) -> None:
    mine, theirs = stores(), stores()
    jobs = sorted(new_job() for _ in range(2))
    held = [mine.claim(job) for job in jobs]
    assert all(c.try_acquire() for c in held)
    generation = mine.claims_generation
    assert mine.check_claims() == []

    terminate_holder_of_claim(pg_url, jobs[0])
    other = theirs.claim(jobs[0])
    t0 = time.monotonic()
    while not other.try_acquire():  # free for others as soon as the server ended the session
        assert time.monotonic() - t0 < 2.0
        time.sleep(0.01)

    assert mine.check_claims() == jobs  # both were on the lost session
    assert mine.claims_generation > generation
    assert all(c.lost for c in held)
    assert not mine.claim(jobs[1]).try_acquire()  # still ours to give back first
    # the store reconnects by itself for new claims
    fresh = mine.claim(new_job())
    assert fresh.try_acquire() and not fresh.lost
    for c in held:
        c.release()  # no error; frees nothing that belongs to someone else
    assert mine.check_claims() == []
    assert not stores().claim(jobs[0]).try_acquire()  # `theirs` still holds it
    assert mine.claim(jobs[1]).try_acquire()
    fresh.release()
    other.release()


def test_a_lost_claim_is_taken_afresh_by_try_acquire(
    pg_url: str, stores: Callable[[], PostgresJobStore]
) -> None:
    store = stores()
    job = new_job()
    claim = store.claim(job)
    assert claim.try_acquire()
    terminate_holder_of_claim(pg_url, job)
    assert store.check_claims() == [job]
    assert claim.try_acquire()  # nobody else took it: ours again, on the new session
    assert not claim.lost and store.check_claims() == []
    assert not stores().claim(job).try_acquire()
    claim.release()


def test_a_claim_is_a_server_advisory_lock(
    pg_url: str, stores: Callable[[], PostgresJobStore]
) -> None:
    store = stores()
    job = new_job()
    claim = store.claim(job)
    assert isinstance(claim, PostgresClaim)
    with psycopg.connect(pg_url, autocommit=True) as conn:

        def holders() -> list[tuple[int]]:
            return conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 "
                "AND classid = %s::bigint::oid AND objid = %s::bigint::oid",
                (
                    int.from_bytes(uuid.UUID(job).bytes[:4], "big"),
                    int.from_bytes(uuid.UUID(job).bytes[4:8], "big"),
                ),
            ).fetchall()

        assert holders() == []
        assert claim.try_acquire()
        assert holders() == [(store.claims_backend_pid,)]
        claim.release()
        assert holders() == []


def test_many_job_threads_share_one_store(stores: Callable[[], PostgresJobStore]) -> None:
    store: JobStore = stores()
    errors: list[BaseException] = []
    jobs = [new_job() for _ in range(24)]

    def run(job: str) -> None:
        try:
            claim = store.claim(job)
            assert claim.try_acquire()
            log = store.log(job, fsync=False)
            log.append("started", None, nothing)
            for i in range(3):
                log.append("progress", EventPayload(fraction=i / 3), nothing, wait=False)
            log.append("completed", None, nothing)
            claim.release()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    for job in jobs:
        assert [e.seq for e in store.log(job).events()] == [1, 2, 3, 4, 5, 6]
        summary = store.get_job(job)
        assert summary is not None and summary.state == "completed"


def test_close_is_idempotent(pg_url: str) -> None:
    store = PostgresJobStore(pg_url)
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.claim(new_job()).try_acquire()
