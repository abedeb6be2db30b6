"""Follow one job's events from the durable events stream: full history first, then live.

The stream (facefleet.events.log) keeps every event for days, so a watcher that starts late, or
reconnects, misses nothing. Events are delivered to the caller in seq order, each seq once:
duplicates (an event republished after a crash) are dropped and out-of-order arrivals wait in a
small buffer. On RabbitMQ 3.13+ the broker filters the stream by job id; older brokers send every
event and the watcher filters them here. A watcher whose node goes reconnects through the other
addresses of AMQP_URL and resumes at the stream offset after the last one it read; where it
resumes (`StreamCursor`), how long it tries (`ReconnectWindow`) and which refusal it waits out
(`stream_member_unready`) are shared with the async SDK's watch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol

import aiormq.exceptions
import pika
import pika.exceptions
from typing_extensions import TypeVar

from facefleet.amqp import Backoff, connect, connection_endpoint, features
from facefleet.wire import EVENTS_STREAM, BrokerFeatures, DecodeError, JobEvent

log = logging.getLogger(__name__)

STREAM_START_MARGIN = timedelta(minutes=1)
"""Start this long before `since`: stream timestamps are per chunk and clocks drift."""


REPLAY_GRACE_S = 5.0
"""After a `dead_lettered` read from history, how long to wait for a `replayed` right after it
(see `EndOfWatch`) when the stream does not go quiet first."""


class WatchTimeout(TimeoutError):
    pass


class Judged(Protocol):
    """What `EndOfWatch` reads of an event: a `JobEvent`, or the gateway's pre-encoded frame."""

    @property
    def type(self) -> str: ...

    @property
    def terminal(self) -> bool: ...


class EndOfWatch:
    """When a watch is over. A terminal event ends it, except `dead_lettered`:
    `facefleet dead replay` may have opened the job again since, so the watcher keeps reading
    until it has caught up with the stream (a poll that delivers nothing) or `grace_s` passes
    without another event of the job, and only then ends; a `replayed` after it goes on.
    Shared by the sync watcher, the async SDK and the gateway (its history reads, its WebSocket
    sessions and its client) so all end at the same event."""

    def __init__(self, grace_s: float = REPLAY_GRACE_S) -> None:
        self.grace_s = grace_s
        self._dead_at: float | None = None

    def saw(self, event: Judged) -> bool:
        """Told each event as it is yielded; True: the watch ends here."""
        if not event.terminal:
            self._dead_at = None
            return False
        if event.type != "dead_lettered":
            return True
        self._dead_at = time.monotonic()
        return False

    @property
    def pending(self) -> bool:
        """A dead letter was read and nothing after it yet."""
        return self._dead_at is not None

    def idle(self, *, caught_up: bool) -> bool:
        """Told after each poll; True: the dead letter read last was the end."""
        if self._dead_at is None:
            return False
        return caught_up or time.monotonic() - self._dead_at >= self.grace_s


class HasSeq(Protocol):
    @property
    def seq(self) -> int: ...


E = TypeVar("E", bound=HasSeq, default=JobEvent)


class SeqOrderer(Generic[E]):
    """Releases events in seq order, once each, starting after `after_seq`.

    Generic so the gateway can order pre-encoded frames (anything with a `seq`) without
    re-encoding each event per subscriber.
    """

    def __init__(self, after_seq: int = 0) -> None:
        self.next_seq = after_seq + 1
        self._pending: dict[int, E] = {}

    def push(self, event: E) -> list[E]:
        if event.seq < self.next_seq:
            return []
        self._pending[event.seq] = event
        out = []
        while self.next_seq in self._pending:
            out.append(self._pending.pop(self.next_seq))
            self.next_seq += 1
        return out

    @property
    def holding(self) -> bool:
        """Events wait behind a missing seq (a gap before them)."""
        return bool(self._pending)


