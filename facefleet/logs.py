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
from collections.abc import Iterator
from typing import IO, Any, Literal

import structlog
from structlog.contextvars import bind_contextvars, bound_contextvars, unbind_contextvars

from facefleet.tracing import current_ids

LogFormat = Literal["auto", "json", "text"]

JOB_FIELDS = ("job_id", "tier", "attempt", "stage", "worker")
"""What a line about a job carries (README "Logs")."""


def configure(level: str, fmt: LogFormat = "auto", *, stream: IO[str] | None = None) -> None:
    """Route every stdlib log record through one handler on `stream` (default stderr)."""
    out = stream if stream is not None else sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not _is_terminal(out))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
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


@contextlib.contextmanager
def job_context(**fields: object) -> Iterator[None]:
    """Bind job fields (JOB_FIELDS; None values are left out) to every line logged in this
    thread until the block ends; nested blocks add to the outer one and restore it."""
    try:
        with bound_contextvars(**{k: v for k, v in fields.items() if v is not None}):
            yield
    finally:
        unbind_contextvars("stage")  # bound as the job moves (bind_stage): not past its end


def bind_stage(stage: str) -> None:
    """The job's current stage (decode, detect, swap, ...), until the job's context ends."""
    bind_contextvars(stage=stage)
