"""Job state in PostgreSQL (FACEFLEET_STORE_URL=postgresql://...): the production backend.

Same behaviour as the journals (facefleet.journal.FileJobStore); tests/jobstore/ runs one
conformance suite over both. What lives where:

    jobs         one row per job: the summary `jobs list` shows (state, tier, times, error
                 code), `last_seq` (the top of its event log) and the cancel marker
    job_events   (job_id, seq) -> the JobEvent JSON as published, and whether the broker
                 confirmed it (`published`: the outbox)
    schema_migrations   which of facefleet/migrations/NNNN_*.sql are applied

Connections. Statements go through a `psycopg_pool.ConnectionPool` (autocommit; a transaction
only where one is needed). Claims and job locks are *session* advisory locks held on ONE
dedicated connection per store (the claims session, not from the pool), shared by the store's
threads under a lock. Every connection carries a statement timeout, a connect timeout and TCP
keepalives on both ends: libpq's (`keepalives_*`: this side notices a dead server) and the
server's (`tcp_keepalives_*` set for the session: the server notices a dead worker node, ends
its session and so drops its claims). The claims session also sets `idle_session_timeout=0`:
it is idle between claims by design, and a server-wide idle timeout must not end it.

Why advisory locks for claims, not leases (`claimed_by`, `lease_until` plus a heartbeat): the
server drops a session's advisory locks the moment the session ends, so a worker killed with
SIGKILL (its kernel resets the connection) loses its claims at once, and a worker whose node
vanished loses them once the server's keepalive gives up: about 10 s idle + 3 probes x 5 s =
25 s by default (`keepalives_idle_s + keepalives_count * keepalives_interval_s`). Nothing has
to be renewed. The price: they need a real server session. They do NOT work through a
transaction-mode pooler (PgBouncer `pool_mode=transaction`): there the server session is
shared by whoever runs the next transaction, so a lock would be held by the wrong client, or
by nobody. The claims connection must be direct or through a session-mode pooler; pass
`claims_url` to send it around a transaction-mode pooler that `url` goes through (then also
pass `prepare_threshold=None` for the pooled statements on PgBouncer < 1.21). Behind a
session-mode pooler the pooler holds the server session, so the bound for a dead node is the
pooler's own keepalive toward its clients, and its idle timeouts must not end idle clients.

If the claims session breaks (the server restarted, a failover, pg_terminate_backend, a
network cut long enough for keepalives), every claim and job lock taken on it is gone: other
workers may take those jobs at once. The store then bumps `claims_generation`; each claim
taken on the old session reports `lost`, and `check_claims()` pings the session and returns
the job ids of the claims that were lost (held by this process's callers but no longer by the
server). A worker should call `check_claims()` at its checkpoints (with the cancel check) and
give back the jobs it names. The next `try_acquire` reconnects by itself.

Writing a job's log (see facefleet.jobstore): `lock` takes the job lock (a session advisory
lock on the job's id in the two-int4 key space, distinct from the claim's bigint key, plus an
in-process lock, since two threads on one session would not exclude each other) and loads the
job's events; `write` buffers the next event in memory with a provisional seq; `store.sync(logs)`
writes every buffered event of every given log in ONE transaction (the batch lane's group
commit), renumbering them if another writer got in between (possible only if this store's
claims session was lost meanwhile: they are not published yet, so that is safe); then
`publish_written` and `settle` publish in seq order and mark the confirmed events published
(one statement per batch, committed without waiting for the WAL flush: a lost mark only means
the next writer publishes those events again, and watchers drop the duplicate seq).
Before writing, a writer republishes earlier events of the job that are still unpublished (the
outbox), exactly like the journal. The job lock is held for one append or one batch step, never
for a whole job (the claim covers that), and no transaction stays open while a job runs: it
orders the claim holder against writers that hold no claim (the dead-letter path, operators'
tools, a second log object), so the stream stays in seq order and nobody republishes an event
its writer is still publishing, as the journal's file lock does.

Deviations from a journal, all invisible through the interface: `write` returns the event with
a provisional seq, final after `sync` (`append` returns the final one); events written but not
synced when `unlock` is called are dropped (they were never durable nor published), where a
journal keeps the unsynced line; `publish_written` syncs the log's buffered events first if its
caller did not (a journal's written line is in the file already, so publishing it without a
sync is legal there, and must not lose events here). `fsync=False` logs commit with
`synchronous_commit=off` (a crash may lose the last commits, never corrupt or reorder them).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from facefleet.jobstore import (
    ACTIVE_STATES,
    Claim,
    JobLog,
    JobPage,
    JobState,
    JobSummary,
    Publish,
    StoreError,
    Usage,
    check_since,
    decode_cursor,
    encode_cursor,
    ended,
    may_write,
    owner_and_gpu,
    replay_log,
)
from facefleet.wire import (
    TERMINAL_EVENTS,
    ErrorCode,
    EventPayload,
    EventType,
    JobEvent,
    JobRequest,
    queued_event,
    utcnow,
)

__all__ = [
    "Migration",
    "PostgresClaim",
    "PostgresJobLog",
    "PostgresJobStore",
    "latest_version",
    "migrate",
    "migrations",
    "schema_version",
]

log = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[Any, ...]]

_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_MIGRATE_LOCK = 0x66_66_6D_69_67_72_74  # "ffmigrt": the advisory key migrators serialize on

_COMPATIBLE_FROM = re.compile(r"^-- facefleet-compatible-from: (\d+)\s*$", re.MULTILINE)
_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version         integer PRIMARY KEY,
    name            text NOT NULL,
    applied_at      timestamptz NOT NULL DEFAULT now(),
    compatible_from integer
)"""
_SCHEMA_MIGRATIONS_COMPATIBLE = (
    "ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS compatible_from integer"
)


# --- migrations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    """`0001_init`: the file name without `.sql`."""
    sql: str
    compatible_from: int
    """The oldest build (by the schema version it ships) that still runs on a schema with this
    migration applied: its own version unless the file says `-- facefleet-compatible-from: N`
    (e.g. a dropped index, a column nobody older reads). Lets pods of the release before keep
    starting during a rolling upgrade, after the pre-upgrade hook migrated."""


def _migration(version: int, name: str, sql: str) -> Migration:
    marker = _COMPATIBLE_FROM.search(sql)
    compatible_from = int(marker[1]) if marker else version
    if not 1 <= compatible_from <= version:
        raise StoreError(
            f"facefleet/migrations/{name}.sql: facefleet-compatible-from {compatible_from} "
            f"must lie in 1..{version}"
        )
    return Migration(version, name, sql, compatible_from)


