"""The consume loop, pump, drain and thread-safe settling that the worker and the webhooks
sender share (facefleet/consuming.py), against a fake connection that records what reaches the
broker: no broker, bounded waits (a few hundredths of a second each)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika.exceptions
import pytest

from facefleet.consuming import ConsumerIO, call_threadsafe


@dataclass
class FakeChannel:
    is_open: bool = True
    cancelled: list[str] = field(default_factory=list)

    def basic_cancel(self, tag: str) -> None:
        self.cancelled.append(tag)


@dataclass
class FakeConnection:
    """Callbacks handed over with add_callback_threadsafe run at the next process_data_events,
    on the thread that calls it (the I/O thread), as pika's do."""

    is_open: bool = True
    fail_process: bool = False
    fail_schedule: bool = False
    log: list[str] = field(default_factory=list)
    scheduled: list[Callable[[], None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def process_data_events(self, time_limit: float = 0) -> None:
        if self.fail_process:
            raise pika.exceptions.StreamLostError("lost")
        self.log.append("process")
        time.sleep(min(time_limit, 0.01))
        with self.lock:
            ready, self.scheduled = self.scheduled, []
        for fn in ready:
            fn()

    def add_callback_threadsafe(self, fn: Callable[[], None]) -> None:
        if self.fail_schedule:
            raise pika.exceptions.ConnectionWrongStateError("closing")
        with self.lock:
            self.scheduled.append(fn)

    def close(self) -> None:
        self.log.append("close")
        self.is_open = False


def as_conn(fake: object) -> Any:
    return fake


# --- call_threadsafe -----------------------------------------------------------------------------


def test_a_settle_from_another_thread_runs_on_the_io_thread() -> None:
    conn = FakeConnection()
    ran_on: list[str] = []
    worker = threading.Thread(
        target=call_threadsafe,
        args=(as_conn(conn), lambda: ran_on.append(threading.current_thread().name)),
        name="job",
    )
    worker.start()
    worker.join()
    assert ran_on == []  # nothing touched the channel from the job thread
    conn.process_data_events(0)
    assert ran_on == [threading.current_thread().name]


@pytest.mark.parametrize(
    "conn",
    [None, FakeConnection(is_open=False), FakeConnection(fail_schedule=True)],
    ids=["no connection", "closed", "closing while scheduling"],
)
def test_a_settle_without_a_connection_is_dropped_for_the_broker_to_redeliver(
    conn: FakeConnection | None, caplog: pytest.LogCaptureFixture
) -> None:
    settled: list[int] = []
    call_threadsafe(None if conn is None else as_conn(conn), lambda: settled.append(1))
    if conn is not None:
        conn.is_open = True
        conn.process_data_events(0)
    assert settled == []
    assert caplog.records and caplog.records[-1].levelname == "WARNING"


def test_a_broker_error_while_settling_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn = FakeConnection()

    def ack() -> None:
        raise pika.exceptions.ChannelWrongStateError("channel closed")

    call_threadsafe(as_conn(conn), ack)
    conn.process_data_events(0)  # does not raise: the I/O thread goes on
    assert "the broker will redeliver" in caplog.text


# --- consume and pump ----------------------------------------------------------------------------


def test_consume_serves_the_connection_until_stopped_and_ticks_each_turn() -> None:
    io = ConsumerIO(pump_s=0.01, stuck_s=0.1)
    conn, stop = FakeConnection(), threading.Event()
    turns: list[float] = []

    def each() -> None:
        turns.append(io.last_tick)
        if len(turns) == 3:
            stop.set()

    before = io.last_tick
    io.consume(as_conn(conn), stop, each)
    assert conn.log == ["process"] * 3
    assert turns == sorted(turns) and turns[0] >= before


def test_consume_lets_a_lost_connection_reach_the_caller() -> None:
    io = ConsumerIO(pump_s=0.01, stuck_s=0.1)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        io.consume(as_conn(FakeConnection(fail_process=True)), threading.Event())


@pytest.mark.parametrize(
    "conn",
    [None, FakeConnection(is_open=False), FakeConnection(fail_process=True)],
    ids=["no connection", "closed", "broker error"],
)
def test_a_pump_without_a_working_connection_waits_and_still_ticks(
    conn: FakeConnection | None,
) -> None:
    io = ConsumerIO(pump_s=0.02, stuck_s=0.1)
    started = time.monotonic()
    io.pump(None if conn is None else as_conn(conn))
    assert time.monotonic() - started >= 0.02
    assert io.last_tick >= started


# --- drain ---------------------------------------------------------------------------------------


@dataclass
class InFlight:
    """Deliveries in flight, finished by handler threads that settle through the I/O thread."""

    conn: FakeConnection
    count: int = 0
    acked: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self) -> int:
        with self.lock:
            return self.count

    def take(self, tag: int, seconds: float) -> threading.Thread:
        with self.lock:
            self.count += 1

        def handle() -> None:
            time.sleep(seconds)
            call_threadsafe(as_conn(self.conn), lambda: self.acked.append(tag))
            with self.lock:
                self.count -= 1

        thread = threading.Thread(target=handle, daemon=True)
        thread.start()
        return thread


def test_drain_cancels_the_consumer_settles_what_finishes_then_closes() -> None:
    io = ConsumerIO(pump_s=0.01, stuck_s=1.0)
    conn, ch = FakeConnection(), FakeChannel()
    inflight = InFlight(conn)
    threads = [inflight.take(tag, 0.05 * tag) for tag in (1, 2, 3)]
    deadlines: list[int] = []
    io.drain(
        as_conn(conn),
        as_conn(ch),
        "ctag",
        inflight=inflight,
        timeout_s=5.0,
        on_deadline=deadlines.append,
        before_close=lambda: conn.log.append("before close"),
    )
    for thread in threads:
        thread.join()
    assert ch.cancelled == ["ctag"]
    assert inflight.acked == [1, 2, 3]  # each ack made on the I/O thread before the close
    assert deadlines == []
    assert conn.log[-2:] == ["before close", "close"] and not conn.is_open


def test_drain_tells_the_deadline_once_then_leaves_stuck_handlers_to_the_broker() -> None:
    io = ConsumerIO(pump_s=0.01, stuck_s=0.1)
    conn, ch = FakeConnection(), FakeChannel()
    inflight = InFlight(conn)
    inflight.take(1, 0.02)
    inflight.take(2, 10.0)  # stuck: never settles within the drain
    deadlines: list[int] = []
    started = time.monotonic()
    io.drain(
        as_conn(conn),
        as_conn(ch),
        "ctag",
        inflight=inflight,
        timeout_s=0.1,
        on_deadline=deadlines.append,
    )
    took = time.monotonic() - started
    assert deadlines == [1]  # told once, with what was still running
    assert 0.2 <= took < 2.0  # the deadline, then stuck_s more
    assert inflight.acked == [1]
    assert not conn.is_open  # the broker requeues the stuck delivery


@pytest.mark.parametrize(
    ("ch", "tag"),
    [(FakeChannel(is_open=False), "ctag"), (FakeChannel(), None), (None, "ctag")],
    ids=["channel closed", "no consumer", "no channel"],
)
def test_drain_with_nothing_to_cancel_still_closes(ch: FakeChannel | None, tag: str | None) -> None:
    io = ConsumerIO(pump_s=0.01, stuck_s=0.1)
    conn = FakeConnection()
    io.drain(
        as_conn(conn),
        None if ch is None else as_conn(ch),
        tag,
        inflight=lambda: 0,
        timeout_s=1.0,
        on_deadline=lambda _: None,
    )
    assert ch is None or ch.cancelled == []
    assert conn.log == ["process", "close"]
