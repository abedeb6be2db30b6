"""Traces with OpenTelemetry, from one place: a job is one trace from submit to its last event.

The producer opens a PRODUCER `send` span and puts its W3C trace context (`traceparent`,
`tracestate`: wire.HEADER_TRACEPARENT / HEADER_TRACESTATE) in the job message's AMQP headers;
the worker takes it out of the delivery and opens a CONSUMER `process` span per job under it
(the queue wait an attribute), with a child span per runner step and per processor stage;
events published while a job's span is current carry its context too (amqp.event_properties).
Attributes follow the OTel messaging semantic conventions plus `facefleet.*` job fields.

Code here depends on `opentelemetry-api` only (a base dependency, small): with no SDK
configured its spans are no-ops and cost nothing. `configure` installs the SDK and an OTLP/HTTP
exporter (the `otel` extra) only when the standard OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set; the SDK itself reads the other OTEL_* variables
(OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*, OTEL_EXPORTER_OTLP_HEADERS, ...).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from facefleet.wire import job_queue

log = logging.getLogger(__name__)

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
"""Either one turns export on (README "Tracing"); neither: nothing is exported."""

_tracer = trace.get_tracer("facefleet")
"""A proxy: spans go to whichever provider `configure` installs later (none: no-ops)."""
_propagator = TraceContextTextMapPropagator()
"""W3C trace context only: the wire contract names exactly these headers."""
_configured = False


def configure(service_name: str) -> bool:
    """Export this process's spans over OTLP/HTTP if an OTLP endpoint is set (True), else leave
    the API a no-op (False). `service_name` unless OTEL_SERVICE_NAME names the process. Once per
    process; a missing SDK (no `otel` extra) is logged, never fatal: tracing is optional."""
    global _configured
    if _configured:
        return True
    if not any(os.environ.get(v) for v in ENDPOINT_VARS):
        return False
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not installed "
            "(pip install 'facefleet[otel]'); not exporting traces (%s)",
            exc,
        )
        return False
    attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attrs))  # flushed at exit
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True
    return True


def shutdown() -> None:
    """Flush and stop the exporter now (a process that ends by os._exit skips atexit)."""
    provider = trace.get_tracer_provider()
    stop = getattr(provider, "shutdown", None)
    if callable(stop):
        stop()


# --- W3C trace context in AMQP headers ------------------------------------------------------


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """pika hands header strings over as str, aio-pika sometimes as bytes."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        return [str(value)]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


class _HeaderSetter(Setter[MutableMapping[str, Any]]):
    def set(self, carrier: MutableMapping[str, Any], key: str, value: str) -> None:
        carrier[key] = value


_getter = _HeaderGetter()
_setter = _HeaderSetter()


def inject(headers: MutableMapping[str, Any], span: Span | None = None) -> None:
    """Add `span`'s (default: the current span's) trace context to AMQP headers; nothing when
    there is no recording span."""
    ctx = trace.set_span_in_context(span) if span is not None else None
    _propagator.inject(headers, context=ctx, setter=_setter)


def extract(headers: Mapping[str, Any] | None) -> otel_context.Context:
    """The trace context a message carries (an empty context when it carries none)."""
    return _propagator.extract(headers or {}, getter=_getter)


# --- spans ------------------------------------------------------------------------------------


def _messaging(operation: str, job_id: str, tier: str) -> dict[str, Any]:
    return {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": job_queue(tier),
        "messaging.rabbitmq.destination.routing_key": tier,
        "messaging.message.id": job_id,
        "facefleet.job_id": job_id,
        "facefleet.tier": tier,
    }


def start_send(job_id: str, tier: str) -> Span:
    """A PRODUCER span for publishing one job; the caller injects it and ends it once the
    broker confirmed (or refused) the message."""
    return _tracer.start_span(
        f"send {job_queue(tier)}",
        kind=SpanKind.PRODUCER,
        attributes=_messaging("send", job_id, tier),
    )


@contextlib.contextmanager
def send(job_id: str, tier: str) -> Iterator[Span]:
    """start_send as the current span for a block (an exception marks it as an error)."""
    span = start_send(job_id, tier)
    with trace.use_span(span, end_on_exit=True):
        yield span


def start_process(
    headers: Mapping[str, Any] | None,
    job_id: str,
    tier: str,
    *,
    worker: str,
    queue_wait_s: float | None = None,
    redelivered: bool = False,
) -> Span:
    """A CONSUMER span for one job's delivery, a child of the producer's `send` span when the
    message carries its context. Not current: the runner makes it current per job step (`use`)."""
    attrs = _messaging("process", job_id, tier)
    attrs["facefleet.worker"] = worker
    attrs["messaging.rabbitmq.message.redelivered"] = redelivered
    if queue_wait_s is not None:
        attrs["facefleet.queue_wait_s"] = round(queue_wait_s, 3)
    return _tracer.start_span(
        f"process {job_queue(tier)}",
        context=extract(headers),
        kind=SpanKind.CONSUMER,
        attributes=attrs,
    )


def use(span: Span | None) -> contextlib.AbstractContextManager[Any]:
    """Make a job's span current for a block (logs and child spans see it); never ends it."""
    if span is None:
        return contextlib.nullcontext()
    return trace.use_span(
        span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    )


def step(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Span]:
    """A child span of the current one for a step of the work (fetch inputs, process, ...).

    With no tracer provider installed a child would be a non-recording copy of the current
    span (same context, nothing exported), so the current span is kept instead: the runner
    opens several steps per job, and the API's no-op machinery cost ~10% of a no-op job."""
    if not recording():
        return contextlib.nullcontext(trace.get_current_span())
    return _tracer.start_as_current_span(
        name, attributes={k: v for k, v in attributes.items() if v is not None}
    )


def recording() -> bool:
    """Whether a tracer provider is installed in this process (by `configure`, or by whoever
    embeds FaceFleet); without one every span is a no-op that only carries context."""
    if isinstance(_tracer, trace.ProxyTracer):  # resolves to whatever provider is set later
        return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    return not isinstance(_tracer, trace.NoOpTracer)


def start_step(
    name: str, parent: Span | None = None, attributes: Mapping[str, Any] | None = None
) -> Span:
    """A step span that outlives a block (a processor's stage, a batch's commit); end it."""
    ctx = trace.set_span_in_context(parent) if parent is not None else None
    attrs = {k: v for k, v in (attributes or {}).items() if v is not None}
    return _tracer.start_span(name, context=ctx, attributes=attrs)


def end(span: Span | None, **attributes: Any) -> None:
    """End a span once (later calls do nothing), with last attributes (an outcome, ...)."""
    if span is None or not span.is_recording():
        return
    for key, value in attributes.items():
        if value is not None:
            span.set_attribute(key, value)
    span.end()


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span, hex as W3C writes them; None outside a span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
