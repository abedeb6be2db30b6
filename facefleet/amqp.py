"""pika plumbing shared by the sync producer SDK, the CLI and the worker.

- `connect()` names each connection so it can be found in the management UI.
- `declare_topology()` is the one idempotent declaration of everything in facefleet.wire; it
  feature-detects the broker (server_properties) instead of assuming a version.
- `ThreadedPublisher` owns a connection on its own thread, because pika connections are not
  thread-safe and job threads must publish events with confirms while the consumer connection's
  thread keeps heartbeats flowing.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

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


@dataclass
class _Request:
    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    mandatory: bool
    future: Future[None]


class ThreadedPublisher:
    """Confirmed publishing from any thread, through one connection owned by one thread."""

    def __init__(self, url: str, name: str) -> None:
        self._url = url
        self._name = name
        self._requests: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"{name}-publisher", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

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
        """Queue a publish; the Future resolves on the broker's confirm. One thread publishes
        all requests in order, so messages of one job reach the broker in call order."""
        fut: Future[None] = Future()
        self._requests.put(_Request(exchange, routing_key, body, properties, mandatory, fut))
        return fut

    def publish_event(self, event: JobEvent) -> Future[None]:
        return self.publish_async(
            EVENTS_EXCHANGE,
            event_routing_key(event.job_id, event.type),
            event.encode(),
            event_properties(event),
        )

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(10)

    def _open(self) -> None:
        self._connection = connect(self._url, self._name)
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()

    def _run(self) -> None:
        try:
            self._open()
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            try:
                req = self._requests.get(timeout=0.2)
            except queue.Empty:
                self._pump()
                continue
            if req is None:
                break
            self._send(req)
        if self._connection is not None and self._connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._connection.close()

    def _pump(self) -> None:
        """Serve heartbeats while idle; reconnect lazily on the next publish if the link died."""
        try:
            if self._connection is not None and self._connection.is_open:
                self._connection.process_data_events(time_limit=0)
        except pika.exceptions.AMQPError as exc:
            log.warning("event publisher connection lost: %s", exc)
            self._connection = None

    def _send(self, req: _Request) -> None:
        for attempt in (1, 2):
            try:
                if (
                    self._connection is None
                    or not self._connection.is_open
                    or (self._channel is None or not self._channel.is_open)
                ):
                    self._open()
                assert self._channel is not None
                self._channel.basic_publish(
                    req.exchange, req.routing_key, req.body, req.properties, mandatory=req.mandatory
                )
                req.future.set_result(None)
                return
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                req.future.set_exception(exc)
                return
            except pika.exceptions.AMQPError as exc:
                self._connection = None
                if attempt == 2:
                    req.future.set_exception(exc)
            except BaseException as exc:
                req.future.set_exception(exc)
                return