def stream_arguments(
    job_id: str, since: datetime | None, feats: BrokerFeatures, *, offset: int | None = None
) -> dict[str, Any]:
    """basic.consume arguments that read one job's events from the stream, shared by the sync
    watcher, the async SDK and the gateway's per-job replay. `offset` (the next stream offset
    after the last message read) resumes a reader after a reconnect."""
    args: dict[str, Any] = {"x-stream-offset": "first"}
    if offset is not None:
        args["x-stream-offset"] = offset
    elif since is not None:
        args["x-stream-offset"] = since - STREAM_START_MARGIN
    if feats.stream_filtering:
        args["x-stream-filter"] = job_id
        args["x-stream-match-unfiltered"] = False
    return args


class BatchAcker:
    """Acks stream deliveries `every` at a time (multiple=True) instead of one by one: without
    stream filtering (RabbitMQ < 3.13) a watcher reads every job's events, and one ack per
    message would double its traffic. Keep `every` well below the consumer's prefetch."""

    def __init__(self, channel: Any, every: int = 200) -> None:
        self.channel = channel
        self.every = every
        self.last: int | None = None
        self.pending = 0

    def took(self, tag: int) -> None:
        self.last = tag
        self.pending += 1
        if self.pending >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.last is not None and self.pending and self.channel.is_open:
            self.channel.basic_ack(self.last, multiple=True)
        self.pending = 0


def stream_offset(headers: dict[str, Any] | None) -> int | None:
    """The stream offset of one delivery (the x-stream-offset header streams add)."""
    value = (headers or {}).get("x-stream-offset")
    return value if isinstance(value, int) else None


class StreamCursor:
    """Where one job's stream reader (re)starts: near `since` the first time, then right after
    the last offset it read, whichever node serves it. Shared by the sync and the async watch.
    Told every delivery, the job's or not, before anything can interrupt its handling."""

    def __init__(self, job_id: str, since: datetime | None) -> None:
        self.job_id = job_id
        self.since = since
        self.next_offset: int | None = None

    def took(self, headers: dict[str, Any] | None) -> None:
        offset = stream_offset(headers)
        if offset is not None and (self.next_offset is None or offset >= self.next_offset):
            self.next_offset = offset + 1

    def arguments(self, feats: BrokerFeatures) -> dict[str, Any]:
        return stream_arguments(self.job_id, self.since, feats, offset=self.next_offset)


