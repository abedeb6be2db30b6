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
- a batch: `JobStore.lock(logs)` (job-id order, all or none), `write` events, make all of
  them durable with one `JobStore.sync(logs)` (file: one syncfs; postgres: one transaction),
  then `publish_written`, `JobStore.settle(logs)` and `JobStore.unlock(logs)`.

The batch operations (`acquire`/`release` for claims, `lock`/`settle`/`unlock` for logs) do
for several jobs what the per-job methods do for one: postgres in one statement each (a batch
of 32 jobs costs a handful of round trips, not a few hundred), the file store one job at a
time (`OneByOne`: each is a local system call anyway).

Events get seq 1, 2, 3... per job across every process, are published in seq order, and an
event whose publish failed is published again by the next writer (the log is an outbox).
Nothing is appended after a terminal event, with one exception: `replayed` after
`dead_lettered` (`JobLog.replay`, `facefleet dead replay`) opens the job again, and it takes
events as before (see "replay" at the end). Both backends pass tests/jobstore/.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypedDict, runtime_checkable

from facefleet.wire import (
    HEADER_REPLAY_SEQ,
    ErrorCode,
    EventPayload,
    EventType,
    JobEvent,
    JobRequest,
)

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
    def replay(self, replayed_by: str, publish: Publish) -> JobEvent:
        """Open a dead-lettered job again: append `replayed` (durable, published, confirmed)
        under the job lock (taken for the call: do not hold it). Raises ReplayRefused naming
        the job's state unless its log ends in `dead_lettered`, or in a `replayed` whose
        re-queue may never have happened (see `replay_refusal`)."""
        ...


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
    api_key_id: str | None = None
    """Who submitted the job (its `queued` event's payload; None for SDK/CLI submissions)."""
    gpu_seconds: float | None = None
    """Processing time on the worker: the `completed` event's timings_s.total (None until the
    job completed; failed attempts are not counted)."""


@dataclass(frozen=True)
class Usage:
    """One API key's jobs created at or after `since`, by state, and the GPU-seconds of the
    completed ones (what `GET /v1/usage` answers)."""

    api_key_id: str
    since: datetime | None
    jobs: dict[JobState, int]
    """Jobs by their state now: queued, running, completed, failed, dead_lettered, cancelled
    (states without jobs are left out)."""
    gpu_seconds: float

    @property
    def total(self) -> int:
        return sum(self.jobs.values())


ACTIVE_STATES: tuple[JobState, ...] = ("queued", "running")
"""What counts against a key's limit of jobs at once."""


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

    def acquire(self, claims: Sequence[Claim]) -> list[bool]:
        """`Claim.try_acquire` of each claim, in order (two claims of one job: the first wins)."""
        ...

    def release(self, claims: Sequence[Claim]) -> None:
        """`Claim.release` of each claim."""
        ...

    def lock(self, logs: Sequence[JobLog], claims: Sequence[Claim | None] = ()) -> None:
        """`JobLog.lock` of each log (with its claim, when given), in job-id order, events
        loaded; all or none: on an error every lock taken here is let go again."""
        ...

    def unlock(self, logs: Sequence[JobLog]) -> None:
        """`JobLog.unlock` of each log (logs not locked are skipped)."""
        ...

    def settle(self, logs: Sequence[JobLog], publish: Publish) -> None:
        """`JobLog.settle` of each log: every confirm awaited, the publish marks recorded."""
        ...

    def cancel_reasons(self, job_ids: Sequence[str]) -> dict[str, str]:
        """The cancel reasons recorded for these jobs (jobs without one are left out)."""
        ...

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
        api_key_id: str | None = None,
    ) -> JobPage: ...
    def get_job(self, job_id: str) -> JobSummary | None: ...
    def record_submitted(self, job: JobRequest) -> bool:
        """Record a job its producer has just queued (the broker confirmed it and its `queued`
        event, wire.queued_event(job)): that event becomes seq 1, marked published, if the log
        is empty; False (nothing written) when any writer got there first. The gateway calls it
        so its listing and limits see a job before a worker takes it."""
        ...

    def usage(self, api_key_id: str, *, since: datetime | None = None) -> Usage: ...
    def active_count(self, api_key_id: str) -> int:
        """The key's jobs queued or running now."""
        ...

    def close(self) -> None: ...


