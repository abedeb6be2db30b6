"""Operator commands on the job store: `facefleet store migrate`, `facefleet jobs list|show`.

They read FACEFLEET_STORE_URL (or the journals under FACEFLEET_DATA_ROOT) through
facefleet.jobstore only, so they work the same on both backends. Exit codes: 0 ok, 1 no such
job, 2 settings or usage error (an unreachable store, a schema behind the code).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timedelta
from typing import Any

from facefleet.jobstore import JobStore, JobSummary, StoreError
from facefleet.settings import CommonSettings, SettingsError, die
from facefleet.wire import utcnow

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
