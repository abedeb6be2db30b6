"""Operator commands on the job store: `facefleet store migrate`, `facefleet jobs list|show`,
`facefleet dead list|replay` (dead letters: list them, re-queue them).

They read FACEFLEET_STORE_URL (or the journals under FACEFLEET_DATA_ROOT) through
facefleet.jobstore only, so they work the same on both backends. Exit codes: 0 ok, 1 no such
job, 2 settings or usage error (an unreachable store, a schema behind the code).
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import socket
import sys
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pika

from facefleet.jobstore import (
    REPLAY_HEADER,
    JobStore,
    JobSummary,
    ReplayRefused,
    StoreError,
    replay_refusal,
)
from facefleet.settings import CommonSettings, SettingsError, die
from facefleet.storage import StorageError
from facefleet.wire import (
    CONTENT_TYPE,
    DEAD_QUEUE,
    HEADER_JOB_ID,
    HEADER_SCHEMA,
    JOBS_EXCHANGE,
    SCHEMA_VERSION,
    DecodeError,
    JobRequest,
    check_tier,
    utcnow,
)

if TYPE_CHECKING:
    from pika.adapters.blocking_connection import BlockingChannel

    from facefleet.media import MediaStore

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> datetime:
    """`90s`, `15m`, `1h`, `7d` ago, or an ISO 8601 time."""
    match = _DURATION.match(text.strip())
    if match:
        return utcnow() - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use a duration like 90s, 15m, 1h, 7d or an ISO 8601 time"
        ) from exc
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give a time zone (e.g. ...Z or +00:00)")
    return when


def register(sub: Any, name: str) -> None:
    if name == "store":
        p = sub.add_parser(name, help="job store administration")
        p.add_argument("action", choices=["migrate", "check"])
        p.set_defaults(func=cmd_store)
    elif name == "jobs":
        p = sub.add_parser(name, help="list and inspect jobs in the job store")
        actions = p.add_subparsers(dest="action", required=True)
        ls = actions.add_parser("list", help="jobs, newest first")
        ls.add_argument("--state", help="queued, running, completed, failed, dead_lettered, ...")
        ls.add_argument("--tier")
        ls.add_argument("--since", type=parse_since, help="e.g. 1h, 30m, 7d, or ISO 8601")
        ls.add_argument("--limit", type=int, default=50)
        ls.add_argument("--cursor", help="from the previous page's last line")
        ls.add_argument("--json", action="store_true", help="one JSON object per line")
        ls.set_defaults(func=cmd_jobs_list)
        show = actions.add_parser("show", help="one job: its state and every event")
        show.add_argument("job_id")
        show.add_argument("--json", action="store_true")
        show.set_defaults(func=cmd_jobs_show)
    elif name == "dead":
        p = sub.add_parser(name, help="list and replay dead-lettered jobs")
        actions = p.add_subparsers(dest="action", required=True)
        ls = actions.add_parser("list", help="dead-lettered jobs: why and when")
        ls.add_argument("--tier")
        ls.add_argument(
            "--since", type=parse_since, help="dead-lettered since: e.g. 1h, 7d, or ISO 8601"
        )
        ls.add_argument("--limit", type=int, default=100)
        ls.add_argument("--json", action="store_true", help="one JSON object per line")
        ls.set_defaults(func=cmd_dead_list)
        rp = actions.add_parser(
            "replay",
            help="re-queue a dead-lettered job (or a tier's) with a fresh attempt budget",
        )
        rp.add_argument("job_id", nargs="?", help="the job to replay")
        rp.add_argument("--tier", help="replay every dead-lettered job of the tier instead")
        rp.add_argument("--limit", type=int, default=100, help="with --tier: at most this many")
        rp.add_argument("--by", help="who replays (recorded in the event; default cli:user@host)")
        rp.add_argument(
            "--scan",
            type=int,
            default=DEFAULT_SCAN,
            help=f"parked messages to look at for the job's copy (default {DEFAULT_SCAN})",
        )
        rp.add_argument("--json", action="store_true", help="one JSON object per job")
        rp.set_defaults(func=cmd_dead_replay)


def _store() -> JobStore:
    return CommonSettings.load().job_store()


def _guarded(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except SettingsError as exc:
            die(exc)
            return 2
        except StoreError as exc:
            print(f"facefleet: {exc}", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"facefleet: {exc}", file=sys.stderr)
            return 2

    return run


def row(summary: JobSummary) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "job_id": summary.job_id,
        "state": summary.state,
        "tier": summary.tier,
        "created_at": iso(summary.created_at),
        "finished_at": iso(summary.finished_at),
        "error_code": summary.error_code,
        "last_seq": summary.last_seq,
    }


@_guarded
def cmd_store(args: argparse.Namespace) -> int:
    settings = CommonSettings.load()
    url = settings.store_url
    if args.action == "migrate":
        if not url.startswith(("postgresql://", "postgres://")):
            print("the file job store has no schema; nothing to migrate")
            return 0
        from facefleet.pgstore import migrate

        applied = migrate(url)
        print("\n".join(f"applied {name}" for name in applied) or "schema is up to date")
        return 0
    store = settings.job_store()  # `check`: reachable and the schema matches this build
    store.close()
    print(f"job store ok: {store.url}")
    return 0


@_guarded
def cmd_jobs_list(args: argparse.Namespace) -> int:
    store = _store()
    try:
        page = store.list_jobs(
            state=args.state,
            tier=args.tier,
            since=args.since,
            limit=args.limit,
            cursor=args.cursor,
        )
    finally:
        store.close()
    if args.json:
        for summary in page.jobs:
            print(json.dumps(row(summary)))
        if page.cursor:
            print(json.dumps({"next_cursor": page.cursor}))
        return 0
    print(f"{'JOB':36}  {'STATE':13}  {'TIER':10}  {'CREATED':25}  ERROR")
    for summary in page.jobs:
        r = row(summary)
        print(
            f"{r['job_id']:36}  {r['state']:13}  {r['tier'] or '-':10}  "
            f"{r['created_at'] or '-':25}  {r['error_code'] or ''}"
        )
    if page.cursor:
        print(f"more: --cursor {page.cursor}")
    return 0


@_guarded
def cmd_jobs_show(args: argparse.Namespace) -> int:
    store = _store()
    try:
        summary = store.get_job(args.job_id)
        events = store.log(args.job_id).events() if summary is not None else []
    finally:
        store.close()
    if summary is None:
        print(f"facefleet: no job {args.job_id} in the job store", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**row(summary), "events": [e.model_dump(mode="json") for e in events]}))
        return 0
    for key, value in row(summary).items():
        print(f"{key:12} {value if value is not None else '-'}")
    for event in events:
        payload = event.payload.model_dump(exclude_none=True)
        print(f"  {event.seq:4}  {event.ts.isoformat()}  {event.type:14} {json.dumps(payload)}")
    return 0


# --- dead letters: `facefleet dead list|replay` -------------------------------------------------
#
# `list` reads the job store (jobs whose state is dead_lettered). `replay` re-queues a dead
# letter, per job in this order, so that a crash between two steps loses nothing:
#
#   1. find the job request: its parked copy in facefleet.jobs.dead (basic_get, held unacked),
#      else the media store's submission record;
#   2. record `replayed` in the job's log (JobLog.replay: only after `dead_lettered`, or after a
#      `replayed` with nothing since; refused for completed/failed/cancelled/running jobs);
#   3. publish a fresh copy of the request to facefleet.jobs (confirm, mandatory), carrying the
#      `replayed` event's seq (jobstore.REPLAY_HEADER);
#   4. ack the parked copy; every other parked message looked at is nack-requeued.
#
# Dies after 2: the log ends in `replayed` and no copy was sent: replaying again is allowed and
# sends it. Dies after 3: the parked copy stays (the connection's unacked messages return) and
# the job runs; a second replay before it starts sends a duplicate, which is harmless (a job
# runs once: the claim, then the terminal check). Recording after publishing would be wrong:
# a worker could take the copy first, find the job dead-lettered and drop it.

DEFAULT_SCAN = 1000
"""Parked messages one `dead replay` looks at, at most (each is requeued once)."""


def dead_row(store: JobStore, summary: JobSummary) -> dict[str, Any]:
    """One line of `dead list`: the job's dead_lettered event says why and when."""
    events = store.log(summary.job_id).events()
    last = next((e for e in reversed(events) if e.type == "dead_lettered"), None)
    when = last.ts if last is not None else summary.finished_at
    return {
        "job_id": summary.job_id,
        "tier": summary.tier,
        "reason": last.payload.message if last is not None else None,
        "code": summary.error_code or (last.payload.code if last is not None else None),
        "dead_lettered_at": when.isoformat() if when else None,
    }


