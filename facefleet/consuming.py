"""The I/O thread of a service that consumes with a pika BlockingConnection, shared by `facefleet
worker` (consumer/worker.py) and `facefleet webhooks` (facefleet/webhooks.py): the consume loop,
the pump that keeps a waiting connection served, settling a delivery from another thread, and
the SIGTERM drain. A change to how either consumes or drains is made here, once.

pika connections are not thread-safe. Deliveries are handled on other threads (job threads, the
webhook lanes), which never touch the channel: they hand the ack or nack to the I/O thread with
`add_callback_threadsafe` (`call_threadsafe`), and the I/O thread runs it at its next
`process_data_events` (`ConsumerIO.consume`, `ConsumerIO.pump`). A settle that cannot be made
(the connection or channel is gone) is dropped: the broker redelivers that delivery.

Drain (SIGTERM, `ConsumerIO.drain`): the consumer is cancelled, so nothing new arrives; the
connection is served while the deliveries in flight finish and settle; when `timeout_s` passes
the service is told once (`on_deadline`: the worker stops its jobs at their next checkpoint and
gives them back, the webhooks sender posts nothing more), handlers stuck beyond `stuck_s` after
that are abandoned, and the connection is closed, so whatever is still unsettled goes back to
the queue.

Every turn of the loop, and every pump, marks `last_tick`: the liveness probe's sign that the
I/O thread is not stuck (facefleet/health.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

log = logging.getLogger(__name__)

POLL_S = 0.25
"""How long one turn of the consume loop waits for broker I/O before it checks its stop flag."""


def call_threadsafe(conn: pika.BlockingConnection | None, fn: Callable[[], None]) -> None:
    """Run `fn` (an ack or nack) on the connection's I/O thread, from any thread. With the
    connection gone, or a broker error on the way, nothing is settled: the broker redelivers."""
    if conn is None or not conn.is_open:
        log.warning("connection gone; the broker will redeliver instead")
        return

    def guarded() -> None:
        try:
            fn()
        except pika.exceptions.AMQPError as exc:
            log.warning("ack/nack failed (%s); the broker will redeliver", exc)

    try:
        conn.add_callback_threadsafe(guarded)
    except pika.exceptions.AMQPError as exc:
        log.warning("could not schedule ack/nack: %s", exc)


class ConsumerIO:
    """The consume loop, pump and drain of one service's I/O thread, and its `last_tick`.

    `pump_s`: one pump's wait while draining. `stuck_s`: how long handlers still running after
    the drain deadline get before the connection is closed under them.
    """

    def __init__(self, *, pump_s: float, stuck_s: float) -> None:
        self.pump_s = pump_s
        self.stuck_s = stuck_s
        self.last_tick = time.monotonic()
        """When the I/O thread last served its connection (or waited on purpose)."""

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def consume(
        self,
        conn: pika.BlockingConnection,
        stop: threading.Event,
        each: Callable[[], None] | None = None,
    ) -> None:
        """Serve the connection (deliveries, heartbeats, settles from other threads) until
        `stop` is set, POLL_S at a time; `each` runs after every turn. Broker errors propagate:
        the caller reconnects."""
        while not stop.is_set():
            conn.process_data_events(time_limit=POLL_S)
            self.tick()
            if each is not None:
                each()

    def pump(self, conn: pika.BlockingConnection | None, seconds: float | None = None) -> None:
        """Serve the connection for `seconds` (default `pump_s`); without one, or on a broker
        error, just wait as long."""
        seconds = self.pump_s if seconds is None else seconds
        try:
            if conn is not None and conn.is_open:
                conn.process_data_events(time_limit=seconds)
            else:
                time.sleep(seconds)
        except pika.exceptions.AMQPError:
            time.sleep(seconds)
        self.tick()

    def drain(
        self,
        conn: pika.BlockingConnection | None,
        ch: BlockingChannel | None,
        consumer_tag: str | None,
        *,
        inflight: Callable[[], int],
        timeout_s: float,
        on_deadline: Callable[[int], None],
        before_close: Callable[[], None] | None = None,
    ) -> None:
        """Stop consuming and let the deliveries in flight finish (see the module docstring).

        `inflight` counts the deliveries taken and not settled yet; `on_deadline` is told that
        count once, when `timeout_s` has passed with some still running; `before_close` runs
        after the last pump, before the connection closes."""
        if ch is not None and ch.is_open and consumer_tag is not None:
            with contextlib.suppress(pika.exceptions.AMQPError):
                ch.basic_cancel(consumer_tag)
        deadline = time.monotonic() + timeout_s
        passed_at: float | None = None
        while (count := inflight()) > 0:
            now = time.monotonic()
            if now >= deadline and passed_at is None:
                on_deadline(count)
                passed_at = now
            if passed_at is not None and now - passed_at > self.stuck_s:
                break  # stuck in a handler: closing the channel requeues its delivery
            self.pump(conn)
        self.pump(conn)
        if before_close is not None:
            before_close()
        if conn is not None and conn.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                conn.close()
