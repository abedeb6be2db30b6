"""The wire contract: every name and message shape that crosses RabbitMQ.

Producer, consumer, gateway and users' own consumers all import this module; it imports neither
side. Names here are public API: renaming one is a breaking change and bumps SCHEMA_VERSION.

Topology (see README "Wire contract"):

    facefleet.jobs      direct   routing key = tier  -> facefleet.jobs.<tier>   (quorum)
    facefleet.jobs.dead topic    routing key = tier  -> facefleet.jobs.dead     (quorum, parked, "#")
                                                     -> facefleet.jobs.dead.notify.<tier> (quorum)
    facefleet.events    topic    job.<job_id>.<type> -> facefleet.events.log    (stream)
    facefleet.control   topic    cancel.<tier>.<job_id> -> one exclusive queue per worker
                                                     -> facefleet.control.pending.<tier> (quorum;
                                                        the tier's workers record it in the job
                                                        state before they take jobs)
    facefleet.events    topic    job.#               -> facefleet.webhooks     (quorum; consumed
                                                        by `facefleet webhooks`)
    facefleet.webhooks  direct   routing key = queue -> facefleet.webhooks, facefleet.webhooks.
                                                        retry.<delay> (TTL, dead-lettered back),
                                                        facefleet.webhooks.failed (parked)
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = 1
"""Version of the JSON bodies below. A consumer refuses (dead-letters) any other version."""

CONTENT_TYPE = "application/json"

# --- exchanges and queues -------------------------------------------------------------------

JOBS_EXCHANGE = "facefleet.jobs"
DEAD_EXCHANGE = "facefleet.jobs.dead"
DEAD_QUEUE = "facefleet.jobs.dead"
EVENTS_EXCHANGE = "facefleet.events"
EVENTS_STREAM = "facefleet.events.log"
CONTROL_EXCHANGE = "facefleet.control"
CONTROL_PENDING_TTL_MS = 7 * 24 * 3600 * 1000
"""A pending cancel nobody recorded within a week is dropped (no worker ran in that time)."""

# --- headers ----------------------------------------------------------------------------------

HEADER_SCHEMA = "x-facefleet-schema"
HEADER_JOB_ID = "x-facefleet-job-id"
HEADER_DEAD_REASON = "x-facefleet-dead-reason"
HEADER_DEAD_CODE = "x-facefleet-dead-code"
HEADER_ATTEMPT = "x-facefleet-attempt"
HEADER_REPLAY_SEQ = "x-facefleet-replay-seq"
"""On a job message re-queued by `facefleet dead replay`: the seq of its `replayed` event. A
broker dead letter of a copy from before the last replay is ignored."""
HEADER_TRACEPARENT = "traceparent"
HEADER_TRACESTATE = "tracestate"
"""W3C trace context (facefleet/tracing.py) on job and event messages: the producer's `send`
span, or the worker's job span an event was published under. Absent when tracing is off."""
HEADER_STREAM_FILTER = "x-stream-filter-value"
"""RabbitMQ 3.13+ stream filtering; older brokers ignore the header."""

TIER_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


def job_queue(tier: str) -> str:
    """Queue that holds one tier's jobs; the only place that builds the name."""
    check_tier(tier)
    return f"{JOBS_EXCHANGE}.{tier}"


def dead_notify_queue(tier: str) -> str:
    """Per-tier copy of dead letters, consumed by that tier's workers to emit `dead_lettered`
    for jobs the broker dead-lettered itself (delivery limit). The parked DEAD_QUEUE is for
    people and is never consumed by FaceFleet."""
    check_tier(tier)
    return f"{DEAD_QUEUE}.notify.{tier}"


def check_tier(tier: str) -> str:
    if not TIER_PATTERN.match(tier):
        raise ValueError(
            f"invalid tier {tier!r}: use lower-case letters, digits and '-', starting with a letter"
        )
    return tier


