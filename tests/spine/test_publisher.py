"""The worker's ThreadedPublisher (pika SelectConnection, pipelined confirms) on a real broker.

What each outcome of a publish must look like to the journal (its only user): confirmed,
returned as unroutable, nacked by a full queue, and resent after a cut link. The TCP proxy is
real sockets (tests/spine/tcpproxy.py); there are no broker mocks here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from urllib.parse import urlparse

import pika
import pytest

from facefleet.amqp import (
    PublishLost,
    PublishNacked,
    PublishUnroutable,
    ThreadedPublisher,
)
from facefleet.wire import EVENTS_EXCHANGE, EventPayload, JobEvent, utcnow
from tests.conftest import Env
from tests.spine.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration


def event(job_id: str, seq: int) -> JobEvent:
    return JobEvent(job_id=job_id, seq=seq, type="progress", ts=utcnow(), payload=EventPayload())


@pytest.fixture
def channel(env: Env) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    conn = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
    ch = conn.channel()
    ch.exchange_declare(EVENTS_EXCHANGE, "topic", durable=True)
    yield ch
    conn.close()


def tap(ch: pika.adapters.blocking_connection.BlockingChannel, job_id: str) -> str:
    """An exclusive queue that sees one job's events."""
    queue: str = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(queue, EVENTS_EXCHANGE, f"job.{job_id}.#")
    return queue


def drain(ch: pika.adapters.blocking_connection.BlockingChannel, queue: str) -> list[int]:
    seqs = []
    while True:
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return seqs
        seqs.append(JobEvent.decode(body).seq)


def test_an_unroutable_message_fails_alone_inside_a_burst(env: Env, channel) -> None:  # type: ignore[no-untyped-def]
    """basic.return carries no delivery tag: the publisher must pin it on the right message."""
    job_id = str(uuid.uuid4())
    queue = tap(channel, job_id)
    publisher = ThreadedPublisher(env.amqp_url, "test-unroutable")
    publisher.start()
    try:
        routed = [publisher.publish_event(event(job_id, n)) for n in range(1, 11)]
        lost = publisher.publish_async(
            EVENTS_EXCHANGE, "nobody.listens.here", b"{}", pika.BasicProperties()
        )
        routed += [publisher.publish_event(event(job_id, n)) for n in range(11, 21)]
        with pytest.raises(PublishUnroutable):
            lost.result(timeout=30)
        for fut in routed:
            assert fut.result(timeout=30) is None
    finally:
        publisher.close()
    assert drain(channel, queue) == list(range(1, 21))


def test_a_burst_is_written_at_its_end_in_call_order(env: Env, channel) -> None:  # type: ignore[no-untyped-def]
    """Inside burst() nothing is handed to the I/O thread; on exit all of it goes, in order."""
    job_id = str(uuid.uuid4())
    queue = tap(channel, job_id)
    publisher = ThreadedPublisher(env.amqp_url, "test-burst")
    publisher.start()
    try:
        with publisher.burst():
            futures = [publisher.publish_event(event(job_id, n)) for n in range(1, 31)]
            channel.connection.sleep(0.3)
            assert not any(f.done() for f in futures)
            assert drain(channel, queue) == []
        for fut in futures:
            assert fut.result(timeout=30) is None
    finally:
        publisher.close()
    assert drain(channel, queue) == list(range(1, 31))


def test_a_full_queue_nacks_and_the_future_says_so(env: Env, channel) -> None:  # type: ignore[no-untyped-def]
    exchange = f"test.full.{uuid.uuid4().hex[:8]}"
    channel.exchange_declare(exchange, "direct", auto_delete=True)
    queue = channel.queue_declare(
        "", exclusive=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    ).method.queue
    channel.queue_bind(queue, exchange, "k")
    publisher = ThreadedPublisher(env.amqp_url, "test-nack")
    publisher.start()
    try:
        futures = [
            publisher.publish_async(exchange, "k", b"%d" % n, pika.BasicProperties())
            for n in range(3)
        ]
        assert futures[0].result(timeout=30) is None
        for fut in futures[1:]:
            with pytest.raises(PublishNacked):
                fut.result(timeout=30)
    finally:
        publisher.close()
        channel.exchange_delete(exchange)


def test_a_cut_link_resends_what_was_not_confirmed_in_order(env: Env, channel) -> None:  # type: ignore[no-untyped-def]
    """Every publish of a burst cut in the middle resolves without error once the link is back;
    the broker has every event, first occurrences in publish order (a resent message the broker
    had already taken shows up twice: watchers drop duplicate seqs)."""
    job_id = str(uuid.uuid4())
    queue = tap(channel, job_id)
    broker = urlparse(env.amqp_url)
    proxy = TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    url = env.amqp_url.replace(
        broker.netloc, broker.netloc.replace(f":{broker.port}", "") + f":{proxy.port}", 1
    )
    publisher = ThreadedPublisher(url, "test-cut", reconnect_s=0.2)
    publisher.start()
    try:
        futures: list[Future[None]] = []
        for n in range(1, 301):
            futures.append(publisher.publish_event(event(job_id, n)))
            if n == 150:
                proxy.cut()
        for fut in futures:
            assert fut.result(timeout=60) is None
        assert proxy.cuts == 1
    finally:
        publisher.close()
        proxy.close()
    seqs = drain(channel, queue)
    first_seen = list(dict.fromkeys(seqs))
    assert first_seen == list(range(1, 301))


def test_publishing_after_close_fails_at_once(env: Env) -> None:
    publisher = ThreadedPublisher(env.amqp_url, "test-closed")
    publisher.start()
    publisher.close()
    fut = publisher.publish_event(event(str(uuid.uuid4()), 1))
    with pytest.raises(PublishLost):
        fut.result(timeout=1)
