"""Producer commands: topology apply, submit, watch, cancel, status.

Exit codes: 0 ok / job completed; 1 job failed or dead-lettered; 2 usage or settings error;
3 job cancelled; 4 broker unreachable or submission refused; 5 tier full; 75 (EX_TEMPFAIL) the
broker blocks publishers (memory or disk alarm): retry later; 124 watch timed out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pika.exceptions

from facefleet.settings import ProducerSettings, SettingsError, die
from facefleet.wire import (
    EVENT_TYPES,
    DecodeError,
    JobEvent,
    JobOptionValue,
    JobRequest,
    consumer_timeout_advice,
    utcnow,
)

EXIT_FOR_TERMINAL = {"completed": 0, "failed": 1, "dead_lettered": 1, "cancelled": 3}
EX_TEMPFAIL = 75
"""sysexits.h: a temporary failure; the caller may retry later (a broker alarm)."""


def register(sub: Any, name: str) -> None:
    if name == "topology":
        p = sub.add_parser(name, help="declare exchanges and queues (idempotent)")
        p.add_argument("action", choices=["apply"])
        p.set_defaults(func=cmd_topology)
    elif name == "submit":
        p = sub.add_parser(name, help="submit a face-fusion job")
        p.add_argument("--tier", required=True, help="QoS tier, e.g. high, standard, batch")
        p.add_argument(
            "--source",
            required=True,
            help="PATH (uploaded to the media store) or URI (s3:// in the store, https://)",
        )
        p.add_argument(
            "--target",
            required=True,
            help="PATH (uploaded to the media store) or URI (s3:// in the store, https://)",
        )
        p.add_argument(
            "--option",
            action="append",
            default=[],
            metavar="K=V",
            help="processor option, repeatable: enhance=true, face_selector=many, quality=90",
        )
        p.add_argument("--idempotency-key", help="same key => same job, run once")
        p.add_argument("--processor", help="pin the job to a processor (sleep, noop, faceswap)")
        p.add_argument(
            "--webhook",
            metavar="URL",
            help="POST the job's events here (https://; signed, see `facefleet webhooks`)",
        )
        p.add_argument(
            "--webhook-event",
            action="append",
            choices=EVENT_TYPES,
            metavar="TYPE",
            help="repeatable: only these event types (default: all but progress); one of "
            + ", ".join(EVENT_TYPES),
        )
        p.add_argument("--wait", action="store_true", help="follow events until the job ends")
        p.add_argument("--timeout", type=float, default=None, help="seconds to wait (--wait)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=cmd_submit)
    elif name == "watch":
        p = sub.add_parser(name, help="replay a job's events from the first, then follow live")
        p.add_argument("job_id")
        p.add_argument("--after-seq", type=int, default=0)
        p.add_argument(
            "--since",
            type=parse_since,
            help="start reading the stream here (ISO time, or 30m / 2h / 7d ago); default: the "
            "job's creation time from its journal when the data root is readable, else the "
            "stream's first retained event (slow on a long stream before RabbitMQ 3.13); "
            "refused with FACEFLEET_GATEWAY_URL, where the gateway starts at the job's creation",
        )
        p.add_argument("--timeout", type=float, default=None)
        p.add_argument("--json", action="store_true", help="JSON lines")
        p.set_defaults(func=cmd_watch)
    elif name == "cancel":
        p = sub.add_parser(name, help="cancel a job (queued or running)")
        p.add_argument("job_id")
        p.add_argument("--reason", default="cancelled by user")
        p.add_argument(
            "--tier", help="the job's tier (default: from its submission record in the store)"
        )
        p.set_defaults(func=cmd_cancel)
    elif name == "status":
        p = sub.add_parser(name, help="per tier: ready, unacked, consumers")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_status)


def _settings() -> ProducerSettings:
    return ProducerSettings.load()


def parse_since(value: str) -> datetime:
    """ISO-8601 time, or a duration ago: 90s, 30m, 2h, 7d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value and value[-1] in units and value[:-1].replace(".", "", 1).isdigit():
        return utcnow() - timedelta(seconds=float(value[:-1]) * units[value[-1]])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: use ISO-8601 or 30m / 2h / 7d") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_options(items: list[str]) -> dict[str, JobOptionValue]:
    """k=v pairs; v is parsed as JSON when it is a JSON scalar (1, 0.5, true, null)."""
    out: dict[str, JobOptionValue] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(raw)
            if isinstance(value, list | dict):
                value = raw
        except json.JSONDecodeError:
            value = raw
        out[key] = value
    return out


