"""Stream history reads run on a connection of their own (real broker, no gateway process).

A history read opens and closes a channel per job; RabbitMQ answers some channel-level races
with a *connection* error. On the tail's connection that would drop every live subscriber's
feed and make /readyz 503; on its own connection it costs at most that one read.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pika
import pytest

from facefleet.amqp import connect, declare_topology
from facefleet.producer.gateway.fanout import Fanout
from facefleet.producer.gateway.metrics import GatewayMetrics
from facefleet.wire import EVENTS_EXCHANGE, EventPayload, EventType, JobEvent, utcnow

pytestmark = pytest.mark.integration


def publish(amqp_url: str, job_id: str, seqs: range) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()
    for seq in seqs:
        ev = JobEvent(job_id=job_id, seq=seq, type="progress", ts=utcnow(), payload=EventPayload())
        ch.basic_publish(EVENTS_EXCHANGE, f"job.{job_id}.progress", ev.encode())
    conn.close()


def test_history_reads_survive_the_loss_of_their_connection_and_never_touch_the_tail(
    amqp_url: str,
) -> None:
    conn = connect(amqp_url, "test-topology")
    declare_topology(conn, [])
    conn.close()
    job_id = str(uuid.uuid4())
    since = datetime.now(UTC)
    publish(amqp_url, job_id, range(1, 4))

    async def scenario() -> tuple[list[int], list[int], bool, bool]:
        fanout = Fanout(amqp_url, GatewayMetrics(), replay_idle_s=0.3)
        await fanout.start()
        try:
            assert await fanout.wait_attached(20)
            first = await fanout.stream_history(job_id, since=since, stop=None)
            history = fanout._history_connection
            separate = history is not None and history is not fanout._connection
            assert history is not None
            await history.close()  # as if the broker had closed it with a channel error
            second = await fanout.stream_history(job_id, since=since, stop=None)
            return [f.seq for f in first], [f.seq for f in second], separate, fanout.ready
        finally:
            await fanout.stop()

    first, second, separate, tail_ready = asyncio.run(scenario())
    assert first == [1, 2, 3]
    assert second == [1, 2, 3]
    assert separate
    assert tail_ready


def publish_kinds(amqp_url: str, job_id: str, kinds: list[EventType]) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()
    for seq, kind in enumerate(kinds, 1):
        ev = JobEvent(job_id=job_id, seq=seq, type=kind, ts=utcnow(), payload=EventPayload())
        ch.basic_publish(EVENTS_EXCHANGE, f"job.{job_id}.{kind}", ev.encode())
    conn.close()


def test_a_history_read_goes_past_a_dead_letter_that_a_replay_follows(amqp_url: str) -> None:
    """A history read stops early at the event that ends the job (EndOfWatch), never at a
    `dead_lettered` that `facefleet dead replay` followed: the replayed run is history too.
    Many events after the dead letter, so a read that stopped there could not have them all."""
    conn = connect(amqp_url, "test-topology")
    declare_topology(conn, [])
    conn.close()
    job_id = str(uuid.uuid4())
    since = datetime.now(UTC)
    progress: list[EventType] = ["progress"] * 300
    after: list[EventType] = ["replayed", "started", *progress, "completed"]
    kinds: list[EventType] = ["queued", "started", "retrying", "dead_lettered", *after]
    publish_kinds(amqp_url, job_id, kinds)

    async def scenario() -> list[str]:
        fanout = Fanout(amqp_url, GatewayMetrics(), replay_idle_s=5.0)
        await fanout.start()
        try:
            assert await fanout.wait_attached(20)
            found = await fanout.stream_history(job_id, since=since, stop=None)
            return [f.type for f in found]
        finally:
            await fanout.stop()

    assert asyncio.run(scenario()) == kinds
