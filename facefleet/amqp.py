"""pika plumbing shared by the sync producer SDK, the CLI and the worker.

- `connect()` names each connection so it can be found in the management UI.
- `declare_topology()` is the one idempotent declaration of everything in facefleet.wire; it
  feature-detects the broker (server_properties) instead of assuming a version.
- `ThreadedPublisher` owns an aio-pika connection on its own thread and event loop, because
  pika connections are not thread-safe and job threads must publish events with pipelined
  confirms while the consumer connection's thread keeps heartbeats flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import Future
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from facefleet.wire import (
    CONTENT_TYPE,
    CONTROL_EXCHANGE,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    DEAD_QUEUE_ARGUMENTS,
    EVENTS_EXCHANGE,
    EVENTS_STREAM,
    EVENTS_STREAM_ARGUMENTS,
    HEADER_JOB_ID,
    HEADER_SCHEMA,
    HEADER_STREAM_FILTER,
    JOBS_EXCHANGE,
    SCHEMA_VERSION,
    BrokerFeatures,
    JobEvent,
    TierSpec,
    dead_notify_queue,
    event_routing_key,
    job_queue,
    job_queue_arguments,
)

log = logging.getLogger(__name__)


class TopologyError(RuntimeError):
    """The broker holds a queue or exchange that does not match the contract."""


def connect(url: str, name: str, *, heartbeat: int | None = None) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.client_properties = {"connection_name": name, "product": "facefleet"}
    if heartbeat is not None:
        params.heartbeat = heartbeat
    params.blocked_connection_timeout = 60
    return pika.BlockingConnection(params)


def features(connection: pika.BlockingConnection) -> BrokerFeatures:
    props: dict[str, Any] = connection._impl.server_properties or {}
    return BrokerFeatures.from_server_properties(props)


def declare_topology(
    connection: pika.BlockingConnection, tiers: tuple[TierSpec, ...] | list[TierSpec]
) -> BrokerFeatures:
    """Declare exchanges, queues and bindings; safe to run any number of times."""
    feats = features(connection)
    ch = connection.channel()
    try:
        ch.exchange_declare(JOBS_EXCHANGE, "direct", durable=True)
        ch.exchange_declare(DEAD_EXCHANGE, "topic", durable=True)
        ch.exchange_declare(EVENTS_EXCHANGE, "topic", durable=True)
        ch.exchange_declare(CONTROL_EXCHANGE, "topic", durable=True)
        _declare_queue(connection, DEAD_QUEUE, DEAD_QUEUE_ARGUMENTS)
        ch.queue_bind(DEAD_QUEUE, DEAD_EXCHANGE, "#")
        _declare_queue(connection, EVENTS_STREAM, EVENTS_STREAM_ARGUMENTS)
        ch.queue_bind(EVENTS_STREAM, EVENTS_EXCHANGE, "job.#")
        for tier in tiers:
            qname = job_queue(tier.name)
            _declare_queue(connection, qname, job_queue_arguments(tier, feats))
            ch.queue_bind(qname, JOBS_EXCHANGE, tier.name)
            notify = dead_notify_queue(tier.name)
            _declare_queue(connection, notify, DEAD_QUEUE_ARGUMENTS)
            ch.queue_bind(notify, DEAD_EXCHANGE, tier.name)
    finally:
        if ch.is_open:
            ch.close()
    return feats


def _declare_queue(connection: pika.BlockingConnection, name: str, args: dict[str, Any]) -> None:
    """Declare a queue; if it already exists with other arguments, keep it and warn.

    Queue arguments cannot change in place (RabbitMQ answers 406). A queue declared by an older
    release or before a broker upgrade (e.g. no x-consumer-timeout before 3.12) must not stop
    every worker from starting: the queue still works, and the warning says how to converge.
    """
    ch = connection.channel()
    try:
        ch.queue_declare(name, durable=True, arguments=args)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise
        probe = connection.channel()
        try:
            probe.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as missing:
            raise TopologyError(f"queue {name}: {exc.reply_text}") from missing
        if probe.is_open:
            probe.close()
        log.warning(
            "queue %s exists with other arguments than %s (%s); using it as it is. To converge, "
            "apply the change as a policy, or drain the queue, delete it and run "
            "`facefleet topology apply`.",
            name,
            args,
            exc.reply_text,
        )
        return
    if ch.is_open:
        ch.close()


def event_properties(event: JobEvent) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=f"{event.job_id}:{event.seq}",
        headers={
            HEADER_SCHEMA: SCHEMA_VERSION,
            HEADER_JOB_ID: event.job_id,
            HEADER_STREAM_FILTER: event.job_id,
        },
    )


def publish_event(channel: BlockingChannel, event: JobEvent) -> None:
    """Publish one event with confirm; raises if it was not routed to the events stream."""
    channel.basic_publish(
        EVENTS_EXCHANGE,
        event_routing_key(event.job_id, event.type),
        event.encode(),
        event_properties(event),
        mandatory=True,
    )


def as_message(body: bytes, props: pika.BasicProperties) -> aio_pika.Message:
    """The aio-pika twin of a pika message, so every publisher sends identical properties."""
    return aio_pika.Message(
        body,
        content_type=props.content_type,
        delivery_mode=props.delivery_mode,
        message_id=props.message_id,
        timestamp=props.timestamp,
        headers=props.headers,
    )


class ThreadedPublisher:
    """Confirmed publishing from any thread, through one aio-pika connection on its own loop.

    Why a private event loop: job threads must publish with confirms while the consumer
    connection's thread keeps heartbeats flowing, and pika connections are not thread-safe.
    Why aio-pika rather than a blocking pika channel: confirms are pipelined. A blocking channel
    waits a broker round trip per message, so one job's `started` queued behind another job's
    `completed`; here many publishes wait for their confirms at once and a job waits only for
    its own.

    Order is kept: requests reach the loop in call order (call_soon_threadsafe is FIFO) and each
    writes its frames under the channel's FIFO lock before awaiting its confirm, so the messages
    of one job reach the broker in the order they were published.
    """

    def __init__(
        self, url: str, name: str, *, confirm_timeout_s: float = 30.0, reconnect_s: float = 1.0
    ) -> None:
        self._url = url
        self._name = name
        self._confirm_timeout_s = confirm_timeout_s
        self._reconnect_s = reconnect_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"{name}-publisher", daemon=True
        )
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._in_flight: set[asyncio.Task[None]] = set()
        """Publish tasks awaiting their confirms; touched on the loop's thread only."""

    def start(self) -> None:
        """Connect (raises if the broker does not answer within 30 s)."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=30)
        except BaseException:
            self._stop_loop()
            raise

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties,
        *,
        mandatory: bool = True,
        timeout_s: float = 30.0,
    ) -> None:
        self.publish_async(exchange, routing_key, body, properties, mandatory=mandatory).result(
            timeout=timeout_s
        )

    def publish_async(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties,
        *,
        mandatory: bool = True,
    ) -> Future[None]:
        """Hand a publish to the loop; the Future resolves on the broker's confirm and fails
        with aio-pika's PublishError (unroutable), DeliveryError (nacked) or a connection
        error after one retry on a restored connection."""
        message = as_message(body, properties)
        fut = asyncio.run_coroutine_threadsafe(
            self._publish(exchange, routing_key, message, mandatory), self._loop
        )
        return fut

    def publish_event(self, event: JobEvent) -> Future[None]:
        return self.publish_async(
            EVENTS_EXCHANGE,
            event_routing_key(event.job_id, event.type),
            event.encode(),
            event_properties(event),
        )

    def close(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) for publishes still awaiting their confirms, then disconnect."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(timeout_s), self._loop).result(
                timeout=2 * timeout_s
            )
        self._stop_loop()

    async def _shutdown(self, timeout_s: float) -> None:
        """On the loop: let the publishes in flight get their confirms first."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout_s)
        if self._connection is not None:
            await self._connection.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _open(self) -> None:
        self._connection = await aio_pika.connect_robust(
            self._url,
            client_properties={"connection_name": self._name, "product": "facefleet"},
            reconnect_interval=self._reconnect_s,
        )
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )

    async def _exchange(self, name: str) -> aio_pika.abc.AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            assert self._channel is not None
            # By name only: declaring is declare_topology()'s job.
            exchange = await self._channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def _publish(
        self, exchange: str, routing_key: str, message: aio_pika.Message, mandatory: bool
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            for attempt in (1, 2):
                try:
                    target = await self._exchange(exchange)
                    await target.publish(
                        message, routing_key, mandatory=mandatory, timeout=self._confirm_timeout_s
                    )
                    return
                except (aio_pika.exceptions.PublishError, aio_pika.exceptions.DeliveryError):
                    raise  # the broker's answer (unroutable, nacked): a retry would not change it
                except (aio_pika.exceptions.AMQPError, ConnectionError, TimeoutError) as exc:
                    if attempt == 2:
                        raise
                    # The robust connection restores the channel in the background; wait for it.
                    log.warning("event publisher link lost (%s); retrying once restored", exc)
                    assert self._channel is not None
                    await asyncio.wait_for(self._channel.ready(), self._confirm_timeout_s)
        finally:
            self._in_flight.discard(task)