def _guard(func: Any) -> Any:
    def wrapper(args: argparse.Namespace) -> int:
        from facefleet.producer.errors import (
            BrokerBlockedError,
            InvalidJobError,
            SubmitError,
            TierFullError,
        )

        try:
            result: int = func(args)
            return result
        except SettingsError as exc:
            die(exc)
            return 2
        except (InvalidJobError, ValueError) as exc:
            print(f"facefleet: {exc}", file=sys.stderr)
            return 2
        except TierFullError as exc:
            print(f"facefleet: {exc}", file=sys.stderr)
            return 5
        except BrokerBlockedError as exc:
            print(f"facefleet: {exc}", file=sys.stderr)
            return EX_TEMPFAIL
        except SubmitError as exc:
            print(f"facefleet: {exc}", file=sys.stderr)
            return 4
        except pika.exceptions.AMQPConnectionError as exc:
            print(f"facefleet: cannot reach the broker ({exc!r}); check AMQP_URL", file=sys.stderr)
            return 4

    return wrapper


@_guard
def cmd_topology(args: argparse.Namespace) -> int:
    from facefleet.amqp import connect, declare_topology

    settings = _settings()
    conn = connect(settings.amqp_urls, "facefleet-topology")
    try:
        feats = declare_topology(conn, settings.tiers(), settings.placement())
    finally:
        conn.close()
    note = consumer_timeout_advice(settings.tiers(), feats)
    tiers = ", ".join(t.name for t in settings.tiers())
    version = ".".join(map(str, feats.version))
    print(f"topology applied on {feats.product} {version}: tiers {tiers}; {note}")
    return 0


@_guard
def cmd_submit(args: argparse.Namespace) -> int:
    from facefleet.producer.sdk import JobClient

    settings = _settings()
    options = parse_options(args.option)
    with JobClient(settings) as client:
        result = client.submit(
            args.tier,
            args.source,
            args.target,
            options=options,
            idempotency_key=args.idempotency_key,
            processor=args.processor,
            webhook_url=args.webhook,
            webhook_events=args.webhook_event,
        )
    if args.json:
        print(
            json.dumps({"job_id": result.job_id, "duplicate": result.duplicate, "tier": args.tier})
        )
    else:
        dup = " (duplicate idempotency key: existing job)" if result.duplicate else ""
        print(f"job {result.job_id} queued on tier {args.tier}{dup}")
    sys.stdout.flush()
    if not args.wait:
        return 0
    return follow(settings, result.job_id, json_lines=args.json, timeout_s=args.timeout)


@_guard
def cmd_watch(args: argparse.Namespace) -> int:
    return follow(
        _settings(),
        args.job_id,
        json_lines=args.json,
        after_seq=args.after_seq,
        timeout_s=args.timeout,
        since=args.since,
    )


def follow(
    settings: ProducerSettings,
    job_id: str,
    *,
    json_lines: bool,
    after_seq: int = 0,
    timeout_s: float | None = None,
    since: datetime | None = None,
) -> int:
    """Print a job's events until it ends; the exit code follows the terminal event."""
    from facefleet.producer.watch import WatchTimeout

    events = _event_source(settings, job_id, after_seq=after_seq, timeout_s=timeout_s, since=since)
    bar = ProgressBar(sys.stderr) if not json_lines else None
    last: JobEvent | None = None
    try:
        for event in events:  # ends after the terminal event (a replayed dead letter goes on)
            last = event
            if json_lines:
                print(event.model_dump_json(exclude_none=True), flush=True)
            elif bar is not None:
                bar.show(event)
    except WatchTimeout as exc:
        print(f"facefleet: {exc}", file=sys.stderr)
        return 124
    return EXIT_FOR_TERMINAL[last.type] if last is not None and last.terminal else 1