def event_routing_key(job_id: str, event_type: str) -> str:
    return f"job.{job_id}.{event_type}"


def job_events_binding(job_id: str) -> str:
    """Binding key that matches every event of one job."""
    return f"job.{job_id}.*"


def cancel_routing_key(job_id: str, tier: str) -> str:
    return f"cancel.{check_tier(tier)}.{job_id}"


CANCEL_BINDING = "cancel.#"
"""What a worker's exclusive control queue binds: every cancel (it may run any of them)."""


def control_pending_queue(tier: str) -> str:
    """Durable copy of every cancel for one tier's jobs. Producers need only the broker, so a
    cancel for a job that is still queued (or for a tier scaled to zero) waits here until one of
    the tier's workers records it in the job state, before it takes any job."""
    return f"{CONTROL_EXCHANGE}.pending.{check_tier(tier)}"


def control_pending_binding(tier: str) -> str:
    return f"cancel.{check_tier(tier)}.*"


# --- webhooks ---------------------------------------------------------------------------------

WEBHOOKS_EXCHANGE = "facefleet.webhooks"
"""Direct exchange of the webhook sender's own queues: each of them is bound with its own name
as the routing key (retry copies, delay queues dead-lettering back, parked deliveries)."""
WEBHOOKS_QUEUE = "facefleet.webhooks"
"""Quorum queue bound to EVENTS_EXCHANGE with WEBHOOKS_BINDING: every event, for `facefleet
webhooks` to POST to its job's webhook_url. The name is the default of FACEFLEET_WEBHOOK_QUEUE;
the retry and failed queues are named after whatever that is."""
WEBHOOKS_BINDING = "job.#"
HEADER_WEBHOOK_ATTEMPT = "x-facefleet-webhook-attempt"
"""Which POST attempt of a webhook delivery this message is (1 = the first); on retry copies."""
HEADER_WEBHOOK_REASON = "x-facefleet-webhook-reason"
"""Why the last attempt failed (retry copies) or why the delivery was parked (failed queue)."""
HEADER_WEBHOOK_URL = "x-facefleet-webhook-url"
"""On parked deliveries: where it was going, redacted (no userinfo, query or fragment)."""
WEBHOOK_URL_MAX = 2048


def webhook_retry_queue(delay_ms: int, queue: str = WEBHOOKS_QUEUE) -> str:
    """Delay queue of one backoff step: `<queue>.retry.<delay>` (`5s`, `2m`, `10h`, `250ms`).
    Named by its delay, not its step number, so a changed schedule never meets an existing
    queue with another x-message-ttl; steps with equal delays share one queue."""
    if delay_ms <= 0:
        raise ValueError("a retry delay must be positive")
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if delay_ms % size == 0:
            return f"{queue}.retry.{delay_ms // size}{unit}"
    return f"{queue}.retry.{delay_ms}ms"


def webhook_failed_queue(queue: str = WEBHOOKS_QUEUE) -> str:
    """Parked webhook deliveries (refused target, retries exhausted, undecodable), with
    HEADER_WEBHOOK_REASON; for people, never consumed by FaceFleet."""
    return f"{queue}.failed"


def webhook_id(job_id: str, seq: int) -> str:
    """The Standard Webhooks `webhook-id` of one event: `<job_id>.<seq>`, the same on every
    attempt and from every sender replica, so receivers dedupe on it."""
    return f"{job_id}.{seq}"


