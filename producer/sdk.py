"""Synchronous producer SDK on pika: submit with confirms, cancel, queue status.

    client = JobClient(ProducerSettings.load())
    result = client.submit("standard", "photos/me.jpg", "photos/group.jpg", options={"enhance": True})
    client.close()

A submission is durable when `submit()` returns: the job is confirmed by the broker (quorum
queue: by a quorum of replicas) and its `queued` event (seq 1) is confirmed into the events
stream. Producers need only the broker and the media store: local files are uploaded to the
store (content-addressed), and they never open a job journal; the worker that first takes the
job records the same `queued` event in the job state (wire.queued_event).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict, TypeVar
from urllib.parse import urlparse

import pika
import pika.exceptions
from opentelemetry.trace import Span
from pika.adapters.blocking_connection import BlockingChannel
from typing_extensions import Unpack

from facefleet import tracing
from facefleet.amqp import (
    Backoff,
    PublishBlocked,
    PublishNacked,
    PublishUnroutable,
    ThreadedPublisher,
    connect,
    connection_endpoint,
    declare_topology,
    publish_event,
)
from facefleet.costmodel import CostModel, estimate_for
from facefleet.management import ManagementUnavailable, read_queues
from facefleet.media import MediaStore
from facefleet.producer.errors import (
    BatchSubmitError,
    BrokerBlockedError,
    InvalidJobError,
    PublishNackedError,
    SubmitError,
    refused,
    unroutable,
)
from facefleet.settings import ProducerSettings, SettingsError
from facefleet.storage import StorageError
from facefleet.wire import (
    CONTENT_TYPE,
    CONTROL_EXCHANGE,
    HEADER_JOB_ID,
    HEADER_SCHEMA,
    JOBS_EXCHANGE,
    SCHEMA_VERSION,
    CancelRequest,
    EventType,
    JobOptionValue,
    JobRequest,
    WorkEstimate,
    cancel_routing_key,
    check_tier,
    check_webhook_url,
    job_id_for_key,
    job_queue,
    queued_event,
    utcnow,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

LINK_ERRORS = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionWrongStateError,
    pika.exceptions.ChannelWrongStateError,
)
"""The link to the node went (or its connection was closed under us): try another node."""


@dataclass(frozen=True)
class SubmitResult:
    job_id: str
    duplicate: bool
    """True when the idempotency key was seen before: no new job was queued."""
    request: JobRequest | None = None


@dataclass(frozen=True)
class TierStatus:
    tier: str
    ready: int
    unacked: int | None
    consumers: int


FETCHED_SCHEMES = ("https", "http")
"""Inputs a worker fetches itself (SSRF-guarded there: FACEFLEET_FETCH_ALLOW)."""


def media_uri(media: MediaStore, value: str) -> str:
    """A URI for the job: local files are uploaded to the media store (content-addressed, never
    twice), https:// URLs pass (the worker fetches them), store URIs are checked."""
    if "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme in FETCHED_SCHEMES:
            if not urlparse(value).hostname:
                raise StorageError("invalid_request", f"{value}: no host in the URL")
            return value
        if media.owns(value):
            return value
        raise StorageError(
            "media_outside_data_root",
            f"{value}: outside the media store {media.url}; give a local file (it is uploaded) "
            "or an https:// URL",
        )
    path = Path(value)
    if path.is_file():
        local = path.resolve().as_uri()
        if media.owns(local):  # already in a file:// store: no copy
            return local
        return media.put_file(path)
    raise StorageError("media_not_found", f"{value}: no such file")


class JobFields(TypedDict, total=False):
    """The optional parts of a job request, shared by build_request and both SDKs' submit()."""

    options: dict[str, JobOptionValue] | None
    idempotency_key: str | None
    deadline: datetime | None
    output_uri_prefix: str | None
    processor: str | None
    webhook_url: str | None
    """Where `facefleet webhooks` POSTs the job's events (http(s); signed, Standard Webhooks)."""
    webhook_events: Sequence[EventType] | None
    """Which event types to POST; None (the default) = every one but progress."""
    estimate: WorkEstimate | None
    """What the job will cost; None (the default) = priced here from the target (a local file
    is probed, a URL's kind guessed from its name) with the cost model's defaults."""


