"""Per-API-key job state, on every backend: the gateway's record of a job it submitted, listing
scoped to a key, usage (jobs by state, GPU-seconds) and the count of a key's active jobs.

Same backends and fixtures as test_conformance.py (imported from there).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from facefleet.jobstore import JobStore
from facefleet.wire import EventPayload, JobEvent, JobRequest, queued_event
from tests.jobstore import test_conformance as conformance
from tests.jobstore.test_conformance import Backend, new_job, seqs, walk

# the conformance suite's fixtures: every backend, a store on it, an empty one
backend = conformance.backend
empty_backend = conformance.empty_backend
store = conformance.store

T0 = datetime(2032, 3, 1, 9, 0, 0, 250000, tzinfo=UTC)
KEY_A = "a" * 16
KEY_B = "b" * 16


def request(
    job: str | None = None,
    *,
    key: str | None = KEY_A,
    created: datetime | None = None,
    tier: str = "standard",
) -> JobRequest:
    return JobRequest(
        job_id=job or new_job(),
        idempotency_key=uuid.uuid4().hex,
        tier=tier,
        created_at=created or datetime.now(UTC) - timedelta(seconds=2),
        source_uri="file:///a.jpg",
        target_uri="file:///b.jpg",
        output_uri_prefix="file:///out/",
        api_key_id=key,
    )


def sink(_: JobEvent) -> None:
    pass


# --- record_submitted ---------------------------------------------------------------------------


def test_a_recorded_submission_is_a_queued_job_of_its_key(store: JobStore) -> None:
    job = request()
    assert store.record_submitted(job) is True
    assert store.log(job.job_id).events() == [queued_event(job)]
    row = store.get_job(job.job_id)
    assert row is not None
    assert (row.state, row.tier, row.created_at, row.last_seq) == (
        "queued",
        "standard",
        job.created_at,
        1,
    )
    assert (row.api_key_id, row.gpu_seconds) == (KEY_A, None)
    assert store.record_submitted(job) is False  # once
    assert len(store.log(job.job_id).events()) == 1


def test_the_worker_finds_the_recorded_event_and_does_not_publish_it_again(
    backend: Backend,
) -> None:
    """The producer SDK published and confirmed `queued`; the gateway recorded it as
    published: the worker's first write neither records a second one nor republishes it."""
    job = request()
    assert backend.open().record_submitted(job)
    published: list[JobEvent] = []
    worker = backend.open().log(job.job_id, fsync=False, queued=queued_event(job))
    worker.append("started", EventPayload(worker="w"), published.append)
    assert seqs(published) == [(2, "started")]
    assert seqs(backend.open().log(job.job_id).events()) == [(1, "queued"), (2, "started")]


def test_a_job_the_worker_recorded_first_is_left_alone(backend: Backend) -> None:
    job = request()
    backend.open().log(job.job_id, fsync=False, queued=queued_event(job)).append(
        "started", None, sink
    )
    assert backend.open().record_submitted(job) is False
    assert seqs(backend.open().log(job.job_id).events()) == [(1, "queued"), (2, "started")]
    row = backend.open().get_job(job.job_id)
    assert row is not None and (row.state, row.api_key_id) == ("running", KEY_A)


def test_a_record_racing_the_workers_first_write_leaves_one_queued(backend: Backend) -> None:
    """The worker holds the job lock and has written (not yet synced) its first events when
    the gateway records the job: whoever commits first, the log is queued, started."""
    job = request()
    worker_store, gateway_store = backend.open(), backend.open()
    log = worker_store.log(job.job_id, fsync=False, queued=queued_event(job))
    published: list[JobEvent] = []
    recorded: list[bool] = []
    log.lock()
    try:
        log.write("started", None, published.append)
        racer = threading.Thread(
            target=lambda: recorded.append(gateway_store.record_submitted(job))
        )
        racer.start()
        racer.join(1.0)  # postgres: commits now (row lock only); file: waits for the job lock
        worker_store.sync([log])
        log.publish_written(published.append)
        log.settle(published.append)
    finally:
        log.unlock()
    racer.join(10)
    assert not racer.is_alive() and len(recorded) == 1
    events = backend.open().log(job.job_id).events()
    assert seqs(events) == [(1, "queued"), (2, "started")]
    assert events[0] == queued_event(job)
    assert [e.type for e in published].count("started") == 1
    row = backend.open().get_job(job.job_id)
    assert row is not None and (row.state, row.api_key_id, row.last_seq) == ("running", KEY_A, 2)


# --- listing, usage and active jobs per key ----------------------------------------------------


def finish(store: JobStore, job: JobRequest, outcome: str, total: float | None = None) -> None:
    """Take a recorded job to `outcome` as a worker would (queued: nothing)."""
    if outcome == "queued":
        return
    log = store.log(job.job_id, fsync=False, queued=queued_event(job))
    log.append("started", EventPayload(worker="w"), sink)
    if outcome == "completed":
        timings = {"swap": 0.1} if total is None else {"swap": 0.1, "total": total}
        log.append("completed", EventPayload(result_uri="file:///r", timings_s=timings), sink)
    elif outcome == "failed":
        log.append("failed", EventPayload(code="no_face_in_source", message="no"), sink)
    elif outcome == "cancelled":
        log.append("cancelled", EventPayload(message="by user"), sink)


