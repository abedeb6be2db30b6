"""The wire contract: names, queue arguments by broker version, message round trips and refusals."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from facefleet import wire
from facefleet.wire import (
    DEFAULT_TIERS,
    BrokerFeatures,
    DecodeError,
    EventPayload,
    JobEvent,
    JobRequest,
    TierSpec,
    consumer_timeout_advice,
    consumer_timeout_warning,
    job_id_for_key,
    job_queue_arguments,
)


def make_request(**overrides: object) -> JobRequest:
    fields: dict[str, object] = {
        "job_id": str(uuid.uuid4()),
        "idempotency_key": "k1",
        "tier": "standard",
        "created_at": datetime(2026, 11, 21, tzinfo=UTC),
        "source_uri": "file:///data/a.jpg",
        "target_uri": "file:///data/b.jpg",
        "output_uri_prefix": "file:///data/results/",
        "options": {"enhance": True, "enhance_blend": 80},
    }
    fields.update(overrides)
    return JobRequest.model_validate(fields)


def test_public_names_are_stable() -> None:
    assert wire.JOBS_EXCHANGE == "facefleet.jobs"
    assert wire.job_queue("high") == "facefleet.jobs.high"
    assert wire.DEAD_EXCHANGE == "facefleet.jobs.dead"
    assert wire.EVENTS_EXCHANGE == "facefleet.events"
    assert wire.event_routing_key("abc", "progress") == "job.abc.progress"
    assert wire.dead_notify_queue("batch") == "facefleet.jobs.dead.notify.batch"


@pytest.mark.parametrize(
    "tier",
    [
        pytest.param("High", id="upper-case"),
        pytest.param("a.b", id="dot-would-change-queue-names"),
        pytest.param("", id="empty"),
        pytest.param("1tier", id="leading-digit"),
    ],
)
def test_bad_tier_names_are_refused(tier: str) -> None:
    with pytest.raises(ValueError, match="invalid tier"):
        wire.job_queue(tier)


@pytest.mark.parametrize(
    ("version", "has_timeout", "has_filter"),
    [
        pytest.param(b"3.10.8", False, False, id="3.10-no-consumer-timeout-arg"),
        pytest.param(b"3.12.0", True, False, id="3.12-consumer-timeout-arg"),
        pytest.param(b"3.13.7", True, True, id="3.13-stream-filter"),
        pytest.param(b"4.2.1", True, True, id="4.x"),
        pytest.param(b"garbage", False, False, id="unparseable-version-assumes-oldest"),
    ],
)
def test_queue_arguments_follow_broker_features(
    version: bytes, has_timeout: bool, has_filter: bool
) -> None:
    feats = BrokerFeatures.from_server_properties({"product": b"RabbitMQ", "version": version})
    args = job_queue_arguments(TierSpec("high", max_job_s=600), feats)
    assert args["x-queue-type"] == "quorum"
    assert args["x-overflow"] == "reject-publish"
    assert args["x-dead-letter-exchange"] == "facefleet.jobs.dead"
    assert ("x-consumer-timeout" in args) is has_timeout
    if has_timeout:
        assert args["x-consumer-timeout"] > 600_000  # above the tier's longest job
    assert feats.stream_filtering is has_filter


def features(version: bytes) -> BrokerFeatures:
    return BrokerFeatures.from_server_properties({"product": b"RabbitMQ", "version": version})


@pytest.mark.parametrize(
    ("version", "strategy"),
    [
        pytest.param(b"3.9.29", None, id="3.9-at-most-once-only"),
        pytest.param(b"3.10.8", "at-least-once", id="3.10-at-least-once"),
        pytest.param(b"4.2.1", "at-least-once", id="4.x-at-least-once"),
        pytest.param(b"garbage", None, id="unparseable-version-assumes-oldest"),
    ],
)
def test_dead_letter_strategy_is_at_least_once_where_supported(
    version: bytes, strategy: str | None
) -> None:
    args = job_queue_arguments(TierSpec("high"), features(version))
    assert args.get("x-dead-letter-strategy") == strategy
    assert args["x-overflow"] == "reject-publish"  # at-least-once needs it (anchors.md B9)


@pytest.mark.parametrize(
    ("version", "tiers", "expected"),
    [
        pytest.param(
            b"3.10.8",
            DEFAULT_TIERS,
            ["consumer_timeout = 3900000", "batch: max job 3600 s", "line is required"],
            id="3.10-default-tiers-need-the-batch-line",
        ),
        pytest.param(
            b"3.11.28",
            (TierSpec("quick", max_job_s=60),),
            ["consumer_timeout = 360000", "default covers it"],
            id="3.11-short-tiers-line-still-printed",
        ),
        pytest.param(
            b"3.12.0", DEFAULT_TIERS, ["per-queue x-consumer-timeout set"], id="3.12-per-queue"
        ),
    ],
)
def test_topology_advice_names_the_exact_rabbitmq_conf_line(
    version: bytes, tiers: tuple[TierSpec, ...], expected: list[str]
) -> None:
    advice = consumer_timeout_advice(tiers, features(version))
    for text in expected:
        assert text in advice
    if features(version).queue_consumer_timeout:
        assert "consumer_timeout =" not in advice
    else:
        assert advice.splitlines()[-1].strip().startswith("consumer_timeout = ")


@pytest.mark.parametrize(
    ("version", "max_job_s", "line"),
    [
        pytest.param(b"3.10.8", 3600, "consumer_timeout = 3900000", id="3.10-batch-warns"),
        pytest.param(b"3.10.8", 1501, "consumer_timeout = 1801000", id="3.10-just-over-30-min"),
        pytest.param(b"3.10.8", 1500, None, id="3.10-exactly-30-min-no-warning"),
        pytest.param(b"3.10.8", 600, None, id="3.10-high-tier-no-warning"),
        pytest.param(b"3.12.0", 3600, None, id="3.12-per-queue-no-warning"),
    ],
)
def test_worker_warns_when_an_old_broker_default_is_too_short(
    version: bytes, max_job_s: int, line: str | None
) -> None:
    warning = consumer_timeout_warning(TierSpec("batch", max_job_s=max_job_s), features(version))
    if line is None:
        assert warning is None
    else:
        assert warning is not None
        assert f"`{line}`" in warning and "older than 3.12" in warning
        assert "RabbitMQ 3.10.8" in warning


def test_job_request_round_trips() -> None:
    req = make_request()
    assert JobRequest.decode(req.encode()) == req


def test_event_round_trips() -> None:
    ev = JobEvent(
        job_id=str(uuid.uuid4()),
        seq=3,
        type="progress",
        ts=datetime.now(UTC),
        payload=EventPayload(fraction=0.5, stage="swap", eta_s=2.0),
    )
    assert JobEvent.decode(ev.encode()) == ev
    assert not ev.terminal


@pytest.mark.parametrize(
    ("body", "message", "code"),
    [
        pytest.param(b"\xff\xfe", "not JSON", "invalid_request", id="binary"),
        pytest.param(b"{", "not JSON", "invalid_request", id="truncated-json"),
        pytest.param(b'"a string"', "expected an object", "invalid_request", id="json-string"),
        pytest.param(
            b"{}", "unsupported schema_version None", "unsupported_schema", id="no-version"
        ),
        pytest.param(
            b'{"schema_version": 2}',
            "unsupported schema_version 2",
            "unsupported_schema",
            id="future-version",
        ),
        pytest.param(
            b'{"schema_version": 1}',
            "job_id: Field required",
            "invalid_request",
            id="missing-fields",
        ),
    ],
)
def test_undecodable_jobs_say_why(body: bytes, message: str, code: str) -> None:
    with pytest.raises(DecodeError) as info:
        JobRequest.decode(body)
    assert message in info.value.reason
    assert info.value.code == code


@pytest.mark.parametrize(
    ("override", "message"),
    [
        pytest.param({"job_id": "42"}, "job_id must be a UUID", id="job-id-not-uuid"),
        pytest.param({"tier": "Nope!"}, "invalid tier", id="bad-tier"),
        pytest.param({"idempotency_key": ""}, "idempotency_key", id="empty-key"),
        pytest.param({"options": {"nested": {"a": 1}}}, "options.nested", id="nested-option"),
        pytest.param({"surprise": 1}, "surprise", id="unknown-field"),
    ],
)
def test_invalid_fields_are_named(override: dict[str, object], message: str) -> None:
    raw = json.loads(make_request().encode())
    raw.update(override)
    with pytest.raises(DecodeError, match=message):
        JobRequest.decode(json.dumps(raw).encode())


def test_job_id_is_a_function_of_the_idempotency_key() -> None:
    assert job_id_for_key("order-1") == job_id_for_key("order-1")
    assert job_id_for_key("order-1") != job_id_for_key("order-2")
    uuid.UUID(job_id_for_key("order-1"))