def check_webhook_url(url: str) -> str:
    """Syntax and scheme of a job's webhook_url (http or https, a host, no fragment); whether
    the target may be reached (the fetch SSRF rules) is decided at delivery."""
    from urllib.parse import urlsplit

    if len(url) > WEBHOOK_URL_MAX:
        raise ValueError(f"webhook URL longer than {WEBHOOK_URL_MAX} characters")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError("webhook URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"invalid webhook URL: {exc}") from None
    if parts.scheme not in ("https", "http"):
        raise ValueError("webhook URL must start with https:// (or http://)")
    if not parts.hostname:
        raise ValueError("webhook URL names no host")
    if parts.fragment:
        raise ValueError("webhook URL must not carry a #fragment")
    return url


# --- tiers ------------------------------------------------------------------------------------


CONSUMER_TIMEOUT_MARGIN_S = 300
"""x-consumer-timeout is the tier's max_job_s plus this."""
HOLD_SAFETY_S = 60
"""Kept free between a worker's longest hold of a delivery and the consumer timeout."""
BROKER_DEFAULT_CONSUMER_TIMEOUT_MS = 1_800_000
"""RabbitMQ's broker-wide `consumer_timeout` default (30 min) since 3.8.17 (anchors.md B5)."""


@dataclass(frozen=True)
class TierSpec:
    """What the broker must know about a QoS tier.

    max_job_s bounds one job's run time; it sets the consumer timeout (3.12+) and, in the chart,
    terminationGracePeriodSeconds.
    """

    name: str
    max_job_s: int = 900
    max_length: int = 10_000
    delivery_limit: int = 5

    def consumer_timeout_ms(self) -> int:
        """Ack timeout above the tier's longest job, with margin (RabbitMQ checks once a minute)."""
        return (self.max_job_s + CONSUMER_TIMEOUT_MARGIN_S) * 1000

    def hold_budget_s(self) -> float:
        """How long a worker may keep one delivery unacked: the consumer timeout less a safety
        minute. In-process retries and claim waits stay inside it (consumer/retry.py); beyond
        it the job is given back as a fresh copy instead of being held into the timeout."""
        return self.consumer_timeout_ms() / 1000 - HOLD_SAFETY_S


DEFAULT_TIERS: tuple[TierSpec, ...] = (
    TierSpec("high", max_job_s=600, max_length=2_000),
    TierSpec("standard", max_job_s=900, max_length=10_000),
    TierSpec("batch", max_job_s=3_600, max_length=100_000),
)


@dataclass(frozen=True)
class BrokerFeatures:
    """What the connected broker supports, read from its server_properties, never assumed."""

    product: str
    version: tuple[int, ...]

    @classmethod
    def from_server_properties(cls, props: dict[str, Any]) -> BrokerFeatures:
        def text(v: Any) -> str:
            return v.decode() if isinstance(v, bytes) else str(v)

        raw = text(props.get("version", "0"))
        nums = tuple(int(x) for x in re.findall(r"\d+", raw)[:3]) or (0,)
        return cls(product=text(props.get("product", "unknown")), version=nums)

    @property
    def queue_consumer_timeout(self) -> bool:
        """x-consumer-timeout as a queue argument arrived in RabbitMQ 3.12."""
        return self.version >= (3, 12)

    @property
    def at_least_once_dead_lettering(self) -> bool:
        """Quorum queues' x-dead-letter-strategy at-least-once arrived in RabbitMQ 3.10."""
        return self.version >= (3, 10)

    @property
    def stream_filtering(self) -> bool:
        return self.version >= (3, 13)

    @property
    def leader_locator(self) -> bool:
        """x-queue-leader-locator (client-local, balanced) on quorum queues and streams arrived
        in RabbitMQ 3.10 (queue_leader_locator); balanced became the default in 4.0. An older
        broker would keep the argument without acting on it, so it is not sent there."""
        return self.version >= (3, 10)


@dataclass(frozen=True)
class Placement:
    """Where a cluster keeps a queue's replicas and its leader (FACEFLEET_QUORUM_GROUP_SIZE,
    FACEFLEET_LEADER_LOCATOR); None leaves the broker's default. Applied when a queue is
    created: existing queues keep theirs (`facefleet doctor` shows the difference)."""

    group_size: int | None = None
    leader_locator: str | None = None

    def quorum_arguments(self, features: BrokerFeatures) -> dict[str, Any]:
        return self._arguments("x-quorum-initial-group-size", features)

    def stream_arguments(self, features: BrokerFeatures) -> dict[str, Any]:
        return self._arguments("x-initial-cluster-size", features)

    def _arguments(self, size_argument: str, features: BrokerFeatures) -> dict[str, Any]:
        """The group size under the queue type's own argument name; the leader locator only
        where the broker has it."""
        args: dict[str, Any] = {}
        if self.group_size is not None:
            args[size_argument] = self.group_size
        if self.leader_locator is not None and features.leader_locator:
            args["x-queue-leader-locator"] = self.leader_locator
        return args


def job_queue_arguments(
    tier: TierSpec, features: BrokerFeatures, placement: Placement | None = None
) -> dict[str, Any]:
    args: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-delivery-limit": tier.delivery_limit,
        "x-dead-letter-exchange": DEAD_EXCHANGE,
        "x-max-length": tier.max_length,
        "x-overflow": "reject-publish",
    }
    if features.at_least_once_dead_lettering:
        # The default broker dead-lettering is at-most-once (anchors.md B9): a delivery-limit
        # dead letter could be lost. At-least-once needs reject-publish, set above.
        args["x-dead-letter-strategy"] = "at-least-once"
    if features.queue_consumer_timeout:
        args["x-consumer-timeout"] = tier.consumer_timeout_ms()
    if placement is not None:
        args.update(placement.quorum_arguments(features))
    return args


