"""Asynchronous producer SDK on aio-pika: the same contract as `facefleet.producer.sdk.JobClient`.

    async with AsyncJobClient(ProducerSettings.load()) as client:
        result = await client.submit("standard", "photos/me.jpg", "photos/group.jpg")
        async for event in client.watch(result.job_id):
            ...

Why it shares rather than copies: the request is built by `sdk.build_request`, message
properties come from `sdk.job_properties` / `amqp.event_properties` (converted once, below), the
`queued` event is `wire.queued_event`, duplicate detection is the media store's submission
record, stream arguments and ordering come from `facefleet.producer.watch`, and so do a watch's
rules for a lost node (where to resume, how long to retry, which refusal to wait out). Only the
transport differs.

The event loop never blocks on files or the store: uploads and the submission record run in
worker threads (`asyncio.to_thread`). A per-process asyncio lock per job id makes concurrent
submits of one key in one process publish once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions
from typing_extensions import Unpack

from facefleet import tracing
from facefleet.amqp import (
    AIO_LINK_ERRORS,
    Backoff,
    aio_blocked,
    aio_connect,
    aio_endpoint,
    as_message,
    connect,
    declare_topology,
    event_properties,
)
from facefleet.media import MediaStore
from facefleet.producer.errors import BrokerBlockedError, PublishNackedError, refused, unroutable
from facefleet.producer.sdk import (
    JobFields,
    SubmitResult,
    build_request,
    cancel_properties,
    cancel_request,
    job_properties,
    tier_max_length,
    unroutable_cancel,
)
from facefleet.producer.watch import (
    EndOfWatch,
    ReconnectWindow,
    SeqOrderer,
    StreamCursor,
    WatchTimeout,
    note_resumed,
    stream_member_unready,
)
from facefleet.settings import ProducerSettings
from facefleet.wire import (
    CONTROL_EXCHANGE,
    EVENTS_EXCHANGE,
    EVENTS_STREAM,
    JOBS_EXCHANGE,
    BrokerFeatures,
    DecodeError,
    JobEvent,
    JobRequest,
    cancel_routing_key,
    event_routing_key,
    job_queue,
    queued_event,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def event_message(event: JobEvent) -> aio_pika.Message:
    return as_message(event.encode(), event_properties(event))


AIO_GONE: tuple[type[BaseException], ...] = (*AIO_LINK_ERRORS, aiormq.exceptions.AMQPError)
"""What a connect, an ack or a close raises when the broker or the link is not there."""


@dataclass(frozen=True)
class _ChannelClosed:
    """A watch's stream channel closed: which attempt's, and why (None: no reason given)."""

    attempt: int
    reason: BaseException | None


def channel_loss(reason: BaseException | None) -> BaseException:
    """What a watch makes of its stream channel closing under it: the broker's channel error
    as is (a stream member not ready is retried, anything else is the caller's), and anything
    else, the connection's error or none, as the lost link it is."""
    if reason is not None and isinstance(
        reason, (aiormq.exceptions.AMQPChannelError, *AIO_LINK_ERRORS)
    ):
        return reason
    return ConnectionError(f"the stream channel closed ({reason!r})")


def server_features(connection: aio_pika.abc.AbstractConnection) -> BrokerFeatures:
    transport = connection.transport
    props: dict[str, Any] = dict(transport.connection.server_properties) if transport else {}
    return BrokerFeatures.from_server_properties(props)


class AsyncJobClient:
    """aio-pika client: one connection, one confirming publisher channel.

    Safe for many concurrent tasks on one event loop; not shared across loops. A publish whose
    node goes is retried through AMQP_URL's other addresses (jittered backoff, for up to
    confirm_timeout_s); a broker that blocks publishers for longer than blocked_timeout_s
    fails it with BrokerBlockedError.
    """

    def __init__(
        self,
        settings: ProducerSettings,
        *,
        media: MediaStore | None = None,
        connection_name: str = "facefleet-producer-aio",
    ) -> None:
        self.settings = settings
        self.media = media or settings.media_store()
        self.cost_model = settings.cost_model()
        """Prices each job at submit (see JobClient.cost_model)."""
        self.connection_name = connection_name
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._failed: str | None = None
        """host:port of the node whose link was lost last: the next connect tries it last."""
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._jobs: aio_pika.abc.AbstractExchange | None = None
        self._events: aio_pika.abc.AbstractExchange | None = None
        self._control: aio_pika.abc.AbstractExchange | None = None
        self._features: BrokerFeatures | None = None
        self._connect_lock = asyncio.Lock()
        self._closed_by_owner = False
        """close() was called: a watch whose link goes then ends instead of reconnecting."""
        self._job_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    # --- connection ----------------------------------------------------------------------------

    async def connect(self) -> aio_pika.abc.AbstractConnection:
        self._closed_by_owner = False
        return await self._connect()

    async def _connect(self) -> aio_pika.abc.AbstractConnection:
        async with self._connect_lock:
            if self._connection is None or self._connection.is_closed:
                self._connection = await aio_connect(
                    self.settings.amqp_urls, self.connection_name, avoid=self._failed
                )
                self._features = server_features(self._connection)
                self._channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                # Exchanges by name only: declaring is `apply_topology`'s job.
                self._jobs = await self._channel.get_exchange(JOBS_EXCHANGE, ensure=False)
                self._events = await self._channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
                self._control = await self._channel.get_exchange(CONTROL_EXCHANGE, ensure=False)
            return self._connection

    @property
    def features(self) -> BrokerFeatures:
        if self._features is None:
            raise RuntimeError("not connected: await connect() first")
        return self._features

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    @property
    def blocked(self) -> bool:
        """The broker blocks this client's publishes now (a memory or disk alarm)."""
        return aio_blocked(self._connection)

    async def _drop(self) -> None:
        conn, self._connection = self._connection, None
        if conn is None:
            return
        self._failed = aio_endpoint(conn) or self._failed
        with contextlib.suppress(Exception):
            await conn.close()

    async def _lost(self, conn: aio_pika.abc.AbstractConnection) -> None:
        """A watch's link went (or its node refused the stream): drop the client's connection if
        it is still that one, so the next connect tries the other addresses first; another task
        may have replaced it already."""
        if self._connection is conn:
            await self._drop()

    async def _failover(self, publish: Callable[[], Awaitable[T]]) -> T:
        """Run one publish; if its node goes, reconnect through the other addresses and run it
        again (a job published twice is one job id: the worker runs it once), for up to
        confirm_timeout_s. While the broker blocks us, wait at most blocked_timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.confirm_timeout_s
        backoff = Backoff(0.2, 5.0)
        while True:
            await self.connect()
            task = asyncio.ensure_future(publish())
            blocked_at: float | None = None
            try:
                while True:
                    done, _ = await asyncio.wait({task}, timeout=0.25)
                    if done:
                        return task.result()
                    if not self.blocked:
                        blocked_at = None
                        continue
                    blocked_at = blocked_at or loop.time()
                    if loop.time() - blocked_at >= self.settings.blocked_timeout_s:
                        task.cancel()
                        raise BrokerBlockedError("resource alarm", self.settings.blocked_timeout_s)
            except PublishNackedError:
                # Not a full tier: the broker took no responsibility for it, so send it again
                # on a fresh connection (RabbitMQ 3.10 keeps nacking on a channel whose first
                # publish met a quorum queue's leader election).
                await self._drop()
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(backoff.next_s())
            except AIO_LINK_ERRORS as exc:
                await self._drop()
                if loop.time() >= deadline:
                    raise
                delay = backoff.next_s()
                log.warning("broker link lost (%r); trying another node in %.1f s", exc, delay)
                await asyncio.sleep(delay)
            finally:
                if not task.done():
                    task.cancel()

    async def close(self) -> None:
        self._closed_by_owner = True
        if self._connection is not None:
            await self._connection.close()
        self._connection = None

    async def __aenter__(self) -> AsyncJobClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def apply_topology(self) -> BrokerFeatures:
        """Declare the topology with the one shared (pika) declaration, in a thread: it runs once
        at start-up, and a second implementation could drift from the contract."""

        def declare() -> BrokerFeatures:
            conn = connect(self.settings.amqp_urls, f"{self.connection_name}-topology")
            try:
                return declare_topology(conn, self.settings.tiers(), self.settings.placement())
            finally:
                conn.close()

        return await asyncio.to_thread(declare)

    # --- jobs ----------------------------------------------------------------------------------

    async def submit(
        self, tier: str, source: str, target: str, **fields: Unpack[JobFields]
    ) -> SubmitResult:
        """Queue one job; returns once the broker confirmed it and `queued` was published.

        Raises TierFullError, UnroutableJobError, PublishNackedError or InvalidJobError.
        """
        request = await asyncio.to_thread(
            functools.partial(
                build_request,
                self.media,
                tier,
                source,
                target,
                cost_model=self.cost_model,
                **fields,
            )
        )
        return await self.submit_request(request)

    async def submit_request(self, request: JobRequest) -> SubmitResult:
        """See JobClient.submit_request: duplicate keys publish nothing; `queued` after the
        job's confirm."""
        await self.connect()
        local = self._job_locks.setdefault(request.job_id, asyncio.Lock())
        async with local:
            if await asyncio.to_thread(self.media.submitted, request.job_id):
                return SubmitResult(request.job_id, duplicate=True)
            # The span is current in this task only (contextvars): concurrent submits each
            # have their own trace.
            with tracing.send(request.job_id, request.tier):
                await self._publish_job(request)
                fresh = await asyncio.to_thread(
                    self.media.mark_submitted, request.job_id, request.encode()
                )
                await self.publish_event(queued_event(request))
        return SubmitResult(request.job_id, duplicate=not fresh, request=request if fresh else None)

    async def _publish_job(self, request: JobRequest) -> None:
        async def publish() -> Any:
            assert self._jobs is not None
            try:
                return await self._jobs.publish(
                    as_message(request.encode(), job_properties(request)),
                    request.tier,
                    mandatory=True,
                    timeout=self.settings.confirm_timeout_s,
                )
            except aiormq.exceptions.PublishError as exc:
                raise unroutable(request.tier) from exc
            except aio_pika.exceptions.DeliveryError as exc:
                depth = await self.depth(request.tier)
                limit = tier_max_length(self.settings, request.tier)
                raise refused(request.tier, request.job_id, depth, limit) from exc

        await self._failover(publish)

    async def publish_event(self, event: JobEvent) -> None:
        """Publish one journal event with confirm; raises if it reached no stream."""

        async def publish() -> Any:
            assert self._events is not None
            return await self._events.publish(
                event_message(event),
                event_routing_key(event.job_id, event.type),
                mandatory=True,
                timeout=self.settings.confirm_timeout_s,
            )

        await self._failover(publish)

    async def depth(self, tier: str) -> int | None:
        """Jobs ready in a tier's queue, or None if it cannot be read."""
        info = await self.queue_info(tier)
        return None if info is None else info[0]

    async def queue_info(self, tier: str) -> tuple[int, int] | None:
        """(ready jobs, consumers) of a tier's queue, or None if it cannot be read (passive
        declare on a throw-away channel: a 404 closes the channel it happens on)."""
        conn = await self.connect()
        try:
            async with conn.channel() as ch:
                queue = await ch.declare_queue(job_queue(tier), passive=True)
                result = queue.declaration_result
                return int(result.message_count or 0), int(result.consumer_count or 0)
        except (TimeoutError, aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError):
            return None

    async def cancel(
        self, job_id: str, reason: str = "cancelled by user", *, tier: str | None = None
    ) -> None:
        """Ask for cancellation through the broker alone (see JobClient.cancel)."""
        msg = await asyncio.to_thread(cancel_request, self.media, job_id, reason, tier)

        async def publish() -> Any:
            assert self._control is not None
            return await self._control.publish(
                as_message(msg.encode(), cancel_properties(msg)),
                cancel_routing_key(msg.job_id, str(msg.tier)),
                mandatory=True,
                timeout=self.settings.confirm_timeout_s,
            )

        try:
            await self._failover(publish)
        except aiormq.exceptions.PublishError as exc:
            raise unroutable_cancel(msg) from exc

    # --- events --------------------------------------------------------------------------------

    async def watch(
        self,
        job_id: str,
        *,
        after_seq: int = 0,
        since: datetime | None = None,
        timeout_s: float | None = None,
        prefetch: int = 1000,
        reconnect_s: float = 60.0,
    ) -> AsyncIterator[JobEvent]:
        """Yield the job's events with seq > after_seq in order, once each; stops after the
        terminal event. Reads the durable stream (full history, then live) on its own channel
        of the client's connection.

        A lost link or node is retried like the sync watch (`producer.watch.watch_events`):
        through AMQP_URL's other addresses, with jittered backoff, for up to `reconnect_s`,
        resuming after the last stream offset read; a stream member not ready yet after a
        failover is waited out, on another node, within the same bound. The reconnect is the
        client's: its publishes move with it. Raises WatchTimeout if no terminal event arrives
        within timeout_s.
        """
        orderer: SeqOrderer[JobEvent] = SeqOrderer(after_seq)
        cursor = StreamCursor(job_id, since)
        window = ReconnectWindow(reconnect_s)
        inbox: asyncio.Queue[JobEvent | _ChannelClosed] = asyncio.Queue()
        prefix = f"job.{job_id}."
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        end = EndOfWatch()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            # Before the first await: deliveries run as tasks in order, so the cursor and the
            # orderer see them in stream order whatever the acks do.
            cursor.took(message.headers)
            if (message.routing_key or "").startswith(prefix):
                with contextlib.suppress(DecodeError):
                    for ready in orderer.push(JobEvent.decode(message.body)):
                        inbox.put_nowait(ready)
            with contextlib.suppress(*AIO_GONE):
                await message.ack()

        def on_close(attempt: int) -> Callable[[Any, BaseException | None], None]:
            def closed(_channel: Any, reason: BaseException | None) -> None:
                inbox.put_nowait(_ChannelClosed(attempt, reason))

            return closed

        attempt = 0
        self._closed_by_owner = False
        conn = await self._connect_within(window)
        while True:
            attempt += 1
            channel: aio_pika.abc.AbstractChannel | None = None
            try:
                channel = await conn.channel()
                channel.close_callbacks.add(on_close(attempt))
                await channel.set_qos(prefetch_count=prefetch)
                queue = await channel.get_queue(EVENTS_STREAM, ensure=False)
                args = cursor.arguments(self.features)
                await queue.consume(on_message, arguments=args)
                if attempt > 1:
                    note_resumed(job_id, args, aio_endpoint(conn))
                window.consuming()  # consuming again: the next loss gets its own reconnect_s
                while True:
                    left = None if deadline is None else max(0.0, deadline - loop.time())
                    if end.pending:  # a dead letter read: wait for a `replayed` a little while
                        left = end.grace_s if left is None else min(left, end.grace_s)
                    try:
                        item = await asyncio.wait_for(inbox.get(), left)
                    except TimeoutError:
                        if end.idle(caught_up=True):
                            return
                        raise WatchTimeout(
                            f"no terminal event for job {job_id} within {timeout_s} s"
                        ) from None
                    if isinstance(item, _ChannelClosed):
                        if item.attempt == attempt:
                            raise channel_loss(item.reason)
                        continue  # an earlier attempt's channel
                    yield item
                    if end.saw(item):
                        return
            except WatchTimeout:
                raise  # a TimeoutError, hence an OSError: not a lost link
            except AIO_LINK_ERRORS as exc:
                if self._closed_by_owner:
                    raise
                window.lost()
                log.warning(
                    "watch: link to %s lost (%r); resuming on another node", aio_endpoint(conn), exc
                )
                await self._lost(conn)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                if not stream_member_unready(exc):
                    raise
                delay = window.delay_s()
                if delay is None:
                    raise
                # Like the sync watch: another node's member, or this one a moment later,
                # serves the same offsets.
                log.warning(
                    "watch: stream member on %s not ready (%s); retrying", aio_endpoint(conn), exc
                )
                await self._lost(conn)
                await asyncio.sleep(delay)
            finally:
                if channel is not None and not channel.is_closed:
                    with contextlib.suppress(*AIO_GONE):
                        await channel.close()
            conn = await self._connect_within(window)

    async def _connect_within(self, window: ReconnectWindow) -> aio_pika.abc.AbstractConnection:
        """The client's connection, for a watch: through AMQP_URL's addresses (the one
        that failed last tried last), waiting between rounds until `window` is spent."""
        while True:
            if self._closed_by_owner:
                raise ConnectionError("the client was closed while a watch reconnected")
            try:
                return await self._connect()
            except AIO_GONE as exc:
                delay = window.delay_s()
                if delay is None:
                    raise
                log.warning("watch: no broker address answers (%r); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