class ReconnectWindow:
    """How long and how often a stream reader tries again; one rule for the sync and the async
    watch. A link lost while consuming opens a fresh `reconnect_s` window and is tried again at
    once (through another node); a connect that fails, or a stream member that is not ready,
    waits a jittered, growing delay, within the same window. Consuming again closes it."""

    def __init__(
        self,
        reconnect_s: float,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reconnect_s = reconnect_s
        self.backoff = backoff or Backoff(0.2, 5.0)
        self.clock = clock
        self.since: float | None = None

    def lost(self) -> None:
        """The link went while consuming: a new window starts now."""
        self.since = self.clock()

    def delay_s(self) -> float | None:
        """After a refused try: how long to wait before the next, or None when the window is
        spent (the caller raises what it got)."""
        now = self.clock()
        if self.since is None:
            self.since = now
        if now - self.since > self.reconnect_s:
            return None
        return self.backoff.next_s()

    def consuming(self) -> None:
        self.since = None
        self.backoff.reset()


def note_resumed(job_id: str, arguments: dict[str, Any], endpoint: str | None) -> None:
    """The line both watches log when they consume again after a loss: where they resumed."""
    log.info(
        "watch: job %s resumed at stream offset %s on %s",
        job_id,
        arguments.get("x-stream-offset"),
        endpoint,
    )


def watch_events(
    amqp_urls: str | Sequence[str],
    job_id: str,
    *,
    after_seq: int = 0,
    since: datetime | None = None,
    timeout_s: float | None = None,
    idle_poll_s: float = 0.5,
    reconnect_s: float = 60.0,
) -> Iterator[JobEvent]:
    """Yield the job's events with seq > after_seq in order; stops after the terminal event
    (after a `dead_lettered`, once no `replayed` follows: see `EndOfWatch`).

    `since` (e.g. the job's created_at) lets the stream start near the job instead of at its
    first retained chunk. A lost link is retried through every address (jittered backoff) for
    up to `reconnect_s`, resuming after the last offset read. Raises WatchTimeout if no terminal
    event arrives within timeout_s.
    """
    orderer = SeqOrderer(after_seq)
    buffered: list[JobEvent] = []
    prefix = f"job.{job_id}."
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    end = EndOfWatch()
    delivered = [0]
    cursor = StreamCursor(job_id, since)
    failed: str | None = None
    window = ReconnectWindow(reconnect_s)
    attempt = 0
    while True:
        try:
            connection = connect(amqp_urls, f"facefleet-watch-{job_id[:8]}", avoid=failed)
        except pika.exceptions.AMQPConnectionError:
            delay = window.delay_s()
            if delay is None:
                raise
            time.sleep(delay)
            continue
        try:
            feats = features(connection)
            ch = connection.channel()
            ch.basic_qos(prefetch_count=1000)
            acks = BatchAcker(ch)

            def on_message(
                channel: Any,
                method: Any,
                props: pika.BasicProperties,
                body: bytes,
                acks: BatchAcker = acks,
            ) -> None:
                delivered[0] += 1
                acks.took(method.delivery_tag)
                cursor.took(props.headers)
                if not method.routing_key.startswith(prefix):
                    return
                try:
                    event = JobEvent.decode(body)
                except DecodeError:
                    return
                buffered.extend(orderer.push(event))

            args = cursor.arguments(feats)
            ch.basic_consume(EVENTS_STREAM, on_message, arguments=args)
            attempt += 1
            if attempt > 1:
                note_resumed(job_id, args, connection_endpoint(connection))
            window.consuming()  # consuming again: the next loss gets its own reconnect_s
            while True:
                before = delivered[0]
                connection.process_data_events(time_limit=idle_poll_s)
                acks.flush()
                while buffered:
                    event = buffered.pop(0)
                    yield event
                    if end.saw(event):
                        return
                if end.idle(caught_up=delivered[0] == before):
                    return
                if deadline is not None and time.monotonic() > deadline:
                    raise WatchTimeout(f"no terminal event for job {job_id} within {timeout_s} s")
        except (
            pika.exceptions.AMQPConnectionError,
            pika.exceptions.ConnectionWrongStateError,
            pika.exceptions.ChannelWrongStateError,
        ) as exc:
            failed = connection_endpoint(connection) or failed
            window.lost()
            log.warning("watch: link to %s lost (%r); resuming on another node", failed, exc)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if not stream_member_unready(exc):
                raise
            # After a node loss the stream's member here may still be (re)starting; another
            # node's member, or this one a moment later, serves the same offsets.
            failed = connection_endpoint(connection) or failed
            delay = window.delay_s()
            if delay is None:
                raise
            log.warning("watch: stream member on %s not ready (%s); retrying", failed, exc)
            time.sleep(delay)
        finally:
            close_stream_consumer(connection)


def stream_member_unready(exc: BaseException) -> bool:
    """True for the broker's answer while this node's stream member is not (yet) running: a
    406 naming the local replica. It passes; a missing stream (404) or bad argument does not.
    Takes pika's channel close (sync watch) or aiormq's ChannelPreconditionFailed (async SDK),
    which carries the reply text alone."""
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        code, text = exc.reply_code, exc.reply_text
    elif isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        code, text = 406, str(exc.args[0]) if exc.args else ""
    else:
        return False
    return code == 406 and "replica" in (text or "")


def close_stream_consumer(connection: pika.BlockingConnection) -> None:
    """Close a connection that consumes a stream, without the noise.

    pika's close cancels the consumer and basic.rejects deliveries it buffered but did not
    dispatch; streams answer that with NOT_IMPLEMENTED and close the connection, which is what
    we wanted anyway. The expected error is kept out of the logs.
    """
    quiet = logging.getLogger("pika")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        if connection.is_open:
            connection.close()
    except pika.exceptions.AMQPError:
        pass
    finally:
        quiet.setLevel(level)