def migrations() -> list[Migration]:
    """The schema versions this build ships (facefleet/migrations/NNNN_name.sql), in order."""
    found = []
    for entry in importlib.resources.files("facefleet.migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(_migration(int(match[1]), entry.name[:-4], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if not found:
        raise StoreError(
            "this build ships no facefleet/migrations/*.sql (a packaging error: they are "
            "package data)"
        )
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise StoreError(f"facefleet/migrations: versions must run 1, 2, 3...; found {versions}")
    return found


def latest_version() -> int:
    return migrations()[-1].version


def schema_version(conn: Connection) -> int:
    """The highest applied migration; 0 for a database nobody migrated."""
    row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    top = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(top[0]) if top else 0


def oldest_compatible_build(conn: Connection, version: int) -> int:
    """The oldest build (by the schema version it ships) that runs on this database, judged by
    the migrations applied past `version`: each one's `compatible_from` (strict, its own
    version, where a migrator recorded none)."""
    column = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns "
        "WHERE table_name = 'schema_migrations' AND column_name = 'compatible_from' "
        "AND table_schema = current_schema())"
    ).fetchone()
    compatible = "coalesce(compatible_from, version)" if column and column[0] else "version"
    row = conn.execute(
        f"SELECT coalesce(max({compatible}), 0) FROM schema_migrations WHERE version > %s",
        (version,),
    ).fetchone()
    return int(row[0]) if row else 0


def migrate(url: str, *, connect_timeout_s: float = 10.0) -> list[str]:
    """Apply the pending migrations, each in its own transaction; returns their names (empty
    when the schema is up to date). Each transaction first takes a transaction-level advisory
    lock, so migrators running at once apply each file exactly once, in order; an error rolls
    back that file and stops (the earlier ones stay applied)."""
    applied: list[str] = []
    params = _Params(url, connect_timeout_s=connect_timeout_s)
    with params.connect(autocommit=True, options=()) as conn:
        for migration in migrations():
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (_MIGRATE_LOCK,))
                conn.execute(_SCHEMA_MIGRATIONS)
                conn.execute(_SCHEMA_MIGRATIONS_COMPATIBLE)
                row = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,)
                ).fetchone()
                if row:
                    continue
                conn.execute(cast(Any, migration.sql))
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, compatible_from) "
                    "VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.compatible_from),
                )
            applied.append(migration.name)
            log.info("job store: applied migration %s", migration.name)
    return applied


# --- connection parameters ------------------------------------------------------------------


class _Params:
    """One URL's connection parameters, our defaults under the URL's own, and how to name the
    server in a message (host:port, never the password)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 10.0,
        statement_timeout_s: float | None = None,
        keepalives_idle_s: int = 10,
        keepalives_interval_s: int = 5,
        keepalives_count: int = 3,
        application_name: str = "facefleet",
    ) -> None:
        try:
            given = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise StoreError(f"bad job store URL: {_scrub(str(exc), url)}") from None
        self.url = url
        self.password = str(given.get("password") or "")
        host = str(given.get("host") or given.get("hostaddr") or "localhost")
        self.where = f"{host}:{given.get('port') or 5432}"
        self.database = str(given.get("dbname") or given.get("user") or "")
        self.given_options = str(given.pop("options", "") or "")
        self.kwargs: dict[str, Any] = {
            "connect_timeout": max(2, round(connect_timeout_s)),
            "keepalives": 1,
            "keepalives_idle": keepalives_idle_s,
            "keepalives_interval": keepalives_interval_s,
            "keepalives_count": keepalives_count,
            "application_name": application_name,
            **given,
        }
        self.options = [
            "-c TimeZone=UTC",
            f"-c tcp_keepalives_idle={keepalives_idle_s}",
            f"-c tcp_keepalives_interval={keepalives_interval_s}",
            f"-c tcp_keepalives_count={keepalives_count}",
        ]
        if statement_timeout_s is not None:
            self.options.append(f"-c statement_timeout={round(statement_timeout_s * 1000)}")

    def conninfo_kwargs(self, options: Sequence[str] | None = None) -> dict[str, Any]:
        """kwargs for psycopg.connect / the pool: ours, then the URL's (the URL's win)."""
        opts = [*(self.options if options is None else options), self.given_options]
        return {**self.kwargs, "options": " ".join(o for o in opts if o)}

    def connect(
        self, *, autocommit: bool = True, options: Sequence[str] | None = None, **extra: Any
    ) -> Connection:
        kwargs = self.conninfo_kwargs(options)
        kwargs.update(extra)
        try:
            return psycopg.connect(autocommit=autocommit, **kwargs)
        except psycopg.Error as exc:
            raise self.error(exc) from None

    def error(self, exc: BaseException) -> StoreError:
        cause = _scrub(str(exc).strip() or type(exc).__name__, self.password)
        cause = " ".join(cause.split())
        return StoreError(
            f"cannot reach the job store at {self.where} (database {self.database!r}): {cause}"
        )


def _scrub(text: str, password: str) -> str:
    return text.replace(password, "***") if password else text


def redact(url: str) -> str:
    """The URL without its password (for messages and `store.url`)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if sep else ''}@{hostport}"
    query = urlencode(
        [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, True)]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# --- the claims session ---------------------------------------------------------------------


class _ClaimsSession:
    """The one connection that holds this store's claims and job locks (session advisory
    locks), shared by threads under a lock. `generation` counts sessions: it is bumped the
    moment a broken session is noticed, so every lock taken under an older generation is
    known lost (the server dropped it with the session)."""

    def __init__(self, connect: Callable[[], Connection], conn: Connection | None) -> None:
        self._connect = connect
        self._conn = conn
        self._lock = threading.Lock()
        self.generation = 1
        self.closed = False

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self.generation += 1
        if conn is not None:
            log.warning(
                "job store: the claims session broke; every claim and job lock held on it is "
                "lost (generation %d)",
                self.generation,
            )
            with contextlib.suppress(Exception):
                conn.close()

    def call(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, int]:
        """Run a one-value statement; (value, generation it ran under). A broken session is
        replaced once (a new generation) before the error is given up on."""
        with self._lock:
            for attempt in (1, 2):
                if self.closed:
                    raise StoreError("the job store is closed")
                if self._conn is None or _dead(self._conn):
                    if self._conn is not None:
                        self._drop()
                    self._conn = self._connect()
                conn = self._conn
                try:
                    row = conn.execute(cast(Any, sql), params).fetchone()
                    return (row[0] if row else None), self.generation
                except psycopg.OperationalError:
                    if not _dead(conn):
                        raise  # e.g. a statement timeout: the session and its locks live on
                    self._drop()
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

    def release(self, sql: str, params: tuple[Any, ...], generation: int) -> None:
        """Run an unlock if the lock's session is still this one (otherwise the lock died with
        its session); never raises for a broken session."""
        with self._lock:
            if generation != self.generation or self._conn is None or self.closed:
                return
            try:
                self._conn.execute(cast(Any, sql), params)
            except psycopg.OperationalError:
                if _dead(self._conn):
                    self._drop()

    def ping(self) -> None:
        """Notice a broken session now (psycopg only learns it on use)."""
        with self._lock:
            if self._conn is None or self.closed:
                return
            try:
                self._conn.execute("SELECT 1")
            except psycopg.OperationalError:
                if _dead(self._conn):
                    self._drop()

    def backend_pid(self) -> int | None:
        with self._lock:
            return None if self._conn is None else self._conn.info.backend_pid

    def close(self) -> None:
        with self._lock:
            self.closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()