def build_request(
    media: MediaStore,
    tier: str,
    source: str,
    target: str,
    *,
    cost_model: CostModel | None = None,
    **fields: Unpack[JobFields],
) -> JobRequest:
    options = fields.get("options")
    idempotency_key = fields.get("idempotency_key")
    output_uri_prefix = fields.get("output_uri_prefix")
    webhook_url = fields.get("webhook_url")
    webhook_events = fields.get("webhook_events")
    try:
        check_tier(tier)
        if webhook_url is not None:
            check_webhook_url(webhook_url)
        elif webhook_events is not None:
            raise ValueError("webhook_events without a webhook_url")
        if output_uri_prefix:
            media.check_output_prefix(output_uri_prefix)  # results land in the store too
        key = idempotency_key or str(uuid.uuid4())
        estimate = fields.get("estimate") or estimate_for(
            cost_model or CostModel(),
            tier,
            target,
            processor=fields.get("processor"),
            options=options,
        )
        return JobRequest(
            job_id=job_id_for_key(key),
            idempotency_key=key,
            tier=tier,
            created_at=utcnow(),
            deadline=fields.get("deadline"),
            processor=fields.get("processor"),
            source_uri=media_uri(media, source),
            target_uri=media_uri(media, target),
            output_uri_prefix=output_uri_prefix or media.default_output_prefix(),
            options=dict(options or {}),
            webhook_url=webhook_url,
            webhook_events=None if webhook_events is None else tuple(webhook_events),
            estimate=estimate,
        )
    except StorageError as exc:
        raise InvalidJobError(exc.message) from exc
    except ValueError as exc:
        raise InvalidJobError(str(exc)) from exc


def tier_max_length(settings: ProducerSettings, tier: str) -> int | None:
    """The tier's max_length from the settings' tier specs (None for a tier they do not know)."""
    try:
        return settings.tier_spec(tier).max_length
    except SettingsError:
        return None


def job_properties(request: JobRequest, span: Span | None = None) -> pika.BasicProperties:
    """A job message's properties, with the trace context of its `send` span (default: the
    current span) in its headers (facefleet/tracing.py)."""
    headers: dict[str, Any] = {HEADER_SCHEMA: SCHEMA_VERSION, HEADER_JOB_ID: request.job_id}
    tracing.inject(headers, span)
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=request.job_id,
        timestamp=int(request.created_at.timestamp()),
        headers=headers,
    )


def cancel_request(media: MediaStore, job_id: str, reason: str, tier: str | None) -> CancelRequest:
    """The cancel message for a job; its tier (which routes it) from the job's submission
    record in the media store when the caller does not name it."""
    try:
        job_id = str(uuid.UUID(job_id))
    except ValueError as exc:
        raise InvalidJobError(f"{job_id!r} is not a job id") from exc
    if tier is None:
        body = media.submission(job_id)
        if body is None:
            raise InvalidJobError(
                f"job {job_id}: no submission record in the media store {media.url}; "
                "name its tier (--tier)"
            )
        tier = JobRequest.decode(body).tier
    check_tier(tier)
    return CancelRequest(job_id=job_id, tier=tier, reason=reason, requested_at=utcnow())


def unroutable_cancel(msg: CancelRequest) -> SubmitError:
    return SubmitError(
        f"the cancel of job {msg.job_id} reached no queue: is tier {msg.tier!r} declared? "
        "(`facefleet topology apply` declares facefleet.control.pending.<tier>)"
    )


def cancel_properties(msg: CancelRequest) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=f"cancel:{msg.job_id}",
        headers={HEADER_SCHEMA: SCHEMA_VERSION, HEADER_JOB_ID: msg.job_id},
    )