def consumer_timeout_line(tiers: tuple[TierSpec, ...] | list[TierSpec]) -> str:
    """The rabbitmq.conf line a broker without per-queue x-consumer-timeout (< 3.12) needs:
    the longest tier's consumer timeout (its max job time plus the margin)."""
    return f"consumer_timeout = {max(t.consumer_timeout_ms() for t in tiers)}"


def consumer_timeout_advice(
    tiers: tuple[TierSpec, ...] | list[TierSpec], features: BrokerFeatures
) -> str:
    """What `facefleet topology apply` says about ack timeouts on this broker."""
    if features.queue_consumer_timeout:
        return "per-queue x-consumer-timeout set"
    longest = max(tiers, key=lambda t: t.consumer_timeout_ms())
    need = longest.consumer_timeout_ms()
    default = (
        f"above the {BROKER_DEFAULT_CONSUMER_TIMEOUT_MS} ms default, so the line is required"
        if need > BROKER_DEFAULT_CONSUMER_TIMEOUT_MS
        else f"the {BROKER_DEFAULT_CONSUMER_TIMEOUT_MS} ms default covers it unless it was lowered"
    )
    return (
        "broker < 3.12 takes no per-queue x-consumer-timeout; the broker-wide one must exceed "
        f"the longest tier's need ({longest.name}: max job {longest.max_job_s} s + "
        f"{CONSUMER_TIMEOUT_MARGIN_S} s = {need} ms, {default}). Put this line in rabbitmq.conf "
        f"and restart the broker:\n    {consumer_timeout_line(tiers)}"
    )


def consumer_timeout_warning(tier: TierSpec, features: BrokerFeatures) -> str | None:
    """The worker's start-up warning when the broker (< 3.12) cannot hold this tier's deliveries
    long enough by default; None when nothing is at risk or the broker sets it per queue."""
    if features.queue_consumer_timeout:
        return None
    need = tier.consumer_timeout_ms()
    if need <= BROKER_DEFAULT_CONSUMER_TIMEOUT_MS:
        return None
    version = ".".join(map(str, features.version))
    return (
        f"{features.product} {version} is older than 3.12, so the queue cannot carry "
        f"x-consumer-timeout; tier {tier.name!r} holds a delivery up to {need} ms (max job "
        f"{tier.max_job_s} s + {CONSUMER_TIMEOUT_MARGIN_S} s), more than the broker's "
        f"{BROKER_DEFAULT_CONSUMER_TIMEOUT_MS} ms (30 min) default. Unless rabbitmq.conf already "
        f"sets a higher value, put `{consumer_timeout_line([tier])}` there and restart the "
        "broker, or jobs over 30 minutes are requeued mid-run"
    )