def populate(store: JobStore) -> dict[str, list[tuple[JobRequest, str, float | None]]]:
    """Jobs of two keys and of no key, a minute apart, in every state."""
    plan: list[tuple[str | None, str, float | None]] = [
        (KEY_A, "completed", 1.25),
        (KEY_A, "completed", 2.5),
        (KEY_A, "completed", None),  # a completed event without timings counts 0
        (KEY_A, "failed", None),
        (KEY_A, "running", None),
        (KEY_A, "queued", None),
        (KEY_A, "cancelled", None),
        (KEY_B, "completed", 10.0),
        (KEY_B, "queued", None),
        (None, "completed", 7.0),
        (None, "running", None),
    ]
    jobs: dict[str, list[tuple[JobRequest, str, float | None]]] = {}
    for i, (key, outcome, total) in enumerate(plan):
        job = request(key=key, created=T0 + timedelta(minutes=i))
        assert store.record_submitted(job)
        finish(store, job, outcome, total)
        jobs.setdefault(str(key), []).append((job, outcome, total))
    return jobs


@pytest.fixture
def keyed(empty_backend: Backend) -> tuple[JobStore, dict[str, Any]]:
    store = empty_backend.open()
    return store, populate(store)


@pytest.mark.parametrize("limit", [1, 3, 100])
def test_list_jobs_shows_only_the_keys_jobs(
    keyed: tuple[JobStore, dict[str, Any]], limit: int
) -> None:
    store, jobs = keyed
    for key in (KEY_A, KEY_B):
        rows, _ = walk(store, limit, api_key_id=key)
        mine = sorted(jobs[key], key=lambda j: j[0].created_at, reverse=True)
        assert [r.job_id for r in rows] == [j.job_id for j, _, _ in mine]
        assert {r.api_key_id for r in rows} == {key}
    assert walk(store, limit, api_key_id="c" * 16)[0] == []
    rows, _ = walk(store, limit, api_key_id=KEY_A, state="completed")
    assert [r.state for r in rows] == ["completed"] * 3
    assert sorted(r.gpu_seconds or 0.0 for r in rows) == [0.0, 1.25, 2.5]
    # no filter: every job, each with its owner
    assert len(walk(store, limit)[0]) == 11


def test_usage_counts_jobs_by_state_and_sums_gpu_seconds(
    keyed: tuple[JobStore, dict[str, Any]],
) -> None:
    store, _ = keyed
    a = store.usage(KEY_A)
    assert a.api_key_id == KEY_A and a.since is None
    assert a.jobs == {"completed": 3, "failed": 1, "running": 1, "queued": 1, "cancelled": 1}
    assert a.total == 7
    assert a.gpu_seconds == pytest.approx(3.75)
    b = store.usage(KEY_B)
    assert b.jobs == {"completed": 1, "queued": 1}
    assert b.gpu_seconds == pytest.approx(10.0)
    # since: jobs created at or after it (A's second job onwards)
    later = store.usage(KEY_A, since=T0 + timedelta(minutes=1))
    assert later.total == 6 and later.gpu_seconds == pytest.approx(2.5)
    assert later.since == T0 + timedelta(minutes=1)
    none = store.usage("c" * 16)
    assert (none.jobs, none.gpu_seconds, none.total) == ({}, 0.0, 0)


def test_active_count_is_the_keys_queued_and_running_jobs(
    keyed: tuple[JobStore, dict[str, Any]],
) -> None:
    store, jobs = keyed
    assert store.active_count(KEY_A) == 2
    assert store.active_count(KEY_B) == 1
    assert store.active_count("c" * 16) == 0
    job, _, _ = next(j for j in jobs[KEY_B] if j[1] == "queued")
    finish(store, job, "completed", 0.5)
    assert store.active_count(KEY_B) == 0
    assert store.usage(KEY_B).gpu_seconds == pytest.approx(10.5)


def test_usage_refuses_a_time_without_zone(store: JobStore) -> None:
    with pytest.raises(ValueError, match="time zone"):
        store.usage(KEY_A, since=datetime(2030, 1, 1))  # no zone, on purpose


# --- postgres: the migration fills the new columns for jobs recorded before it --------------


@pytest.mark.integration
def test_migration_2_backfills_owner_and_gpu_seconds(
    fresh_pg_url: Callable[[bool], str],
) -> None:
    import psycopg

    from facefleet.pgstore import PostgresJobStore, migrate, migrations

    url = fresh_pg_url(False)
    first = migrations()[0]
    job = request()
    done = JobEvent(
        job_id=job.job_id,
        seq=2,
        type="completed",
        ts=job.created_at + timedelta(seconds=5),
        payload=EventPayload(timings_s={"total": 4.5}),
    )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(first.sql)  # type: ignore[arg-type]
        conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
            (first.version, first.name),
        )
        conn.execute(
            "INSERT INTO jobs (job_id, tier, state, created_at, finished_at, last_seq) "
            "VALUES (%s, 'standard', 'completed', %s, %s, 2)",
            (uuid.UUID(job.job_id), job.created_at, done.ts),
        )
        for event in (queued_event(job), done):
            conn.execute(
                "INSERT INTO job_events (job_id, seq, type, ts, body, published) "
                "VALUES (%s, %s, %s, %s, %s::jsonb, true)",
                (uuid.UUID(job.job_id), event.seq, event.type, event.ts, event.encode().decode()),
            )
    assert "0002_key_usage" in migrate(url)
    with PostgresJobStore(url) as store:
        row = store.get_job(job.job_id)
        assert row is not None and (row.api_key_id, row.gpu_seconds) == (KEY_A, 4.5)
        assert store.usage(KEY_A).gpu_seconds == pytest.approx(4.5)