def _event_source(
    settings: ProducerSettings,
    job_id: str,
    *,
    after_seq: int,
    timeout_s: float | None,
    since: datetime | None = None,
) -> Iterator[JobEvent]:
    if settings.gateway_url:
        try:
            from facefleet.producer.gateway.client import watch_via_gateway
        except ImportError:
            pass
        else:
            if since is not None:
                raise ValueError(
                    "--since does not apply through the gateway (FACEFLEET_GATEWAY_URL): it "
                    "replays from the job's creation time signed into its token; unset "
                    "FACEFLEET_GATEWAY_URL to read the events stream directly from --since"
                )
            events: Iterator[JobEvent] = watch_via_gateway(
                settings, job_id, after_seq=after_seq, timeout_s=timeout_s
            )
            return events
    from facefleet.producer.watch import watch_events

    since = since or _created_at(settings, job_id)
    return watch_events(
        settings.amqp_urls, job_id, after_seq=after_seq, since=since, timeout_s=timeout_s
    )


def _created_at(settings: ProducerSettings, job_id: str) -> Any:
    """Start the stream near the job: its submission record in the media store says when it
    was created (saves scanning old chunks); None reads the stream from its start."""
    from facefleet.storage import StorageError

    try:
        body = settings.media_store().submission(job_id)
        return JobRequest.decode(body).created_at if body else None
    except (StorageError, DecodeError, ValueError):
        return None


class ProgressBar:
    """A one-line progress bar for people (stderr); final line says where the result is."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())

    def show(self, event: JobEvent) -> None:
        p = event.payload
        if event.type == "progress" and p.fraction is not None:
            width = 30
            filled = round(p.fraction * width)
            eta = f" eta {p.eta_s:.0f}s" if p.eta_s is not None else ""
            frames = f" {p.frames_done}/{p.frames_total} frames" if p.frames_total else ""
            line = f"[{'#' * filled}{'.' * (width - filled)}] {p.fraction * 100:5.1f}% {p.stage or ''}{frames}{eta}"
            if self.tty:
                self.stream.write("\r" + line.ljust(79))
            else:
                self.stream.write(line + "\n")
        else:
            if self.tty:
                self.stream.write("\n")
            detail = ""
            if event.type == "completed":
                detail = f" -> {p.result_uri}"
            elif event.type in ("failed", "dead_lettered", "retrying"):
                detail = f": {p.code}: {p.message}"
            elif event.type == "cancelled":
                detail = f": {p.message or ''}"
            elif event.type == "started":
                detail = f" on {p.worker} (attempt {p.attempt})"
            self.stream.write(f"{event.type}{detail}\n")
        self.stream.flush()


@_guard
def cmd_cancel(args: argparse.Namespace) -> int:
    from facefleet.producer.sdk import JobClient

    with JobClient(_settings()) as client:
        client.cancel(args.job_id, args.reason, tier=args.tier)
    print(f"cancel requested for job {args.job_id}")
    return 0


@_guard
def cmd_status(args: argparse.Namespace) -> int:
    from facefleet.producer.sdk import JobClient

    with JobClient(_settings()) as client:
        rows = client.status()
        problem = client.management_problem
    if problem is not None:
        print(f"facefleet: unacked (jobs in progress) unknown: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows]))
        return 0
    print(f"{'tier':<12} {'ready':>8} {'unacked':>8} {'consumers':>10}")
    for r in rows:
        unacked = "n/a" if r.unacked is None else str(r.unacked)
        print(f"{r.tier:<12} {r.ready:>8} {unacked:>8} {r.consumers:>10}")
    return 0
