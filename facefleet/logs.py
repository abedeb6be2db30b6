"""Logs for machines and for people, from one place: every process calls `configure` once.

One JSON object per line when stderr is not a terminal (or FACEFLEET_LOG_FORMAT=json): what log
pipelines (Loki, Cloud Logging, Elasticsearch) parse without a regex; text when a person watches
a terminal (or FACEFLEET_LOG_FORMAT=text). The code logs through the standard library
(`logging.getLogger(__name__)`); structlog's ProcessorFormatter renders those records and adds
the context bound for the current job (`job_context`): job_id, tier, attempt, stage and worker
on every line logged while a job is being handled, by any module, in that thread, and the
trace_id and span_id of the current OpenTelemetry span (facefleet/tracing.py) when there is one.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import IO, Any, Literal

import structlog

from facefleet.tracing import current_ids

LogFormat = Literal["auto", "json", "text"]

JOB_FIELDS = ("job_id", "tier", "attempt", "stage", "worker")
"""What a line about a job carries (README "Logs")."""


def configure(level: str, fmt: LogFormat = "auto", *, stream: IO[str] | None = None) -> None:
    """Route every stdlib log record through one handler on `stream` (default stderr)."""
    out = stream if stream is not None else sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not _is_terminal(out))
    shared: list[Any] = [
        add_job_fields,
        add_trace_ids,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if as_json:
        renderer = structlog.processors.JSONRenderer()
        tail: list[Any] = [structlog.processors.dict_tracebacks]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        tail = []
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def add_trace_ids(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """trace_id and span_id of the span current where the line was logged (facefleet.tracing),
    so a line leads to its trace and back; none outside a span or with tracing off."""
    ids = current_ids()
    if ids is not None:
        event.setdefault("trace_id", ids[0])
        event.setdefault("span_id", ids[1])
    return event


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_job_fields: ContextVar[Mapping[str, object]] = ContextVar(
    "facefleet_job_fields", default=MappingProxyType({})
)
"""The fields `job_context` and `bind_stage` bound in this thread, as one immutable mapping.

Why not structlog's bound_contextvars: it keeps a context variable per key and scans the whole
context on every bind; the runner enters a job's context several times per job (~6% of a
worker's CPU on no-op jobs), where one variable set and reset costs next to nothing."""


def add_job_fields(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """The job fields bound where the line was logged (fields the call passed win)."""
    for key, value in _job_fields.get().items():
        event.setdefault(key, value)
    return event


@contextlib.contextmanager
def job_context(**fields: object) -> Iterator[None]:
    """Bind job fields (JOB_FIELDS; None values are left out) to every line logged in this
    thread until the block ends; nested blocks add to the outer one, and the outer fields
    (a stage bound inside them gone) come back when they end."""
    token = _job_fields.set({**_job_fields.get(), **_present(fields)})
    try:
        yield
    finally:
        _job_fields.reset(token)


def _present(fields: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in fields.items() if v is not None}


def bind_stage(stage: str) -> None:
    """The job's current stage (decode, detect, swap, ...), until the job's context ends."""
    _job_fields.set({**_job_fields.get(), "stage": stage})