def dead_letters(
    store: JobStore, *, tier: str | None, since: datetime | None, limit: int
) -> list[JobSummary]:
    """Dead-lettered jobs, newest created first, dead-lettered at or after `since`; at most
    `limit`."""
    found: list[JobSummary] = []
    cursor: str | None = None
    while len(found) < limit:
        page = store.list_jobs(state="dead_lettered", tier=tier, limit=1000, cursor=cursor)
        for summary in page.jobs:
            if since is None or (summary.finished_at is not None and summary.finished_at >= since):
                found.append(summary)
        if page.cursor is None:
            break
        cursor = page.cursor
    return found[:limit]


@_guarded
def cmd_dead_list(args: argparse.Namespace) -> int:
    if args.tier is not None:
        check_tier(args.tier)
    store = _store()
    try:
        rows = [
            dead_row(store, s)
            for s in dead_letters(store, tier=args.tier, since=args.since, limit=args.limit)
        ]
    finally:
        store.close()
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"{'JOB':36}  {'TIER':10}  {'CODE':16}  {'DEAD-LETTERED AT':32}  REASON")
    for r in rows:
        print(
            f"{r['job_id']:36}  {r['tier'] or '-':10}  {r['code'] or '-':16}  "
            f"{r['dead_lettered_at'] or '-':32}  {r['reason'] or ''}"
        )
    return 0