# --- shared by the backends -----------------------------------------------------------------


class OneByOne:
    """The JobStore batch operations done one job at a time (for a backend whose per-job
    operations are local system calls, where a batch would save nothing)."""

    def acquire(self, claims: Sequence[Claim]) -> list[bool]:
        return [claim.try_acquire() for claim in claims]

    def release(self, claims: Sequence[Claim]) -> None:
        for claim in claims:
            claim.release()

    def lock(self, logs: Sequence[JobLog], claims: Sequence[Claim | None] = ()) -> None:
        pairs = list(zip(logs, claims or [None] * len(logs), strict=True))
        pairs.sort(key=lambda pair: pair[0].job_id)
        taken: list[JobLog] = []
        try:
            for log, claim in pairs:
                log.lock(claim)
                taken.append(log)
        except BaseException:
            self.unlock(taken)
            raise

    def unlock(self, logs: Sequence[JobLog]) -> None:
        for log in logs:
            log.unlock()

    def settle(self, logs: Sequence[JobLog], publish: Publish) -> None:
        for log in logs:
            log.settle(publish)


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
        elif event.type == "replayed":  # open again: waiting for a worker, as when submitted
            state, finished, code = "queued", None, None
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
        **owner_and_gpu(events),
    )


class _OwnerAndGpu(TypedDict):
    api_key_id: str | None
    gpu_seconds: float | None


def owner_and_gpu(events: Sequence[JobEvent]) -> _OwnerAndGpu:
    """Who submitted a job (its `queued` event's api_key_id) and its GPU-seconds (the
    `completed` event's timings_s.total), as JobSummary carries them."""
    key: str | None = None
    gpu: float | None = None
    for event in events:
        if event.type == "queued" and event.payload.api_key_id is not None:
            key = event.payload.api_key_id
        elif event.type == "completed":
            gpu = gpu_seconds_of(event)
    return {"api_key_id": key, "gpu_seconds": gpu}


def gpu_seconds_of(event: JobEvent) -> float | None:
    """A `completed` event's processing time on the worker (manifest timings_s.total)."""
    timings = event.payload.timings_s or {}
    total = timings.get("total")
    return float(total) if total is not None and math.isfinite(total) and total >= 0 else None


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
    api_key_id: str | None = None,
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
        and (api_key_id is None or r.api_key_id == api_key_id)
    ]
    selected.sort(key=key)
    if cursor is not None:
        after_ts, after_id = decode_cursor(cursor)
        mark = (-(after_ts.timestamp() if after_ts else floor), after_id)
        selected = [r for r in selected if key(r) > mark]
    page = selected[:limit]
    more = len(selected) > limit
    return JobPage(page, encode_cursor(page[-1]) if more and page else None)


def usage_of(rows: Sequence[JobSummary], api_key_id: str, since: datetime | None) -> Usage:
    """One key's usage from job rows: the file backend's query, and the reference for the
    postgres backend's SQL (jobs created at or after `since`, by state; GPU-seconds summed)."""
    check_since(since)
    jobs: dict[JobState, int] = {}
    gpu = 0.0
    for r in rows:
        if r.api_key_id != api_key_id:
            continue
        if since is not None and (r.created_at is None or r.created_at < since):
            continue
        jobs[r.state] = jobs.get(r.state, 0) + 1
        gpu += r.gpu_seconds or 0.0
    return Usage(api_key_id, since, jobs, round(gpu, 6))


def check_since(since: datetime | None) -> None:
    if since is not None and since.tzinfo is None:
        raise ValueError("since needs a time zone")