DEAD_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}
CONTROL_PENDING_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-message-ttl": CONTROL_PENDING_TTL_MS,
}
EVENTS_STREAM_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "stream",
    "x-max-age": "7D",
    "x-max-length-bytes": 5_000_000_000,
    "x-stream-max-segment-size-bytes": 50_000_000,
}


# --- messages ---------------------------------------------------------------------------------

EventType = Literal[
    "queued",
    "started",
    "progress",
    "retrying",
    "completed",
    "failed",
    "dead_lettered",
    "cancelled",
    "replayed",
]
"""`replayed` follows a `dead_lettered` when an operator re-queues the job (`facefleet dead
replay`): the job is open again, with a fresh attempt budget."""
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
TERMINAL_EVENTS: frozenset[str] = frozenset({"completed", "failed", "dead_lettered", "cancelled"})

ErrorCode = Literal[
    # bad input: permanent
    "invalid_request",
    "unsupported_schema",
    "media_not_found",
    "media_outside_data_root",
    "corrupt_media",
    "unsupported_media",
    "too_large",
    "fetch_refused",
    "fetch_failed",
    "no_face_in_source",
    "no_face_in_target",
    "invalid_option",
    "deadline_exceeded",
    # environment: mostly transient
    "model_missing",
    "storage_error",
    "resource_exhausted",
    "internal_error",
    "delivery_limit",
    "tier_full",
]
ERROR_CODES: tuple[str, ...] = get_args(ErrorCode)


def utcnow() -> datetime:
    return datetime.now(UTC)


class DecodeError(ValueError):
    """A body that is not a valid message of our schema; carries the reason for the dead letter."""

    def __init__(self, reason: str, *, code: ErrorCode = "invalid_request") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code: ErrorCode = code


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def decode(cls, body: bytes) -> Any:
        """Parse and validate; any failure becomes a DecodeError naming what is wrong."""
        try:
            raw = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DecodeError(f"body is not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise DecodeError(f"body is a JSON {type(raw).__name__}, expected an object")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DecodeError(
                f"unsupported schema_version {version!r}; this build reads {SCHEMA_VERSION}",
                code="unsupported_schema",
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                for e in exc.errors()
            )
            raise DecodeError(f"invalid {cls.__name__}: {problems}") from exc


JobOptionValue = str | int | float | bool | None

ESTIMATE_VERSION = 1
"""Version of WorkEstimate's shape. A reader that meets a newer one ignores the facts and uses
its tier's default estimate, so producers may move ahead of scalers."""

WorkKind = Literal["image", "video", "unknown"]