@dataclass
class ReplayOutcome:
    job_id: str
    outcome: str
    """replayed | refused | failed"""
    message: str
    replayed_seq: int | None = None
    source: str | None = None
    """Where the job request came from: `parked queue` or `submission record`."""

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Replayer:
    """Re-queues dead-lettered jobs (see the section comment for the order of the steps)."""

    def __init__(
        self, settings: CommonSettings, store: JobStore, replayed_by: str, scan: int
    ) -> None:
        self.settings = settings
        self.store = store
        self.replayed_by = replayed_by
        self.scan = scan
        self.looked = 0
        """Parked messages looked at."""
        self._held: set[int] = set()
        """Delivery tags of parked messages taken and not acked yet (requeued at the end)."""
        self._media: MediaStore | None = None

    def run(self, job_ids: Sequence[str]) -> list[ReplayOutcome]:
        from facefleet.amqp import connect

        conn = connect(self.settings.amqp_url, "facefleet-dead-replay")
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            try:
                parked = self._scan(ch, set(job_ids))
            except pika.exceptions.ChannelClosedByBroker as exc:  # no parked queue (yet)
                print(f"facefleet: parked queue {DEAD_QUEUE}: {exc}", file=sys.stderr)
                parked, self._held = {}, set()  # what it held went back with the channel
                ch = conn.channel()
                ch.confirm_delivery()
            outcomes = []
            try:
                for job_id in job_ids:
                    outcomes.append(self._replay(ch, job_id, parked.get(job_id, [])))
            finally:
                if ch.is_open and self._held:  # every other message looked at goes back
                    ch.basic_nack(delivery_tag=0, multiple=True, requeue=True)
            return outcomes
        finally:
            if conn.is_open:
                conn.close()

    def _scan(self, ch: BlockingChannel, wanted: set[str]) -> dict[str, list[tuple[int, bytes]]]:
        """Take parked messages (unacked) until every wanted job's copy is found, the queue is
        empty or `scan` were looked at; the wanted ones by job id (message_id, the job-id
        header or the body's job_id)."""
        found: dict[str, list[tuple[int, bytes]]] = {}
        ch.queue_declare(DEAD_QUEUE, passive=True)
        while self.looked < self.scan and not wanted <= found.keys():
            method, props, body = ch.basic_get(DEAD_QUEUE, auto_ack=False)
            if method is None:
                break
            self.looked += 1
            self._held.add(method.delivery_tag)
            job_id = _message_job_id(props, body)
            if job_id in wanted:
                found.setdefault(job_id, []).append((method.delivery_tag, body))
        return found

    def _request(self, job_id: str, copies: list[tuple[int, bytes]]) -> tuple[JobRequest, str]:
        for _, body in copies:
            try:
                request = JobRequest.decode(body)
            except DecodeError:
                continue
            if request.job_id == job_id:
                return request, "parked queue"
        if self._media is None:
            self._media = self.settings.media_store()
        try:
            recorded = self._media.submission(job_id)
        except StorageError as exc:
            raise _NoRequest(f"no parked copy; the submission record is unreadable: {exc}") from exc
        if recorded is not None:
            try:
                return JobRequest.decode(recorded), "submission record"
            except DecodeError as exc:
                raise _NoRequest(f"no parked copy; bad submission record: {exc.reason}") from exc
        raise _NoRequest(
            f"no copy of the job request: none among the {self.looked} parked messages looked "
            f"at (raise --scan) and no submission record in the media store {self._media.url}"
        )

    def _replay(
        self, ch: BlockingChannel, job_id: str, copies: list[tuple[int, bytes]]
    ) -> ReplayOutcome:
        log = self.store.log(job_id)
        refused = replay_refusal(log.events())
        if refused is not None:
            return ReplayOutcome(job_id, "refused", str(ReplayRefused(job_id, refused)))
        try:
            request, source = self._request(job_id, copies)
        except _NoRequest as exc:
            return ReplayOutcome(job_id, "failed", str(exc))
        if request.deadline is not None and request.deadline < utcnow():
            return ReplayOutcome(
                job_id,
                "refused",
                f"job {job_id}: its deadline {request.deadline.isoformat()} passed; a replay "
                "would fail at once (deadline_exceeded)",
            )
        from facefleet.amqp import publish_event

        try:
            event = log.replay(self.replayed_by, lambda e: publish_event(ch, e))
        except ReplayRefused as exc:
            return ReplayOutcome(job_id, "refused", str(exc))
        except pika.exceptions.AMQPError as exc:
            return ReplayOutcome(
                job_id,
                "failed",
                f"`replayed` recorded but its event was not published ({_amqp_error(exc)}); "
                "the job is not re-queued: run the replay again",
            )
        props = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=job_id,
            timestamp=int(request.created_at.timestamp()),
            headers={
                HEADER_SCHEMA: SCHEMA_VERSION,
                HEADER_JOB_ID: job_id,
                REPLAY_HEADER: event.seq,
            },
        )
        try:
            ch.basic_publish(JOBS_EXCHANGE, request.tier, request.encode(), props, mandatory=True)
        except pika.exceptions.AMQPError as exc:
            why = {
                pika.exceptions.UnroutableError: f"tier {request.tier!r} has no queue",
                pika.exceptions.NackError: f"the broker refused it (tier {request.tier} full?)",
            }.get(type(exc), _amqp_error(exc))
            return ReplayOutcome(
                job_id,
                "failed",
                f"`replayed` recorded (seq {event.seq}) but the job was not re-queued: {why}; "
                "run the replay again",
                replayed_seq=event.seq,
            )
        for tag, _ in copies:  # the job is re-queued: its parked copies go
            ch.basic_ack(tag)
            self._held.discard(tag)
        return ReplayOutcome(
            job_id,
            "replayed",
            f"re-queued to tier {request.tier} (replayed seq {event.seq}, job request from the "
            f"{source})",
            replayed_seq=event.seq,
            source=source,
        )


