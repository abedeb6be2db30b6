"""One job, one trace, across processes: the producer SDK (this process) and a real worker
subprocess both export over OTLP/HTTP to a local receiver (tests/otlp.py); the worker's
`process` span continues the producer's `send` span through the W3C trace context in the job
message's headers, its steps and stages are children, and its log lines carry the trace ids."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from facefleet import tracing
from facefleet.producer.sdk import JobClient
from facefleet.settings import ProducerSettings
from facefleet.wire import job_queue
from tests.conftest import Env
from tests.otlp import OtlpReceiver, ReceivedSpan
from tests.spine.test_dead import ends_in, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    """The receiver, and this process's facefleet spans exported to it (as an application
    using the SDK would configure it: OTEL_EXPORTER_OTLP_ENDPOINT read by the exporter). The
    tracer is patched rather than the global provider set: a provider is set once per process."""
    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        provider = TracerProvider(
            resource=Resource.create({"service.name": "test-producer"}), shutdown_on_exit=False
        )
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
        monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("facefleet"))
        yield rx
        provider.shutdown()


def one(spans: list[ReceivedSpan], **match: object) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [(s.service, s.name) for s in spans])
    return found[0]


def test_a_job_is_one_trace_from_submit_through_the_workers_stages(
    env: Env, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.settings_env(monkeypatch)
    client = JobClient(ProducerSettings.load())
    client.apply_topology()
    worker = env.start_worker(
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_SERVICE_NAME="test-worker",
        FACEFLEET_MAX_ATTEMPTS="1",
    )
    src = env.data_root / "in.txt"
    src.write_text("the sleep processor does not read it")
    job = client.submit(env.tier, str(src), str(src), options={"sleep_s": 0.3, "steps": 2}).job_id
    wait_for(env, job, ends_in("completed"))

    def complete(spans: list[ReceivedSpan]) -> bool:
        names = {(s.service, s.name) for s in spans}
        return {
            ("test-producer", f"send {job_queue(env.tier)}"),
            ("test-worker", "commit"),
        } <= names and any(s.name.startswith("process ") for s in spans)

    spans = receiver.wait_for(complete)
    queue = job_queue(env.tier)
    send = one(spans, service="test-producer", name=f"send {queue}")
    process = one(spans, service="test-worker", name=f"process {queue}")

    # One trace: the worker's span continues the producer's through the message headers.
    assert process.trace_id == send.trace_id
    assert process.parent_span_id == send.span_id
    assert send.kind == SpanKind.PRODUCER.value + 1  # OTLP's enum counts UNSPECIFIED as 0
    assert process.kind == SpanKind.CONSUMER.value + 1
    for span in (send, process):
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.destination.name"] == queue
        assert span.attributes["messaging.message.id"] == job
        assert span.attributes["facefleet.job_id"] == job
        assert span.attributes["facefleet.tier"] == env.tier
    assert process.attributes["facefleet.queue_wait_s"] >= 0
    assert process.attributes["facefleet.outcome"] == "ack"

    # The runner's steps are children of the job's span; the processor's stages of its step.
    worker_spans = [s for s in spans if s.service == "test-worker" and s.trace_id == send.trace_id]
    for name in ("fetch inputs", "process", "stage result", "commit"):
        assert one(worker_spans, name=name).parent_span_id == process.span_id, name
    assert {s.parent_span_id for s in worker_spans if s.name == "publish events"} == {
        process.span_id
    }
    step = one(worker_spans, name="process")
    stage = one(worker_spans, name="sleep")
    assert stage.parent_span_id == step.span_id
    assert stage.attributes["facefleet.stage"] == "sleep"

    # A job's log lines (a transient failure logs one) carry its trace and the span they were
    # logged in.
    failing = client.submit(env.tier, str(src), str(src), options={"fail": "transient"}).job_id
    wait_for(env, failing, ends_in("dead_lettered"))
    client.close()
    worker.signal()
    worker.proc.wait(30)
    spans = receiver.wait_for(
        lambda got: (
            any(s.attributes.get("facefleet.job_id") == failing for s in got)
            and any(s.name == "fetch inputs" for s in got if s.trace_id != send.trace_id)
        )
    )
    trace_id = one(
        spans,
        name=f"send {queue}",
        service="test-producer",
        trace_id=next(s.trace_id for s in spans if s.attributes.get("facefleet.job_id") == failing),
    ).trace_id
    records = [json.loads(line) for line in worker.log.read_text().splitlines() if line.strip()]
    about = [r for r in records if r.get("job_id") == failing]
    assert any("transient error" in r["event"] for r in about), records
    assert {r.get("trace_id") for r in about} == {trace_id}, about
    known = {s.span_id for s in spans if s.trace_id == trace_id}
    assert all(r["span_id"] in known for r in about), about