def _pg_log(item: object) -> PostgresJobLog:
    if not isinstance(item, PostgresJobLog):
        raise TypeError(f"not a PostgresJobLog: {type(item).__name__}")
    return item


def _dead(conn: Connection) -> bool:
    return bool(conn.closed or conn.broken)


_SYNC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("job_id", "uuid"),
    ("state", "text"),
    ("tier", "text"),
    ("created_at", "timestamptz"),
    ("started_at", "timestamptz"),
    ("finished_at", "timestamptz"),
    ("error_code", "text"),
    ("last_seq", "int"),
    ("api_key_id", "text"),
    ("gpu_seconds", "float8"),
)
"""The jobs row's columns a sync writes, and their types: the keys of `_Planned.row` and the
record `sync`'s UPDATE reads them as (one list, so a key can never silently read as NULL)."""
_SYNC_RECORD = ", ".join(f"{name} {kind}" for name, kind in _SYNC_COLUMNS)
_SYNC_NAMES = ", ".join(name for name, _ in _SYNC_COLUMNS)
_LOCKED_ROW = "job_id, last_seq, state, tier, created_at, started_at, finished_at, error_code"
"""What `_plan` reads of a jobs row locked FOR UPDATE."""
_NEW_ROW = (0, "queued", None, None, None, None, None)
"""A job without a row yet, as `_LOCKED_ROW` after its job_id (the table's defaults)."""


_REFRESH_MANY = (
    "SELECT t.job_id, e.seq, e.published, CASE WHEN e.seq > t.top THEN e.body::text END "
    "FROM unnest(%s::uuid[], %s::int[]) AS t(job_id, top) "
    "CROSS JOIN LATERAL (SELECT seq, published, body FROM job_events "
    "WHERE job_id = t.job_id AND (seq > t.top OR NOT published) OFFSET 0) AS e "
    "ORDER BY t.job_id, e.seq"
)
"""Several logs' refresh (ids, known tops): a lookup by job per log, LATERAL and kept from being
flattened into a join by OFFSET 0. As a join the planner hashes the ids and scans all of
job_events while the table is young (thousands of rows): a batch's lock cost O(events ever
written)."""

_MARK_MANY = (
    "UPDATE job_events AS e SET published = true "
    "FROM unnest(%s::uuid[], %s::int[]) AS t(job_id, top) "
    "CROSS JOIN LATERAL (SELECT ctid AS tid FROM job_events "
    "WHERE job_id = t.job_id AND seq <= t.top AND NOT published OFFSET 0) AS m "
    "WHERE e.ctid = m.tid"
)
"""Several logs' publish marks (ids, confirmed tops): the unpublished events found by job, as
`_REFRESH_MANY` finds them, then updated by row address. (A row marked meanwhile by another
writer has moved on, and is skipped: marks only ever go from false to true.)"""


def _array(values: Iterable[uuid.UUID | int]) -> str:
    """A PostgreSQL array literal of UUIDs or integers, for a `%s::uuid[]` / `::int[]` parameter.

    Why: psycopg's list dumper adapts element by element in Python (~4 us a UUID); a batch's
    statements pass tens of ids each. Neither type's text form needs quoting."""
    return "{" + ",".join(map(str, values)) + "}"


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _records(rows: Iterable[dict[str, Any]]) -> str:
    """Rows as one JSON array for `jsonb_to_recordset(%s::jsonb) AS v(col type, ...)`.

    Why: a batch's events and summaries as typed arrays (timestamps, JSON bodies) cost psycopg
    ~1 ms of Python per statement to adapt; one JSON text is built in C and PostgreSQL casts
    each field to the column type named in the query."""
    return json.dumps(list(rows), default=_json_default, separators=(",", ":"))


def _claim_key(job: uuid.UUID) -> int:
    """A job's claim: a stable bigint from its UUID (the single-bigint advisory key space)."""
    return int.from_bytes(job.bytes[:8], "big", signed=True)


def _lock_key(job: uuid.UUID) -> tuple[int, int]:
    """A job's write lock: the same 64 bits in the two-int4 key space (objsubid 2 in pg_locks),
    which never collides with a bigint key."""
    return (
        int.from_bytes(job.bytes[:4], "big", signed=True),
        int.from_bytes(job.bytes[4:8], "big", signed=True),
    )