class _NoRequest(Exception):
    pass


def _amqp_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def _message_job_id(props: pika.BasicProperties, body: bytes) -> str | None:
    """The job a parked message is a copy of: its message_id, job-id header or body."""
    headers = props.headers or {}
    candidates: list[object] = [props.message_id, headers.get(HEADER_JOB_ID)]
    try:
        raw = json.loads(body)
        if isinstance(raw, dict):
            candidates.append(raw.get("job_id"))
    except (ValueError, UnicodeDecodeError):
        pass
    for value in candidates:
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        try:
            return str(uuid.UUID(str(value))) if value else None
        except ValueError:
            continue
    return None


def default_replayed_by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


@_guarded
def cmd_dead_replay(args: argparse.Namespace) -> int:
    if (args.job_id is None) == (args.tier is None):
        print("facefleet: dead replay: give a JOB_ID or --tier TIER (one of them)", file=sys.stderr)
        return 2
    if args.scan < 0 or args.limit < 1:
        print("facefleet: dead replay: --scan must be >= 0 and --limit >= 1", file=sys.stderr)
        return 2
    settings = CommonSettings.load()
    store = settings.job_store()
    try:
        if args.job_id is not None:
            try:
                job_ids = [str(uuid.UUID(args.job_id))]
            except ValueError:
                print(f"facefleet: {args.job_id!r} is not a job id", file=sys.stderr)
                return 2
            refused = replay_refusal(store.log(job_ids[0]).events())
            if refused is not None:  # said before touching the broker (checked again there)
                outcome = ReplayOutcome(
                    job_ids[0], "refused", str(ReplayRefused(job_ids[0], refused))
                )
                if args.json:
                    print(json.dumps(outcome.as_json()))
                print(f"facefleet: {outcome.message}", file=sys.stderr)
                return 1
        else:
            check_tier(args.tier)
            job_ids = [
                s.job_id for s in dead_letters(store, tier=args.tier, since=None, limit=args.limit)
            ]
            if not job_ids:
                print(f"no dead-lettered jobs in tier {args.tier}")
                return 0
        replayer = Replayer(settings, store, args.by or default_replayed_by(), args.scan)
        try:
            outcomes = replayer.run(job_ids)
        except pika.exceptions.AMQPConnectionError as exc:
            print(f"facefleet: cannot reach the broker: {_amqp_error(exc)}", file=sys.stderr)
            return 2
    finally:
        store.close()
    for o in outcomes:
        if args.json:
            print(json.dumps(o.as_json()))
        elif o.outcome == "replayed":
            print(f"replayed {o.job_id}: {o.message}")
        else:
            print(f"facefleet: {o.outcome} {o.job_id}: {o.message}", file=sys.stderr)
    done = sum(1 for o in outcomes if o.outcome == "replayed")
    if args.tier is not None and not args.json:
        print(
            f"tier {args.tier}: replayed {done} of {len(outcomes)} dead-lettered job(s)"
            + (f" ({len(outcomes) - done} not: see above)" if done < len(outcomes) else "")
        )
    return 0 if done == len(outcomes) else 1