class WorkEstimate(BaseModel):
    """What a job will cost, known before it runs: the facts its producer had at submit (target
    kind, pixels per frame, frames, faces when known, processor, enhancer) and the GPU-seconds
    its cost model (facefleet/costmodel.py) made of them. The scaler re-prices the facts with its
    own, re-fitted model; `gpu_s` is the producer's figure, used when the facts are too thin."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int = ESTIMATE_VERSION
    kind: WorkKind = "unknown"
    pixels: int | None = Field(default=None, ge=0)
    """Pixels of one target frame (width x height)."""
    frames: int | None = Field(default=None, ge=0)
    """Frames of the target (1 for an image)."""
    faces: int | None = Field(default=None, ge=0)
    processor: str | None = None
    enhance: bool = False
    gpu_s: float = Field(ge=0)


class JobRequest(_Message):
    """One face-fusion job as published to facefleet.jobs."""

    job_id: str
    idempotency_key: str = Field(min_length=1, max_length=200)
    tier: str
    created_at: datetime
    deadline: datetime | None = None
    processor: str | None = None
    """Optional pin to a processor; a worker running another one fails the job clearly."""
    source_uri: str = Field(min_length=1)
    target_uri: str = Field(min_length=1)
    output_uri_prefix: str = Field(min_length=1)
    options: dict[str, JobOptionValue] = Field(default_factory=dict)
    webhook_url: str | None = Field(default=None, max_length=2048)
    """Where `facefleet webhooks` POSTs this job's events (Standard Webhooks, signed)."""
    webhook_events: tuple[EventType, ...] | None = None
    """Which event types to POST; None = every one but progress."""
    api_key_id: str | None = Field(default=None, max_length=64)
    """Who submitted the job (the gateway sets it: an API key's id, never the key): usage,
    limits and listings are per key."""
    estimate: WorkEstimate | None = None
    """What the job will cost (set at submit; also in its `queued` event, for the scaler).
    Absent on messages from older producers: readers use their tier's default estimate."""

    @field_validator("tier")
    @classmethod
    def _tier(cls, v: str) -> str:
        return check_tier(v)

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, v: str) -> str:
        try:
            uuid.UUID(v)
        except ValueError as exc:
            raise ValueError("job_id must be a UUID") from exc
        return v


class EventPayload(BaseModel):
    """Payload of an event; which fields are set depends on the event type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # progress
    fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    stage: str | None = None
    eta_s: float | None = None
    frames_done: int | None = None
    frames_total: int | None = None
    # started / retrying
    worker: str | None = None
    attempt: int | None = None
    delay_s: float | None = None
    queue_wait_s: float | None = None
    # completed
    result_uri: str | None = None
    manifest_uri: str | None = None
    timings_s: dict[str, float] | None = None
    # failed / retrying / dead_lettered / cancelled
    code: ErrorCode | None = None
    message: str | None = None
    retryable: bool | None = None
    # queued
    tier: str | None = None
    webhook_url: str | None = None
    webhook_events: tuple[str, ...] | None = None
    api_key_id: str | None = None
    estimate: WorkEstimate | None = None
    # replayed
    replayed_by: str | None = None


class JobEvent(_Message):
    """One entry in a job's history: per job, seq starts at 1 and increases by exactly 1."""

    job_id: str
    seq: int = Field(ge=1)
    type: EventType
    ts: datetime
    payload: EventPayload = Field(default_factory=EventPayload)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


class CancelRequest(_Message):
    job_id: str
    tier: str | None = None
    """The job's tier (also in the routing key); optional for old senders."""
    reason: str = "cancelled by user"
    requested_at: datetime


def queued_event(job: JobRequest) -> JobEvent:
    """A job's first event (seq 1). The producer publishes it after the job's confirm; the
    worker that first takes the job records the very same event in the job state (it never saw
    the producer's copy), so history is gapless and a duplicate seq 1 is identical."""
    return JobEvent(
        job_id=job.job_id,
        seq=1,
        type="queued",
        ts=job.created_at,
        payload=EventPayload(
            tier=job.tier,
            webhook_url=job.webhook_url,
            webhook_events=job.webhook_events,
            api_key_id=job.api_key_id,
            estimate=job.estimate,
        ),
    )


def job_id_for_key(idempotency_key: str) -> str:
    """Deterministic job id: the same idempotency key always names the same job."""
    return str(uuid.uuid5(_JOB_NAMESPACE, idempotency_key))


def scoped_idempotency_key(api_key_id: str, key: str) -> str:
    """The idempotency key a job submitted through the gateway carries: the caller's key within
    its API key, so two API keys that both say `order-1` get two jobs, and neither can reach
    (or learn of) the other's job by guessing its key."""
    return f"{api_key_id}:{key}"


_JOB_NAMESPACE = uuid.UUID("6f1c1a52-3c55-4f43-8a51-0d1f4c6a9e21")
