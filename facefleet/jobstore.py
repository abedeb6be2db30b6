"""Job state behind one interface: who runs a job, its gapless event log, cancel markers, and
the questions people ask (which jobs failed in the last hour?).

    FACEFLEET_STORE_URL = file:///path         journals in a data root (facefleet.journal; the
                                               embedded default, one machine or an RWX volume)
                        | postgresql://...     PostgreSQL (facefleet.pgstore; production)

The runner, the gateway's inspection endpoints and the CLI's `jobs`/`dead` commands use only
this module's types. Producers never touch job state: they publish the job and its `queued`
event to the broker, and the first writer of a job's log records that same event (seq 1).

A job's log is written in two ways, with the same outcome on every backend:

- `append`: one event made durable, then published and (unless wait=False) confirmed;
- a batch: `lock` each log (several only in job-id order), `write` events, make all of them
  durable with one `JobStore.sync(logs)` (file: one syncfs; postgres: one transaction), then
  `publish_written` and `settle`, and `unlock`.

Events get seq 1, 2, 3... per job across every process, are published in seq order, and an
event whose publish failed is published again by the next writer (the log is an outbox).
Nothing is appended after a terminal event. Both backends pass tests/jobstore/.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from facefleet.wire import ErrorCode, EventPayload, EventType, JobEvent

Publish = Callable[[JobEvent], "Future[None] | None"]
"""Publishes one event; returns None once confirmed, or a Future that resolves on the confirm."""

JobState = str
"""`queued`, `running` (started, not ended), or the terminal event's type."""

SETTING = "FACEFLEET_STORE_URL"


class StoreError(Exception):
    """The job store cannot be used (unreachable, schema behind, bad URL): a clear message that
    says what to do. Raised at start-up, so a worker never takes a job it cannot record."""


class StoreUnavailable(StoreError):
    """The job store does not answer right now (database restarting, network cut): nothing about
    the job is wrong. A worker gives the job back and pauses until the store answers again."""


def store_outage(exc: BaseException) -> bool:
    """Is this exception the job store being unreachable (not a bug, not bad input)?

    Backends raise their driver's connection errors; they are recognised here so the runner
    maps them at one boundary: psycopg's OperationalError (connection lost, server shutting
    down, admin shutdown) and the pool's timeout waiting for a connection."""
    if isinstance(exc, StoreUnavailable):
        return True
    try:
        import psycopg
        import psycopg_pool
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout)


@runtime_checkable
class Claim(Protocol):
    """Who runs a job, held from claim to ack; dropped when the holder dies (kill -9)."""

    job_id: str

    def try_acquire(self) -> bool: ...
    def release(self) -> None: ...


@runtime_checkable
class JobLog(Protocol):
    """One job's events (see the module docstring for the two ways to write)."""

    job_id: str

    def events(self) -> list[JobEvent]: ...
    def terminal(self) -> JobEvent | None: ...
    def lock(self, claim: Claim | None = None) -> None: ...
    def unlock(self) -> None: ...
    def write(
        self, event_type: EventType, payload: EventPayload | None, publish: Publish
    ) -> JobEvent | None: ...
    def publish_written(self, publish: Publish) -> None: ...
    def settle(self, publish: Publish) -> None: ...
    def append(
        self,
        event_type: EventType,
        payload: EventPayload | None,
        publish: Publish,
        *,
        wait: bool = True,
    ) -> JobEvent | None: ...


@dataclass(frozen=True)
class JobSummary:
    """One row of `facefleet jobs list` / `GET /v1/jobs`."""

    job_id: str
    state: JobState
    tier: str | None
    created_at: datetime | None
    finished_at: datetime | None
    error_code: ErrorCode | None
    last_seq: int


@dataclass(frozen=True)
class JobPage:
    jobs: list[JobSummary]
    cursor: str | None
    """Pass it back for the next page; None on the last one."""


@runtime_checkable
class JobStore(Protocol):
    url: str

    def log(self, job_id: str, *, queued: JobEvent | None = None, fsync: bool = True) -> JobLog: ...
    def claim(self, job_id: str) -> Claim: ...
    def sync(self, logs: Sequence[JobLog]) -> None:
        """Make the logs' written events durable. Call it whatever `fsync` says: on postgres it
        is where written events are stored at all (fsync=False only relaxes durability)."""
        ...

    def cancel_reason(self, job_id: str) -> str | None: ...
    def request_cancel(self, job_id: str, reason: str) -> None:
        """Record a cancel request (the job may not exist yet); the first reason wins."""
        ...

    def list_jobs(
        self,
        *,
        state: JobState | None = None,
        tier: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> JobPage: ...
    def get_job(self, job_id: str) -> JobSummary | None: ...
    def close(self) -> None: ...


# --- shared by the backends -----------------------------------------------------------------


def summarize(job_id: str, events: Sequence[JobEvent]) -> JobSummary:
    """A job's row from its events: state, tier and times as the log tells them."""
    tier = created = finished = None
    code: ErrorCode | None = None
    state: JobState = "queued"
    for event in events:
        if event.type == "queued":
            tier, created = event.payload.tier, event.ts
        elif event.type == "started" and state == "queued":
            state = "running"
        if event.terminal:
            state, finished, code = event.type, event.ts, event.payload.code
    return JobSummary(
        job_id=job_id,
        state=state,
        tier=tier,
        created_at=created or (events[0].ts if events else None),
        finished_at=finished,
        error_code=code,
        last_seq=events[-1].seq if events else 0,
    )


def encode_cursor(row: JobSummary) -> str:
    """Opaque keyset cursor: the last row's (created_at, job_id), newest first."""
    import base64

    stamp = row.created_at.isoformat() if row.created_at else ""
    return base64.urlsafe_b64encode(f"{stamp}|{row.job_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime | None, str]:
    import base64
    import binascii

    try:
        stamp, sep, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        if not sep or not job_id:  # not one of ours (b64decode skips stray characters)
            raise ValueError("no job id")
        return (datetime.fromisoformat(stamp) if stamp else None), job_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"bad cursor {cursor!r}") from exc


def page_of(
    rows: Sequence[JobSummary],
    *,
    state: JobState | None,
    tier: str | None,
    since: datetime | None,
    limit: int,
    cursor: str | None,
) -> JobPage:
    """Filter, order (newest first, then job id) and cut one page of rows: the file backend's
    query, and the reference the postgres backend's SQL must agree with."""
    if not 1 <= limit <= 1000:
        raise ValueError("limit must be 1..1000")
    floor = -math.inf  # no creation time sorts last (datetime.min.timestamp() raises)

    def key(r: JobSummary) -> tuple[float, str]:
        ts = r.created_at.timestamp() if r.created_at else floor
        return (-ts, r.job_id)

    selected = [
        r
        for r in rows
        if (state is None or r.state == state)
        and (tier is None or r.tier == tier)
        and (since is None or (r.created_at is not None and r.created_at >= since))
    ]
    selected.sort(key=key)
    if cursor is not None:
        after_ts, after_id = decode_cursor(cursor)
        mark = (-(after_ts.timestamp() if after_ts else floor), after_id)
        selected = [r for r in selected if key(r) > mark]
    page = selected[:limit]
    more = len(selected) > limit
    return JobPage(page, encode_cursor(page[-1]) if more and page else None)