class PostgresClaim:
    """Who runs a job: a session advisory lock on the store's claims session (see the module
    docstring for why, and for what happens when that session is lost)."""

    def __init__(self, store: PostgresJobStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id
        self._uuid = uuid.UUID(job_id)
        self._key = _claim_key(self._uuid)
        self._generation: int | None = None
        """The claims session generation the lock was taken under; None when not held."""

    @property
    def held(self) -> bool:
        """This object took the claim and released nothing (see `lost`)."""
        return self._generation is not None

    @property
    def lost(self) -> bool:
        """The claim was taken but its session ended since: the server no longer holds it and
        another worker may run the job. As far as this store has noticed (`check_claims`)."""
        return self._generation is not None and self._generation != self.store.claims_generation

    def try_acquire(self) -> bool:
        """Take the claim unless another live holder (this store or any other) has it; never
        blocks. A held claim answers True without a round trip; a lost one is taken afresh.
        A batch of one (PostgresJobStore.acquire)."""
        return self.store.acquire([self])[0]

    def release(self) -> None:
        """Let go (no-op when not held; a late release never frees someone else's claim)."""
        self.store.release([self])


# --- one job's log --------------------------------------------------------------------------


@dataclass
class _Planned:
    """What one log's part of a sync transaction will write."""

    final: list[JobEvent]
    stale: bool
    """Another writer got in: the log's view of the job must be reloaded."""
    row: dict[str, Any] | None
    """The jobs row's new summary columns by name (None when nothing is inserted)."""


class PostgresJobLog:
    """One job's events in job_events (see the module docstring). Used by one thread at a time,
    like a journal; the store behind it is shared."""

    def __init__(
        self,
        store: PostgresJobStore,
        job_id: str,
        *,
        queued: JobEvent | None = None,
        fsync: bool = True,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self._uuid = uuid.UUID(job_id)
        self.queued = queued
        """The job's `queued` event as its producer published it: the first writer records it
        before its own event (seq 1)."""
        self.fsync = fsync
        self._events: list[JobEvent] = []
        """The job's committed events 1..n as last loaded (events are immutable once written)."""
        self._stale = True
        self._mark = 0
        """Every event up to this seq was confirmed by the broker (published=true)."""
        self._locked = False
        self._lock_generation: int | None = None
        self._buffer: list[JobEvent] = []
        """Written, not yet synced (provisional seqs)."""
        self._auto_queued: JobEvent | None = None
        """The `queued` event write() put first in the buffer because the log looked empty."""
        self._written: list[JobEvent] = []
        """Synced, not yet handed to the publisher."""
        self._last_synced: list[JobEvent] = []
        self._inflight: dict[int, tuple[JobEvent, Future[None] | None]] = {}

    # --- reading --------------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Load the events after the ones known, and the published mark, in one query."""
        with self.store._pool.connection() as conn:
            rows = conn.execute(
                "SELECT seq, published, CASE WHEN seq > %(top)s THEN body::text END "
                "FROM job_events WHERE job_id = %(job)s AND (seq > %(top)s OR NOT published) "
                "ORDER BY seq",
                {"job": self._uuid, "top": self._top},
            ).fetchall()
        self._apply(rows)

    @property
    def _top(self) -> int:
        return self._events[-1].seq if self._events else 0

    def _apply(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Take in a refresh's rows (seq, published, body if after `_top`), ordered by seq."""
        top = self._top
        fresh = [r for r in rows if r[0] > top]
        if top and fresh and fresh[0][0] != top + 1:  # the log changed under us: start over
            self._events = []
            self._stale = True
            self._refresh()
            return
        self._events.extend(JobEvent.model_validate_json(r[2]) for r in fresh)
        unpublished = [r[0] for r in rows if not r[1]]
        self._mark = min(unpublished) - 1 if unpublished else self._top
        self._stale = not self._locked

    def events(self) -> list[JobEvent]:
        """All events so far, ordered by seq; under the job lock, with the written ones."""
        if self._stale or not self._locked:
            self._refresh()
        return [*self._events, *self._buffer]

    def terminal(self) -> JobEvent | None:
        """The event that ended the job; None while open (a `replayed` reopens a dead letter)."""
        return ended(self.events())

    # --- the job lock ---------------------------------------------------------------------------

    def lock(self, claim: object | None = None) -> None:
        """Take the job lock (blocking) and load the job's events; several at once only in
        job-id order (PostgresJobStore.lock; this is a batch of one). The claim is accepted
        for the interface and not needed: the job lock is a session advisory lock of its own,
        held for a step or a batch (not for the job)."""
        self.store.lock([self])

    def unlock(self) -> None:
        """Let go of the job lock; events written but not synced are dropped (never durable,
        never published)."""
        self.store.unlock([self])

    # --- writing --------------------------------------------------------------------------------

    def append(
        self,
        event_type: EventType,
        payload: EventPayload | None,
        publish: Publish,
        *,
        wait: bool = True,
    ) -> JobEvent | None:
        """Append one event: written, committed, published and (unless wait=False) confirmed;
        None if the job already ended. wait=False returns once the event is committed and
        handed to the publisher; the next waiting append, and every terminal event, first
        makes sure all earlier events were confirmed. Takes the job lock for the call unless
        this object holds it already."""
        if not self._locked:
            self.lock()
            try:
                return self.append(event_type, payload, publish, wait=wait)
            finally:
                self.unlock()
        if self.write(event_type, payload, publish) is None:
            return None
        self.store.sync([self])
        final = self._last_synced
        self.publish_written(publish)
        if not final:
            return None  # another writer ended the job in between
        event = final[-1]
        if wait or event.terminal:
            self.settle(publish)
        return event

    def write(
        self, event_type: EventType, payload: EventPayload | None, publish: Publish
    ) -> JobEvent | None:
        """Under the held lock: buffer the job's next event (its seq is provisional until
        `store.sync`). None if the job already ended (`replayed`: unless jobstore.may_write
        allows it). Events an earlier writer left unconfirmed are republished first, so the
        stream keeps seq order."""
        assert self._locked, "write() needs the job lock"
        events = self.events()
        self._flush_outbox(events, publish)
        if not may_write(events, event_type):
            return None
        if not events and event_type != "queued":
            # seq 1 is the producer's `queued`, already in the stream: record it (and publish it
            # again, first: watchers drop the duplicate, and the stream keeps seq order).
            first = self.queued or JobEvent(job_id=self.job_id, seq=1, type="queued", ts=utcnow())
            self._buffer.append(first)
            self._auto_queued = first
        top = self._buffer[-1].seq if self._buffer else (events[-1].seq if events else 0)
        event = JobEvent(
            job_id=self.job_id,
            seq=top + 1,
            type=event_type,
            ts=utcnow(),
            payload=payload or EventPayload(),
        )
        self._buffer.append(event)
        return event

    def _plan(self, row: tuple[Any, ...]) -> _Planned:
        """This log's part of a sync, given its jobs row locked FOR UPDATE: (job_id, last_seq,
        state, tier, created_at, started_at, finished_at, error_code)."""
        _, last_seq, state, tier, created, started, finished, code = row
        known = self._events[-1].seq if self._events else 0
        buffered = list(self._buffer)
        stale = last_seq != known
        reopens = bool(buffered) and buffered[0].type == "replayed"
        if state in TERMINAL_EVENTS and not (reopens and state == "dead_lettered" and not stale):
            return _Planned([], stale=True, row=None)  # nothing after the end (but a replay)
        if stale and any(e.type == "replayed" for e in buffered):
            # A replay was checked against the events it follows; someone wrote meanwhile.
            return _Planned([], stale=True, row=None)
        if stale:
            # Another writer got in since this log was loaded: nothing buffered was published,
            # so renumber after its events; its `queued` already stands first.
            if last_seq > 0 and buffered and buffered[0] is self._auto_queued:
                buffered = buffered[1:]
            buffered = [
                e.model_copy(update={"seq": last_seq + i}) for i, e in enumerate(buffered, 1)
            ]
        if not buffered:
            return _Planned([], stale=stale, row=None)
        for event in buffered:  # facefleet.jobstore.summarize, one event at a time
            if event.type == "queued":
                tier, created = event.payload.tier, event.ts
            elif event.type == "started" and state == "queued":
                state = "running"
            elif event.type == "replayed":  # open again (summarize's rule)
                state, finished, code = "queued", None, None
            if event.type == "started" and started is None:
                started = event.ts
            if event.terminal:
                state, finished, code = event.type, event.ts, event.payload.code
        if created is None:
            created = buffered[0].ts
        return _Planned(
            buffered,
            stale=stale,
            row=dict(
                zip(
                    (name for name, _ in _SYNC_COLUMNS),
                    (
                        self._uuid,
                        state,
                        tier,
                        created,
                        started,
                        finished,
                        code,
                        buffered[-1].seq,
                        *_owner_and_gpu(buffered),
                    ),
                    strict=True,
                )
            ),
        )

    def _synced(self, planned: _Planned) -> None:
        """The sync transaction committed."""
        self._buffer, self._auto_queued = [], None
        if planned.stale:
            self._stale = True
        else:
            self._events.extend(planned.final)
        self._written.extend(planned.final)
        self._last_synced = planned.final

    def replay(self, replayed_by: str, publish: Publish) -> JobEvent:
        """Open a dead-lettered job again (see jobstore.JobLog.replay); the jobs row goes back
        to `queued` (finished_at and error_code cleared) in the same transaction."""
        return replay_log(self, replayed_by, publish)

    def publish_written(self, publish: Publish) -> None:
        """Hand every synced event to the publisher, in seq order. Events written but not
        synced yet are synced first (one transaction for this log)."""
        if self._buffer:
            self.store.sync([self])
        written, self._written = self._written, []
        for event in written:
            self._inflight[event.seq] = (event, publish(event))

    def settle(self, publish: Publish) -> None:
        """Wait for every in-flight publish; republish failures once; mark the confirmed
        events published (PostgresJobStore.settle, a batch of one)."""
        self.store.settle([self], publish)

    def _await(self, publish: Publish) -> int:
        """Wait for every in-flight publish (republishing failures once); the highest seq
        that is now confirmed, 0 if none was in flight."""
        top = 0
        for seq in sorted(self._inflight):
            event, fut = self._inflight.pop(seq)
            top = seq
            if fut is None:
                continue
            try:
                fut.result(timeout=60)
            except Exception:
                again = publish(event)
                if again is not None:
                    again.result(timeout=60)
        return top

    def _flush_outbox(self, events: list[JobEvent], publish: Publish) -> None:
        """Republish events a crashed or failed writer left unconfirmed (not ours in flight)."""
        mine = {e.seq for e in self._written} | {e.seq for e in self._buffer}
        pending = [
            e
            for e in events
            if e.seq > self._mark and e.seq not in self._inflight and e.seq not in mine
        ]
        if not pending:
            return
        for event in pending:
            self._inflight[event.seq] = (event, publish(event))
        self.settle(publish)


# --- the store ------------------------------------------------------------------------------

_SUMMARY = (
    "job_id, state, tier, created_at, finished_at, error_code, last_seq, api_key_id, gpu_seconds"
)


class PostgresJobStore:
    """Job state in PostgreSQL; thread-safe (job threads share one store).

    url: postgresql://user[:password]@host[:port]/db[?...]; the URL's own parameters win over
        the defaults below (its `options` are appended to ours).
    concurrency: how many jobs this process runs at once; the pool's max_size defaults to
        4 + concurrency.
    min_size / max_size: the statement pool's bounds.
    statement_timeout_s: every statement's server-side limit (default 15 s).
    connect_timeout_s: how long a connection attempt may take (libpq rounds to >= 2 s).
    keepalives_idle_s / keepalives_interval_s / keepalives_count: TCP keepalives, set on the
        client (libpq) and for the server's side of each session: a dead worker node's claims
        are dropped after about idle + count * interval seconds (25 s by default).
    claims_url: where the claims session connects (default: url); must be direct or a
        session-mode pooler, never a transaction-mode one (see the module docstring).
    prepare_threshold: psycopg's, for the pooled connections (None behind PgBouncer < 1.21
        in transaction mode).
    check_connections: check a pooled connection before a use if it sat idle in the pool for
        `check_idle_s` or more (one round trip; survives a server restart without failing the
        first statement on each stale connection; a connection returned moments ago is not
        checked again: busy workers would pay a round trip per statement).
    pool_timeout_s: how long a statement waits for a pooled connection (all busy, or the
        server unreachable) before psycopg_pool.PoolTimeout.

    Start-up checks: the server answers (else StoreError naming host:port and the cause, never
    the password) and the schema is this build's (behind: StoreError saying to run
    `facefleet store migrate`; ahead: StoreError saying the build is older than the schema).
    """

    def __init__(
        self,
        url: str,
        *,
        concurrency: int = 1,
        min_size: int = 1,
        max_size: int | None = None,
        statement_timeout_s: float = 15.0,
        connect_timeout_s: float = 10.0,
        keepalives_idle_s: int = 10,
        keepalives_interval_s: int = 5,
        keepalives_count: int = 3,
        claims_url: str | None = None,
        application_name: str = "facefleet",
        prepare_threshold: int | None = 5,
        check_connections: bool = True,
        check_idle_s: float = 2.0,
        pool_timeout_s: float = 5.0,
    ) -> None:
        self.url = redact(url)
        """The URL without its password (safe to print)."""
        common: dict[str, Any] = {
            "connect_timeout_s": connect_timeout_s,
            "statement_timeout_s": statement_timeout_s,
            "keepalives_idle_s": keepalives_idle_s,
            "keepalives_interval_s": keepalives_interval_s,
            "keepalives_count": keepalives_count,
            "application_name": application_name,
        }
        self._params = _Params(url, **common)
        claims = _Params(claims_url, **common) if claims_url else self._params
        claims_options = [*claims.options, "-c idle_session_timeout=0"]
        # The start-up check's connection becomes the claims session when both use one URL.
        first = self._params.connect(options=None if claims_url else claims_options)
        try:
            self._check_schema(first)
        except BaseException:
            first.close()
            raise
        if claims_url:
            first.close()
            first = claims.connect(options=claims_options)

        def connect_claims() -> Connection:
            return claims.connect(options=claims_options)

        self._session = _ClaimsSession(connect_claims, first)
        self._registry = threading.Lock()
        self._claimed: dict[uuid.UUID, PostgresClaim] = {}
        self._writers = threading.Condition()
        self._writing: set[uuid.UUID] = set()
        self._closed = False
        self._check_idle_s = check_idle_s
        self._returned_at: weakref.WeakKeyDictionary[Connection, float] = (
            weakref.WeakKeyDictionary()
        )
        pool_kwargs = self._params.conninfo_kwargs()
        pool_kwargs.update(autocommit=True, prepare_threshold=prepare_threshold)
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            "",
            kwargs=pool_kwargs,
            min_size=min_size,
            max_size=max_size if max_size is not None else 4 + max(1, concurrency),
            name="facefleet-jobstore",
            timeout=pool_timeout_s,
            check=self._check_if_idle if check_connections else None,
            reset=self._returned_now,
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=max(5.0, connect_timeout_s))
        except Exception as exc:
            self._session.close()
            self._pool.close()
            raise self._params.error(exc) from None

    def _check_if_idle(self, conn: Connection) -> None:
        """The pool's check: a round trip only for a connection idle long enough to have gone
        stale (a server restart, a pooler's idle timeout)."""
        if time.monotonic() - self._returned_at.get(conn, float("-inf")) >= self._check_idle_s:
            ConnectionPool.check_connection(conn)

    def _returned_now(self, conn: Connection) -> None:
        self._returned_at[conn] = time.monotonic()

    def _check_schema(self, conn: Connection) -> None:
        have, need = schema_version(conn), latest_version()
        if have < need:
            raise StoreError(
                f"job store schema at version {have}, this build needs {need}: run "
                "`facefleet store migrate`"
            )
        if have > need:
            oldest = oldest_compatible_build(conn, need)
            if oldest > need:
                raise StoreError(
                    f"job store schema at version {have}, but this build knows only up to "
                    f"{need} and its later migrations need builds of version {oldest} or "
                    "later: this build is older than the schema; run a newer facefleet"
                )
            log.info(
                "job store schema at version %d, ahead of this build's %d; its later migrations "
                "run with this build",
                have,
                need,
            )

    def __enter__(self) -> PostgresJobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- claims and job locks -------------------------------------------------------------------

    @property
    def claims_generation(self) -> int:
        """Bumped every time the claims session is found broken: every claim and job lock taken
        under an older generation is gone (PostgresClaim.lost)."""
        return self._session.generation

    @property
    def claims_backend_pid(self) -> int | None:
        """The server process of the claims session (for operators and tests)."""
        return self._session.backend_pid()

    def check_claims(self) -> list[str]:
        """Ping the claims session; the job ids of claims this store's callers hold that the
        server no longer does (their session ended), until each is released. Empty: all fine.
        The worker gives those jobs back: another worker may run them already."""
        self._session.ping()
        with self._registry:
            return sorted(c.job_id for c in self._claimed.values() if c.lost)

    def claim(self, job_id: str) -> PostgresClaim:
        return PostgresClaim(self, job_id)

    def _forget_claim(self, claim: PostgresClaim) -> None:
        with self._registry:
            if self._claimed.get(claim._uuid) is claim:
                del self._claimed[claim._uuid]

    def _reserve(self, job: uuid.UUID) -> None:
        """The job's write lock among this store's threads (they share one session, where an
        advisory lock is re-entrant)."""
        with self._writers:
            while job in self._writing:
                self._writers.wait()
            self._writing.add(job)

    def _server_lock(self, job: uuid.UUID) -> int:
        delay = 0.001
        while True:
            ok, generation = self._session.call(
                "SELECT pg_try_advisory_lock(%s::int, %s::int)", _lock_key(job)
            )
            if ok:
                return int(generation)
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _unlock_jobs(self, jobs: Sequence[tuple[uuid.UUID, int | None]]) -> None:
        """Let go of write locks (one statement per session generation; locks of an older
        generation died with their session), then of the in-process reservations."""
        try:
            by_generation: dict[int, list[uuid.UUID]] = {}
            for job, generation in jobs:
                if generation is not None:
                    by_generation.setdefault(generation, []).append(job)
            for generation, held in by_generation.items():
                self._release_server_locks(held, generation)
        finally:
            with self._writers:
                for job, _ in jobs:
                    self._writing.discard(job)
                self._writers.notify_all()

    # --- batch operations (facefleet.jobstore: one statement each for a whole batch) ---------

    def acquire(self, claims: Sequence[Claim]) -> list[bool]:
        out = [False] * len(claims)
        todo: list[tuple[int, PostgresClaim]] = []
        for i, claim in enumerate(claims):
            if not isinstance(claim, PostgresClaim):
                raise TypeError(f"not a PostgresClaim: {type(claim).__name__}")
            if claim.held:
                if not claim.lost:
                    out[i] = True
                    continue
                claim.release()
            with self._registry:
                other = self._claimed.get(claim._uuid)
                if other is not None and other is not claim:
                    continue  # held by another claim object of this store (or in this batch)
                self._claimed[claim._uuid] = claim
            todo.append((i, claim))
        if not todo:
            return out
        try:
            oks, generation = self._session.call(
                "SELECT array_agg(pg_try_advisory_lock(k) ORDER BY n) "
                "FROM unnest(%s::bigint[]) WITH ORDINALITY AS t(k, n)",
                (_array(claim._key for _, claim in todo),),
            )
        except BaseException:
            for _, claim in todo:
                self._forget_claim(claim)
            raise
        for (i, claim), ok in zip(todo, oks, strict=True):
            if ok:
                claim._generation = generation
                out[i] = True
            else:
                self._forget_claim(claim)
        return out

    def release(self, claims: Sequence[Claim]) -> None:
        held: dict[int, list[PostgresClaim]] = {}
        for claim in claims:
            if not isinstance(claim, PostgresClaim):
                raise TypeError(f"not a PostgresClaim: {type(claim).__name__}")
            generation, claim._generation = claim._generation, None
            if generation is not None:
                held.setdefault(generation, []).append(claim)
        try:
            for generation, group in held.items():
                self._session.release(
                    "SELECT count(pg_advisory_unlock(k)) FROM unnest(%s::bigint[]) AS t(k)",
                    (_array(claim._key for claim in group),),
                    generation,
                )
        finally:
            for group in held.values():
                for claim in group:
                    self._forget_claim(claim)

    def lock(self, logs: Sequence[JobLog], claims: Sequence[Claim | None] = ()) -> None:
        """Reserve each job in this process (job-id order), try every server lock in one
        statement, poll for the ones another process holds (in order, after letting go of
        the later ones, so two batches never wait on each other), load every log in one
        query."""
        todo = sorted(
            {id(lg): lg for lg in map(_pg_log, logs) if not lg._locked}.values(),
            key=lambda lg: lg._uuid,
        )
        if len({lg._uuid for lg in todo}) != len(todo):
            raise ValueError("lock: two logs of one job")
        reserved: list[PostgresJobLog] = []
        locked: list[tuple[PostgresJobLog, int]] = []
        try:
            for lg in todo:
                self._reserve(lg._uuid)
                reserved.append(lg)
            if todo:
                keys = [_lock_key(lg._uuid) for lg in todo]
                oks, generation = self._session.call(
                    "SELECT array_agg(pg_try_advisory_lock(a, b) ORDER BY n) "
                    "FROM unnest(%s::int[], %s::int[]) WITH ORDINALITY AS t(a, b, n)",
                    (_array(a for a, _ in keys), _array(b for _, b in keys)),
                )
                first_miss = next((i for i, ok in enumerate(oks) if not ok), len(todo))
                locked = [(lg, int(generation)) for lg in todo[:first_miss]]
                later = [lg._uuid for lg, ok in zip(todo, oks, strict=True) if ok]
                later = later[first_miss:]
                if later:
                    self._release_server_locks(later, int(generation))
                for lg in todo[first_miss:]:
                    locked.append((lg, self._server_lock(lg._uuid)))
        except BaseException:
            held = dict((lg._uuid, g) for lg, g in locked)
            self._unlock_jobs([(lg._uuid, held.get(lg._uuid)) for lg in reserved])
            raise
        for lg, generation in locked:
            lg._locked, lg._stale, lg._lock_generation = True, True, generation
        try:
            self._refresh_all(todo)
        except BaseException:
            self.unlock(todo)
            raise

    def _release_server_locks(self, jobs: Sequence[uuid.UUID], generation: int) -> None:
        keys = [_lock_key(job) for job in jobs]
        self._session.release(
            "SELECT count(pg_advisory_unlock(a, b)) FROM unnest(%s::int[], %s::int[]) AS t(a, b)",
            (_array(a for a, _ in keys), _array(b for _, b in keys)),
            generation,
        )

    def _refresh_all(self, logs: Sequence[PostgresJobLog]) -> None:
        """PostgresJobLog._refresh for several logs in one query."""
        if not logs:
            return
        if len(logs) == 1:
            logs[0]._refresh()
            return
        by_id = {lg._uuid: lg for lg in logs}
        with self._pool.connection() as conn:
            rows = conn.execute(
                _REFRESH_MANY,
                (_array(lg._uuid for lg in logs), _array(lg._top for lg in logs)),
            ).fetchall()
        grouped: dict[uuid.UUID, list[tuple[Any, ...]]] = {job: [] for job in by_id}
        for row in rows:
            grouped[row[0]].append(row[1:])
        for job, lg in by_id.items():
            lg._apply(grouped[job])

    def unlock(self, logs: Sequence[JobLog]) -> None:
        held: list[tuple[uuid.UUID, int | None]] = []
        for lg in map(_pg_log, logs):
            if not lg._locked:
                continue
            lg._buffer, lg._auto_queued = [], None
            lg._locked, lg._stale = False, True
            generation, lg._lock_generation = lg._lock_generation, None
            held.append((lg._uuid, generation))
        if held:
            self._unlock_jobs(held)

    def settle(self, logs: Sequence[JobLog], publish: Publish) -> None:
        """Every log's confirms awaited, then one UPDATE for all their publish marks."""
        marks = [(lg, lg._await(publish)) for lg in map(_pg_log, logs)]
        self._write_marks(marks)

    def _write_marks(self, marks: Sequence[tuple[PostgresJobLog, int]]) -> None:
        """Record publish marks (events up to each seq confirmed): a hint; if it is lost, the
        next writer republishes and watchers drop the duplicate seq."""
        todo = [(lg, seq) for lg, seq in marks if seq > lg._mark]
        if not todo:
            return
        try:
            with self._pool.connection() as conn, conn.transaction():
                # A hint: its commit need not wait for the WAL flush (a crash loses at most the
                # last marks, and their events are published again).
                conn.execute("SET LOCAL synchronous_commit = off")
                conn.execute(
                    _MARK_MANY,
                    (_array(lg._uuid for lg, _ in todo), _array(seq for _, seq in todo)),
                )
        except psycopg.Error as exc:
            jobs = ", ".join(lg.job_id for lg, _ in todo[:3])
            log.warning("could not record publish marks (jobs %s...): %s", jobs, exc)
            return
        for lg, seq in todo:
            lg._mark = seq

    # --- logs -----------------------------------------------------------------------------------

    def log(
        self, job_id: str, *, queued: JobEvent | None = None, fsync: bool = True
    ) -> PostgresJobLog:
        return PostgresJobLog(self, job_id, queued=queued, fsync=fsync)

    def sync(self, logs: Sequence[object]) -> None:
        """Write every buffered event of the given logs in ONE transaction (the batch lane's
        group commit): the jobs rows are locked FOR UPDATE in job-id order; buffered events
        are renumbered after a row's last_seq if another writer got in, dropped if the job
        already ended, inserted, and the row's summary updated; a job without a row gets it
        inserted with its summary (one row version). With only
        fsync=False logs the commit does not wait for the WAL flush."""
        pending: dict[int, PostgresJobLog] = {}
        for item in logs:
            if not isinstance(item, PostgresJobLog):
                raise TypeError(f"not a PostgresJobLog: {type(item).__name__}")
            if item._buffer:
                pending[id(item)] = item
        if not pending:
            return
        batch = sorted(pending.values(), key=lambda lg: lg._uuid)
        if len({lg._uuid for lg in batch}) != len(batch):
            raise ValueError("sync: two logs of one job (only one may hold its lock)")
        plans: dict[uuid.UUID, _Planned] = {}
        created: set[uuid.UUID] = set()
        with self._pool.connection() as conn, conn.transaction():
            if all(not lg.fsync for lg in batch):
                conn.execute("SET LOCAL synchronous_commit = off")
            todo = batch
            while todo:
                # Existing rows are locked and planned on; a job without a row yet gets it
                # inserted with its planned summary at once (one row version, not a default
                # row and then an UPDATE). A row someone else created in between (the
                # gateway's record_submitted) is taken on the next round, like an old one.
                rows = conn.execute(
                    f"SELECT {_LOCKED_ROW} FROM jobs "
                    "WHERE job_id = ANY(%s::uuid[]) ORDER BY job_id FOR UPDATE",
                    (_array(lg._uuid for lg in todo),),
                ).fetchall()
                by_id = {r[0]: r for r in rows}
                fresh: dict[uuid.UUID, _Planned] = {}
                for lg in todo:
                    row = by_id.get(lg._uuid)
                    plan = lg._plan(row if row is not None else (lg._uuid, *_NEW_ROW))
                    if row is None and plan.row is not None:
                        fresh[lg._uuid] = plan
                    else:  # an existing row, or nothing to write (no row needed)
                        plans[lg._uuid] = plan
                inserted: set[uuid.UUID] = set()
                if fresh:
                    inserted = {
                        r[0]
                        for r in conn.execute(
                            f"INSERT INTO jobs ({_SYNC_NAMES}) SELECT {_SYNC_NAMES} "
                            f"FROM jsonb_to_recordset(%s::jsonb) AS v({_SYNC_RECORD}) "
                            "ON CONFLICT DO NOTHING RETURNING job_id",
                            (_records(p.row for p in fresh.values() if p.row is not None),),
                        ).fetchall()
                    }
                for job in inserted:
                    plans[job] = fresh.pop(job)
                created |= inserted
                todo = [lg for lg in todo if lg._uuid in fresh]
            ordered = [plans[lg._uuid] for lg in batch]
            events = [(lg._uuid, e) for lg, p in zip(batch, ordered, strict=True) for e in p.final]
            if events:
                conn.execute(
                    "INSERT INTO job_events (job_id, seq, type, ts, body) "
                    "SELECT job_id, seq, type, ts, body::jsonb FROM jsonb_to_recordset(%s::jsonb) "
                    "AS v(job_id uuid, seq int, type text, ts timestamptz, body text)",
                    (
                        _records(
                            {
                                "job_id": job,
                                "seq": e.seq,
                                "type": e.type,
                                "ts": e.ts,
                                "body": e.encode().decode(),
                            }
                            for job, e in events
                        ),
                    ),
                )
            updating = [p.row for job, p in plans.items() if p.row and job not in created]
            if updating:
                conn.execute(
                    "UPDATE jobs AS j SET state = v.state, tier = v.tier, "
                    "created_at = v.created_at, started_at = v.started_at, "
                    "finished_at = v.finished_at, error_code = v.error_code, "
                    "last_seq = v.last_seq, updated_at = now(), "
                    "api_key_id = coalesce(v.api_key_id, j.api_key_id), "
                    "gpu_seconds = coalesce(v.gpu_seconds, j.gpu_seconds) "
                    f"FROM jsonb_to_recordset(%s::jsonb) AS v({_SYNC_RECORD}) "
                    "WHERE j.job_id = v.job_id",
                    (_records(updating),),
                )
        for lg, plan in zip(batch, ordered, strict=True):
            lg._synced(plan)

    # --- cancel markers -------------------------------------------------------------------------

    def cancel_reasons(self, job_ids: Sequence[str]) -> dict[str, str]:
        if not job_ids:
            return {}
        ids = [uuid.UUID(job_id) for job_id in job_ids]
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT job_id, cancel_reason FROM jobs "
                "WHERE job_id = ANY(%s::uuid[]) AND cancel_reason IS NOT NULL",
                (_array(ids),),
            ).fetchall()
        return {str(job): str(reason) or "cancelled" for job, reason in rows}

    def request_cancel(self, job_id: str, reason: str) -> None:
        """Record a cancel request; the first reason wins (a job may not exist yet)."""
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO jobs (job_id, cancel_reason, cancel_requested_at) "
                "VALUES (%s, %s, now()) ON CONFLICT (job_id) DO UPDATE SET "
                "cancel_reason = coalesce(jobs.cancel_reason, excluded.cancel_reason), "
                "cancel_requested_at = coalesce(jobs.cancel_requested_at, "
                "excluded.cancel_requested_at), updated_at = now()",
                (uuid.UUID(job_id), reason),
            )

    # --- queries --------------------------------------------------------------------------------

    def list_jobs(
        self,
        *,
        state: JobState | None = None,
        tier: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
        api_key_id: str | None = None,
    ) -> JobPage:
        """jobstore.page_of in SQL (keyset pagination): newest created_at first, then job id;
        the same rows, order and cursors as the file backend."""
        if not 1 <= limit <= 1000:
            raise ValueError("limit must be 1..1000")
        where = ["last_seq > 0"]
        params: list[Any] = []
        if api_key_id is not None:
            where.append("api_key_id = %s")
            params.append(api_key_id)
        if state is not None:
            where.append("state = %s")
            params.append(state)
        if tier is not None:
            where.append("tier = %s")
            params.append(tier)
        if since is not None:
            if since.tzinfo is None:
                raise ValueError("since needs a time zone")
            where.append("created_at >= %s")
            params.append(since)
        if cursor is not None:
            after_ts, after_id = decode_cursor(cursor)
            try:
                after = uuid.UUID(after_id)
            except ValueError:
                raise ValueError(f"bad cursor {cursor!r}") from None
            if after_ts is None:
                return JobPage([], None)  # only rows without a creation time follow: none here
            where.append("(created_at < %s OR (created_at = %s AND job_id > %s))")
            params += [after_ts, after_ts, after]
        params.append(limit + 1)
        with self._pool.connection() as conn:
            rows = conn.execute(
                cast(
                    Any,
                    f"SELECT {_SUMMARY} FROM jobs WHERE {' AND '.join(where)} "
                    "ORDER BY created_at DESC, job_id LIMIT %s",
                ),
                params,
            ).fetchall()
        page = [_summary(r) for r in rows[:limit]]
        return JobPage(page, encode_cursor(page[-1]) if len(rows) > limit and page else None)

    def get_job(self, job_id: str) -> JobSummary | None:
        with self._pool.connection() as conn:
            row = conn.execute(
                f"SELECT {_SUMMARY} FROM jobs WHERE job_id = %s AND last_seq > 0",
                (uuid.UUID(job_id),),
            ).fetchone()
        return _summary(row) if row else None

    # --- per API key: the gateway's listing, usage and limits ------------------------------------

    def record_submitted(self, job: JobRequest) -> bool:
        """The job's `queued` event (published and confirmed by its producer) as seq 1 with
        published=true, and its jobs row, in one transaction, if the job has no events yet.

        No job lock is needed: the row is locked FOR UPDATE, as every sync locks it, so this
        and a worker's first write are ordered; a worker that loaded the empty log before
        finds last_seq moved at its sync and drops its own copy of the `queued` event (the
        stale-log renumbering in `_plan`). The event is already in the stream, so marking it
        published keeps the outbox from sending it again."""
        event = queued_event(job)
        job_uuid = uuid.UUID(job.job_id)
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO jobs (job_id) VALUES (%s) ON CONFLICT DO NOTHING", (job_uuid,)
            )
            row = conn.execute(
                "SELECT last_seq FROM jobs WHERE job_id = %s FOR UPDATE", (job_uuid,)
            ).fetchone()
            if row is None or int(row[0]) > 0:
                return False
            conn.execute(
                "INSERT INTO job_events (job_id, seq, type, ts, body, published) "
                "VALUES (%s, 1, 'queued', %s, %s::jsonb, true)",
                (job_uuid, event.ts, event.encode().decode()),
            )
            conn.execute(
                "UPDATE jobs SET state = 'queued', tier = %s, created_at = %s, last_seq = 1, "
                "api_key_id = %s, updated_at = now() WHERE job_id = %s",
                (event.payload.tier, event.ts, job.api_key_id, job_uuid),
            )
        return True

    def usage(self, api_key_id: str, *, since: datetime | None = None) -> Usage:
        """jobstore.usage_of in SQL (index jobs_key_created_idx)."""
        check_since(since)
        where = "api_key_id = %s AND last_seq > 0"
        params: list[Any] = [api_key_id]
        if since is not None:
            where += " AND created_at >= %s"
            params.append(since)
        with self._pool.connection() as conn:
            rows = conn.execute(
                cast(
                    Any,
                    "SELECT state, count(*), coalesce(sum(gpu_seconds), 0) "
                    f"FROM jobs WHERE {where} GROUP BY state",
                ),
                params,
            ).fetchall()
        jobs = {str(state): int(n) for state, n, _ in rows}
        gpu = sum(float(g) for _, _, g in rows)
        return Usage(api_key_id, since, jobs, round(gpu, 6))

    def active_count(self, api_key_id: str) -> int:
        """The key's queued and running jobs (partial index jobs_key_active_idx)."""
        with self._pool.connection() as conn:
            row = conn.execute(
                f"SELECT count(*) FROM jobs WHERE api_key_id = %s AND last_seq > 0 "
                f"AND state IN ({_ACTIVE_SQL})",
                (api_key_id,),
            ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._pool.close()
        finally:
            self._session.close()


def _summary(row: tuple[Any, ...]) -> JobSummary:
    job_id, state, tier, created, finished, code, last_seq, key, gpu = row
    return JobSummary(
        job_id=str(job_id),
        state=str(state),
        tier=tier,
        created_at=created,
        finished_at=finished,
        error_code=cast("ErrorCode | None", code),
        last_seq=int(last_seq),
        api_key_id=key,
        gpu_seconds=None if gpu is None else float(gpu),
    )


_ACTIVE_SQL = ", ".join(f"'{state}'" for state in ACTIVE_STATES)
"""Literal, so the planner can use the partial index jobs_key_active_idx (same states)."""


def _owner_and_gpu(events: Sequence[JobEvent]) -> tuple[str | None, float | None]:
    """The jobs row's api_key_id and gpu_seconds from events being added (None: unchanged)."""
    found = owner_and_gpu(events)
    return found["api_key_id"], found["gpu_seconds"]