class JobClient:
    """Blocking client; one per thread (pika connections are not thread-safe)."""

    def __init__(self, settings: ProducerSettings, *, media: MediaStore | None = None) -> None:
        self.settings = settings
        self.media = media or settings.media_store()
        self.cost_model = settings.cost_model()
        """Prices each job at submit (the estimate on the wire; the scaler re-fits its own)."""
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._publisher: ThreadedPublisher | None = None
        """Pipelined confirms for submit_many (started on its first use)."""
        self.management_problem: str | None = None
        """Why the last status() has no unacked counts (management API unreachable), or None."""
        self.blocked: str | None = None
        """Why the broker blocks this connection now (connection.blocked reason), or None."""
        self._failed: str | None = None
        """host:port of the node whose link was lost last: the next connect tries it last."""

    # --- connection ----------------------------------------------------------------------------

    def _ch(self) -> BlockingChannel:
        if self._connection is None or not self._connection.is_open:
            self._connection = connect(
                self.settings.amqp_urls,
                "facefleet-producer",
                blocked_timeout_s=self.settings.blocked_timeout_s,
                avoid=self._failed,
            )
            # On the underlying connection: BlockingConnection queues its own callbacks until the
            # next process_data_events, and a publish that times out blocked never gets there.
            impl = self._connection._impl
            impl.add_on_connection_blocked_callback(self._on_blocked)
            impl.add_on_connection_unblocked_callback(self._on_unblocked)
            self.blocked = None
            self._channel = None
        if self._channel is None or not self._channel.is_open:
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
        return self._channel

    def _on_blocked(self, _conn: Any, frame: Any) -> None:
        self.blocked = str(getattr(frame.method, "reason", "") or "resource alarm")

    def _on_unblocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = None

    def _drop(self) -> None:
        """Forget a connection that failed (closing it quietly if it is still half open)."""
        conn, self._connection, self._channel = self._connection, None, None
        if conn is None:
            return
        self._failed = connection_endpoint(conn) or self._failed
        if conn.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                conn.close()

    def _renew_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and channel.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                channel.close()

    def _failover(self, what: Callable[[BlockingChannel], T]) -> T:
        """Run one broker operation; if the link to its node goes, retry it through the other
        addresses of AMQP_URL (jittered backoff) for up to confirm_timeout_s. A job published
        again after a lost confirm is the same job id: the worker runs it once. A broker that
        blocks us longer than blocked_timeout_s is BrokerBlockedError, not a retry."""
        deadline = time.monotonic() + self.settings.confirm_timeout_s
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                return what(self._ch())
            except pika.exceptions.ConnectionBlockedTimeout as exc:
                reason = self.blocked or "resource alarm"
                self._drop()
                raise BrokerBlockedError(reason, self.settings.blocked_timeout_s) from exc
            except PublishNackedError:
                # Not a full tier (that is TierFullError): the broker took no responsibility
                # for the message, so it is safe to send again, on a fresh channel (RabbitMQ
                # 3.10 keeps nacking on a channel whose first publish met a leader election).
                self._renew_channel()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(backoff.next_s())
            except LINK_ERRORS as exc:
                self._drop()
                if time.monotonic() >= deadline:
                    raise
                delay = backoff.next_s()
                log.warning("broker link lost (%r); trying another node in %.1f s", exc, delay)
                time.sleep(delay)

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        if self._connection is not None and self._connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._connection.close()  # a broker gone meanwhile has nothing to close
        self._connection = None

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def apply_topology(self) -> None:
        def apply(_ch: BlockingChannel) -> None:
            assert self._connection is not None
            declare_topology(self._connection, self.settings.tiers(), self.settings.placement())

        self._failover(apply)

    # --- jobs --------------------------------------------------------------------------------

    def submit(
        self, tier: str, source: str, target: str, **fields: Unpack[JobFields]
    ) -> SubmitResult:
        """Queue one job; returns once the broker confirmed it and `queued` was published.

        Raises TierFullError, UnroutableJobError, PublishNackedError or InvalidJobError.
        """
        return self.submit_request(
            build_request(self.media, tier, source, target, cost_model=self.cost_model, **fields)
        )

    def submit_request(self, request: JobRequest) -> SubmitResult:
        """Queue one built request (see submit). A key seen before is a duplicate: nothing is
        published. Two submitters racing on one key may both publish; the worker runs it once,
        and exactly one of them reports duplicate=False."""
        if self.media.submitted(request.job_id):
            return SubmitResult(request.job_id, duplicate=True)
        with tracing.send(request.job_id, request.tier):
            self._failover(lambda ch: self._publish_job(ch, request))
            fresh = self.media.mark_submitted(request.job_id, request.encode())
            self._failover(lambda ch: publish_event(ch, queued_event(request)))
        return SubmitResult(request.job_id, duplicate=not fresh, request=request if fresh else None)

    def submit_many(self, requests: Sequence[JobRequest]) -> list[SubmitResult]:
        """Queue many jobs at once, each with submit_request's guarantees (confirmed, `queued`
        confirmed into the stream before this returns), with confirms pipelined. Results are
        in request order.

        Raises BatchSubmitError if any job was not queued; its .errors say why, by job id,
        and its .results hold the jobs that were. A tier's max_length is enforced by the
        broker per message as it applies them, so a batch sent to a tier close to full may
        overshoot the limit by up to its size before the rest is refused as tier full.
        """
        if self._publisher is None:
            self._publisher = ThreadedPublisher(
                self.settings.amqp_urls,
                "facefleet-producer-batch",
                confirm_timeout_s=self.settings.confirm_timeout_s,
                blocked_timeout_s=self.settings.blocked_timeout_s,
            )
            self._publisher.start()
        pub = self._publisher
        by_id = {r.job_id: r for r in requests}
        duplicate = {job_id for job_id in by_id if self.media.submitted(job_id)}
        fresh = [r for job_id, r in by_id.items() if job_id not in duplicate]
        errors: dict[str, SubmitError] = {}
        # One `send` span per job (each job is its own trace), ended at its confirm.
        spans = {r.job_id: tracing.start_send(r.job_id, r.tier) for r in fresh}
        with pub.burst():
            confirms = [
                (
                    r,
                    pub.publish_async(
                        JOBS_EXCHANGE, r.tier, r.encode(), job_properties(r, spans[r.job_id])
                    ),
                )
                for r in fresh
            ]
        queued = []
        for request, confirm in confirms:
            try:
                confirm.result(timeout=self.settings.confirm_timeout_s + 5)
            except PublishUnroutable:
                errors[request.job_id] = unroutable(request.tier)
            except PublishNacked:
                errors[request.job_id] = self._refusal(request)
            except PublishBlocked as exc:
                errors[request.job_id] = BrokerBlockedError(exc.reason, exc.waited_s)
            finally:
                err = errors.get(request.job_id)
                tracing.end(
                    spans.pop(request.job_id),
                    **{"error.type": None if err is None else type(err).__name__},
                )
            if request.job_id in errors:
                continue
            if not self.media.mark_submitted(request.job_id, request.encode()):
                duplicate.add(request.job_id)
            queued.append(request)
        with pub.burst():
            events = [pub.publish_event(queued_event(r)) for r in queued]
        for event in events:
            try:
                event.result(timeout=self.settings.confirm_timeout_s + 5)
            except PublishBlocked as exc:
                raise BrokerBlockedError(exc.reason, exc.waited_s) from exc
        results = []
        seen: set[str] = set()
        for r in requests:
            if r.job_id in errors:
                continue
            dup = r.job_id in duplicate or r.job_id in seen
            seen.add(r.job_id)
            results.append(SubmitResult(r.job_id, duplicate=dup, request=None if dup else r))
        if errors:
            raise BatchSubmitError(results, errors)
        return results

    def _publish_job(self, ch: BlockingChannel, request: JobRequest) -> None:
        try:
            ch.basic_publish(
                JOBS_EXCHANGE,
                request.tier,
                request.encode(),
                job_properties(request),
                mandatory=True,
            )
        except pika.exceptions.UnroutableError as exc:
            raise unroutable(request.tier) from exc
        except pika.exceptions.NackError as exc:
            raise self._refusal(request) from exc

    def _refusal(self, request: JobRequest) -> SubmitError:
        """What a nack of this job means: tier full (by the queue's depth now) or another refusal."""
        depth = self._depth(request.tier)
        return refused(
            request.tier, request.job_id, depth, tier_max_length(self.settings, request.tier)
        )

    def _depth(self, tier: str) -> int | None:
        try:
            ch = self._ch()
            frame = ch.queue_declare(job_queue(tier), passive=True)
            count: int = frame.method.message_count
            return count
        except pika.exceptions.AMQPError:
            return None

    def cancel(
        self, job_id: str, reason: str = "cancelled by user", *, tier: str | None = None
    ) -> None:
        """Ask for cancellation, through the broker alone: one confirmed, persistent control
        message reaches the worker running the job now (its own queue) and waits in the tier's
        facefleet.control.pending.<tier> until one of its workers records it in the job state
        (a job still queued is cancelled when taken). The worker emits `cancelled` at its next
        step. The tier comes from the job's submission record unless given."""
        msg = cancel_request(self.media, job_id, reason, tier)
        try:
            self._failover(
                lambda ch: ch.basic_publish(
                    CONTROL_EXCHANGE,
                    cancel_routing_key(msg.job_id, str(msg.tier)),
                    msg.encode(),
                    cancel_properties(msg),
                    mandatory=True,
                )
            )
        except pika.exceptions.UnroutableError as exc:
            raise unroutable_cancel(msg) from exc

    def status(self) -> list[TierStatus]:
        """Per tier: jobs ready, jobs being processed (unacked) and consumers.

        AMQP reports only ready messages; unacked comes from the management API
        (FACEFLEET_MANAGEMENT_URL) and is None when that does not answer; management_problem
        then says why and how to enable it.
        """
        out = []
        try:
            mgmt = read_queues(self.settings.amqp_urls[0], self.settings.management_url or "")
            self.management_problem = None
        except ManagementUnavailable as exc:
            mgmt = {}
            self.management_problem = str(exc)
        for spec in self.settings.tiers():
            qname = job_queue(spec.name)
            try:
                frame = self._ch().queue_declare(qname, passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                self._channel = None
                out.append(TierStatus(spec.name, 0, None, 0))
                continue
            info: dict[str, Any] = mgmt.get(qname, {})
            out.append(
                TierStatus(
                    spec.name,
                    frame.method.message_count,
                    info.get("messages_unacknowledged"),
                    frame.method.consumer_count,
                )
            )
        return out
