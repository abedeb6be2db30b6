"""facefleet.tracing: W3C trace context in AMQP headers (both header flavours), export only when
an OTLP endpoint is set (nothing otherwise, and nothing breaks), trace ids on log lines."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from facefleet import tracing
from facefleet.amqp import event_properties
from facefleet.logs import configure as configure_logs
from facefleet.producer.sdk import job_properties
from facefleet.wire import HEADER_TRACEPARENT, HEADER_TRACESTATE, JobRequest, queued_event
from tests.otlp import OtlpReceiver


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """facefleet's spans recorded in memory, for this test only (the global provider is left
    alone: it can be set once per process)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("facefleet"))
    yield exporter
    provider.shutdown()


JOB_ID = str(uuid.UUID(int=1))


def a_job() -> JobRequest:
    return JobRequest(
        job_id=JOB_ID,
        idempotency_key="k",
        tier="standard",
        source_uri="file:///in/a.jpg",
        target_uri="file:///in/b.jpg",
        output_uri_prefix="file:///out",
        created_at=datetime.now(UTC),
    )


def test_the_wire_contract_names_the_propagators_headers() -> None:
    assert tracing._propagator.fields == {HEADER_TRACEPARENT, HEADER_TRACESTATE}


def test_without_an_sdk_spans_are_no_ops_and_headers_carry_no_context() -> None:
    """This test process never configures the SDK: the API's no-op provider."""
    job = a_job()
    with tracing.send(job.job_id, job.tier) as span:
        assert not span.is_recording()
        headers = job_properties(job).headers
        events = event_properties(queued_event(job)).headers
    assert HEADER_TRACEPARENT not in headers and HEADER_TRACEPARENT not in events
    assert tracing.current_ids() is None
    process = tracing.start_process(headers, job.job_id, job.tier, worker="w")
    with tracing.use(process), tracing.step("fetch inputs"):
        pass
    tracing.end(process, **{"facefleet.outcome": "ack"})  # nothing breaks


def test_without_an_sdk_a_step_keeps_the_current_spans_context() -> None:
    """No provider: a step opens no span of its own, and what runs inside it (events the job
    publishes) still carries the context the delivery brought."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    assert not tracing.recording()
    parent = NonRecordingSpan(
        SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    )
    with tracing.use(parent), tracing.step("publish events") as span:
        assert span is trace.get_current_span() is parent
        assert tracing.current_ids() == (format(0x1234, "032x"), format(0x5678, "016x"))


@pytest.mark.parametrize(
    "as_bytes",
    [pytest.param(False, id="pika-str-headers"), pytest.param(True, id="aio-pika-bytes-headers")],
)
def test_a_message_carries_its_send_span_to_the_process_span(
    exported: InMemorySpanExporter, as_bytes: bool
) -> None:
    job = a_job()
    with tracing.send(job.job_id, job.tier) as send:
        headers = dict(job_properties(job).headers)
    if as_bytes:
        headers = {k: v.encode() if isinstance(v, str) else v for k, v in headers.items()}
    process = tracing.start_process(headers, job.job_id, job.tier, worker="w", queue_wait_s=1.5)
    with tracing.use(process), tracing.step("fetch inputs"):
        pass
    tracing.end(process, **{"facefleet.outcome": "ack"})
    tracing.end(process)  # a second end does nothing
    spans = {s.name: s for s in exported.get_finished_spans()}
    assert set(spans) == {
        "send facefleet.jobs.standard",
        "process facefleet.jobs.standard",
        "fetch inputs",
    }
    got = spans["process facefleet.jobs.standard"]
    assert got.context.trace_id == send.get_span_context().trace_id
    assert got.parent is not None and got.parent.span_id == send.get_span_context().span_id
    assert got.kind == trace.SpanKind.CONSUMER
    assert got.attributes is not None
    assert got.attributes["facefleet.queue_wait_s"] == 1.5
    assert got.attributes["messaging.message.id"] == JOB_ID
    assert got.attributes["facefleet.outcome"] == "ack"
    fetch = spans["fetch inputs"]
    assert fetch.parent is not None and fetch.parent.span_id == got.context.span_id


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(None, id="no-headers"),
        pytest.param({}, id="empty"),
        pytest.param({HEADER_TRACEPARENT: "garbage"}, id="malformed-traceparent"),
    ],
)
def test_a_message_without_usable_context_starts_a_new_trace(
    exported: InMemorySpanExporter, headers: dict[str, str] | None
) -> None:
    tracing.end(tracing.start_process(headers, JOB_ID, "standard", worker="w"))
    (span,) = exported.get_finished_spans()
    assert span.parent is None


def test_log_lines_carry_the_current_spans_ids(exported: InMemorySpanExporter) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    try:
        configure_logs("INFO", "json", stream=out)
        logging.getLogger("t").info("outside")
        with tracing.send(JOB_ID, "standard") as span:
            logging.getLogger("t").info("inside")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    outside, inside = (json.loads(line) for line in out.getvalue().splitlines())
    assert "trace_id" not in outside and "span_id" not in outside
    ctx = span.get_span_context()
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")


CONFIGURE = """
import sys
from facefleet import tracing
on = tracing.configure("facefleet-unit")
with tracing.send("job-1", "standard") as span:
    recording = span.is_recording()
tracing.shutdown()
print(on, recording)
"""


@pytest.mark.parametrize(
    ("extra", "exports"),
    [
        pytest.param({}, False, id="no-endpoint-nothing-exported"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "{rx}"}, True, id="endpoint"),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "{rx}/v1/traces"}, True, id="traces-endpoint"
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "{rx}", "OTEL_SDK_DISABLED": "true"},
            False,
            id="sdk-disabled",
        ),
    ],
)
def test_spans_are_exported_only_when_an_otlp_endpoint_is_set(
    extra: dict[str, str], exports: bool
) -> None:
    """In a process of its own (a tracer provider is set once per process), with a receiver
    listening either way: without an endpoint nothing arrives and nothing fails."""
    with OtlpReceiver() as rx:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update({k: v.format(rx=rx.endpoint) for k, v in extra.items()})
        env["OTEL_SERVICE_NAME"] = "unit"
        done = subprocess.run(
            [sys.executable, "-c", CONFIGURE], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [str(exports), str(exports)]
        assert [s.name for s in rx.spans] == (["send facefleet.jobs.standard"] if exports else [])
        if exports:
            assert rx.spans[0].service == "unit"