# --- replay (dead letters) --------------------------------------------------------------------
#
# A dead-lettered job may be re-queued by an operator (`facefleet dead replay`): its log gets a
# `replayed` event, then a fresh copy of the job request goes to its tier. After that event the
# job is open again: `terminal()` is None, events are appended as before, its summary says
# `queued`, and the runner counts attempts from the last `replayed` (a fresh attempt budget).
# Nothing but `replayed` may follow `dead_lettered`; nothing at all follows completed, failed
# or cancelled.

REPLAY_HEADER = HEADER_REPLAY_SEQ
"""On a replayed job's message: the seq of the `replayed` event that sent it. A broker dead
letter of an older copy (a lower number, or none) is stale: its `dead_lettered` was recorded
before the replay, and a worker must not end the replayed job with it."""


class ReplayRefused(ValueError):
    """The job cannot be replayed; `state` says what it is (`unknown`: no events at all)."""

    def __init__(self, job_id: str, state: JobState, detail: str = "") -> None:
        self.job_id = job_id
        self.state = state
        why = {
            "unknown": f"no job {job_id} in the job store",
            "completed": f"job {job_id} completed: a completed job is never replayed",
            "failed": f"job {job_id} failed (a permanent error): submit a corrected job instead",
            "cancelled": f"job {job_id} was cancelled",
        }.get(state, f"job {job_id} is {state}")
        if state != "unknown":
            why += f"{detail}; only a dead-lettered job can be replayed"
        super().__init__(why)


def ended(events: Sequence[JobEvent]) -> JobEvent | None:
    """The event that ended the job, or None while it is open: the last terminal event, unless
    a `replayed` follows it (what `JobLog.terminal()` answers)."""
    for event in reversed(events):
        if event.type == "replayed":
            return None
        if event.terminal:
            return event
    return None


def replay_refusal(events: Sequence[JobEvent]) -> JobState | None:
    """None when the job may be replayed: its log ends in `dead_lettered`, or in `replayed`
    (a replay whose re-queue may not have happened, e.g. the CLI died after recording it; if
    it did happen, the second copy is harmless: a job runs once); else the job's state, which
    says why not."""
    if not events:
        return "unknown"
    if events[-1].type in ("dead_lettered", "replayed"):
        return None
    return summarize(events[0].job_id, events).state


def may_write(events: Sequence[JobEvent], event_type: EventType) -> bool:
    """May a writer append `event_type` to a log that holds `events`? Nothing after the end;
    `replayed` only where `replay_refusal` allows it."""
    if event_type == "replayed":
        return replay_refusal(events) is None
    return ended(events) is None


def replay_log(log: JobLog, replayed_by: str, publish: Publish) -> JobEvent:
    """`JobLog.replay` for every backend: the check and the append under one job lock."""
    log.lock()
    try:
        refused = replay_refusal(log.events())
        if refused is not None:
            raise ReplayRefused(log.job_id, refused)
        event = log.append("replayed", EventPayload(replayed_by=replayed_by), publish)
        if event is None:  # another writer got in between (postgres: a lost claims session)
            state = summarize(log.job_id, log.events()).state
            raise ReplayRefused(log.job_id, state, " (it changed meanwhile)")
        return event
    finally:
        log.unlock()


def replay_generation(headers: dict[str, object] | None) -> int:
    """The `replayed` seq a job message carries (REPLAY_HEADER); 0 for a copy from before any
    replay."""
    value = (headers or {}).get(REPLAY_HEADER)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    try:
        return int(str(value)) if value is not None else 0
    except ValueError:
        return 0


def last_replay_seq(events: Sequence[JobEvent]) -> int:
    """The seq of the job's last `replayed` event; 0 if it was never replayed."""
    return max((e.seq for e in events if e.type == "replayed"), default=0)


def attempts_since_replay(events: Sequence[JobEvent]) -> int:
    """Failed attempts that count against the job's budget: its `retrying` events after the
    last `replayed` (all of them when it was never replayed)."""
    since = last_replay_seq(events)
    return sum(1 for e in events if e.type == "retrying" and e.seq > since)
