"""One events-stream consumer per gateway process, fanned out to per-job subscriber sets.

Live path. A single aio-pika consumer (`StreamTail`) reads facefleet.events.log and offers each
event of a job that has subscribers to them (`Subscriber`). The event is decoded and framed once;
a subscriber that is caught up gets the frame bytes written straight to its socket from this
callback (`direct.py`), one that is replaying, behind a gap or on a server without direct writes
gets it in its bounded inbox for its session to send through ASGI. Events of jobs nobody watches
are skipped on the routing key alone, without decoding, so the cost per event is
O(subscribers of that job), not O(connections). The tail remembers the stream offset it reached
and re-attaches exactly there after a broker hiccup, so a reconnect loses nothing.

History (replay) path: a bounded per-job read of the durable stream, never the data root (the
gateway needs no shared volume). It starts at the job's creation time (signed into its token,
so never earlier than the job) and stops at the offset the shared tail had reached when the
subscriber registered. Everything after that offset reaches the subscriber live, so history +
live has no gap; overlaps are dropped by seq. Concurrent subscribers of one job share one read.
The stream holds every event the journal holds (the journal is the workers' outbox: an event is
in it only once it was published), and seq 1 `queued` may be there twice (the producer's copy
and the worker's re-publish when it records it): identical, and kept once by seq.

Restart. The gateway keeps no state of its own: a restarted gateway (or another replica) serves
the same full history from the stream, and its tail attaches at the stream's last chunk to
learn the current end offset. The integration tests prove it, including a restart mid-job.

End of a job. The gateway ends a job where the sync watcher and the async SDK do: `EndOfWatch`
(producer/watch.py). A terminal event ends it, except a `dead_lettered` that `facefleet dead
replay` may have opened again: a history read does not stop there (it reads on to its stop
offset, so the `replayed` and everything after it are in the history), and a session that gave
the client a `dead_lettered` waits `replay_grace_s` for more of the job before it closes 1000.

Subscribers register *before* history is loaded, so an event is either already in the loaded
history or arrives live: no gap is possible; `SeqOrderer` removes the overlap. A subscriber whose
inbox is full, or whose socket holds more unsent bytes than the transport's high-water mark plus
`ws_send_queue` frames, is marked dropped and its inbox is emptied at once, so a slow client
costs bounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from dataclasses import dataclass
from datetime import datetime

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions

from facefleet.amqp import Backoff, aio_connect, aio_endpoint
from facefleet.producer.aio import server_features
from facefleet.producer.gateway.direct import FrameSink, encode_text_frame
from facefleet.producer.gateway.metrics import GatewayMetrics
from facefleet.producer.watch import REPLAY_GRACE_S, EndOfWatch, SeqOrderer, stream_arguments
from facefleet.wire import EVENTS_STREAM, BrokerFeatures, DecodeError, JobEvent

log = logging.getLogger(__name__)

ACK_EVERY = 100
"""Stream deliveries are acked in batches (multiple=True); the prefetch is far above this."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One event, encoded once and shared by every subscriber of its job: `text` for the ASGI
    path, `wire` (the whole WebSocket frame) for direct writes; `type` and `terminal` for
    `EndOfWatch`."""

    seq: int
    text: str
    type: str
    terminal: bool
    wire: bytes

    @classmethod
    def of(cls, event: JobEvent, text: str | None = None) -> Frame:
        if text is None:
            text = event.encode().decode()
        return cls(event.seq, text, event.type, event.terminal, encode_text_frame(text.encode()))


class Signal(enum.Enum):
    """Out-of-band items in a subscriber's inbox."""

    DROPPED = "dropped"
    """The inbox overflowed, or the socket's write buffer did: the client is too slow."""
    DISCONNECTED = "disconnected"
    """The client went away."""
    ENDED = "ended"
    """The frame that ends the job (`EndOfWatch`) was written directly: the session closes
    with 1000."""
    DEAD_LETTERED = "dead_lettered"
    """A `dead_lettered` was written directly: the session waits for a `replayed` (up to the
    end's `grace_s`) before it closes with 1000."""


class Delivery(enum.Enum):
    """What `Subscriber.offer` did with a frame."""

    WRITTEN = "written"
    """Written straight to the client's socket (caught up, direct writes armed)."""
    QUEUED = "queued"
    """Put in the inbox; the session sends it through ASGI (replay, gaps, no direct sink)."""
    SKIPPED = "skipped"
    """A duplicate of a frame already written."""
    REFUSED = "refused"
    """The subscriber is dropped or its connection is closing."""


class Subscriber:
    """A client's live events for one job: written directly once it is caught up, otherwise
    queued in a bounded inbox for its session.

    `orderer` is the single authority on what the client has been given, for both paths. Direct
    writes are armed by the session (`arm`) only while its inbox is empty and nothing waits
    behind a gap, and only between its awaited ASGI sends, so the two paths never interleave.
    Only the next seq is written directly; a duplicate is skipped, and anything else (a gap, a
    terminal event at or before after_seq) disarms and goes to the session's ordered path.

    `end` decides, for both paths, which frame ends the session (`ends`).
    """

    __slots__ = (
        "_judged",
        "dropped",
        "end",
        "inbox",
        "job_id",
        "last_sent",
        "maxsize",
        "orderer",
        "sink",
    )

    def __init__(
        self,
        job_id: str,
        maxsize: int,
        after_seq: int = 0,
        *,
        replay_grace_s: float = REPLAY_GRACE_S,
    ) -> None:
        self.job_id = job_id
        self.maxsize = maxsize
        self.inbox: asyncio.Queue[Frame | Signal] = asyncio.Queue(maxsize)
        self.dropped = False
        self.orderer: SeqOrderer[Frame] = SeqOrderer(after_seq)
        self.last_sent = after_seq
        """Seq of the last frame handed to the client's socket, by either path."""
        self.sink: FrameSink | None = None
        self.end = EndOfWatch(replay_grace_s)
        self._judged = 0
        """Seq of the last frame `end` was told."""

    def ends(self, frame: Frame) -> bool:
        """Tell `end` of a frame the client was given, or already had (seq <= after_seq): True
        when the session ends with it. Frames are told in seq order, each once; an older one (a
        duplicate) is ignored, so a re-published `dead_lettered` cannot make a replayed job
        look dead again."""
        if frame.seq <= self._judged:
            return False
        self._judged = frame.seq
        return self.end.saw(frame)

    def arm(self, sink: FrameSink) -> None:
        """Write live frames straight to `sink` from now on (the session is caught up)."""
        if not self.dropped and self.inbox.empty() and not self.orderer.holding:
            self.sink = sink

    def offer(self, frame: Frame) -> Delivery:
        """Write the frame directly when armed and it is the next one; else queue it, and on
        overflow mark the subscriber dropped and free its inbox."""
        if self.dropped:
            return Delivery.REFUSED
        sink = self.sink
        if sink is not None:
            if frame.seq == self.orderer.next_seq:
                return self._write(sink, frame)
            if frame.seq < self.orderer.next_seq and not frame.terminal:
                self.ends(frame)  # e.g. a `replayed` at or before after_seq: the job goes on
                return Delivery.SKIPPED
            self.sink = None
        try:
            self.inbox.put_nowait(frame)
            return Delivery.QUEUED
        except asyncio.QueueFull:
            self._drop()
            return Delivery.REFUSED

    def _write(self, sink: FrameSink, frame: Frame) -> Delivery:
        # A client is as far behind as the inbox path allows: the transport's high-water mark
        # (where an ASGI send would wait) plus `maxsize` frames like this one.
        if sink.buffered() > sink.high_water + self.maxsize * len(frame.wire):
            self._drop()
            return Delivery.REFUSED
        if not sink.write_frame(frame.wire):
            self.sink = None  # closing: the session hears it from its disconnect watcher
            return Delivery.REFUSED
        self.orderer.push(frame)
        self.last_sent = frame.seq
        if self.ends(frame):
            self.signal(Signal.ENDED)
        elif self.end.pending:
            # Wake the session (asleep on an empty inbox while armed) to time the grace.
            self.signal(Signal.DEAD_LETTERED)
        return Delivery.WRITTEN

    def _drop(self) -> None:
        self.dropped = True
        self.signal(Signal.DROPPED)

    def signal(self, signal: Signal) -> None:
        """Replace whatever is queued by `signal` and stop direct writes: the sender acts on it
        next."""
        self.sink = None
        while not self.inbox.empty():
            self.inbox.get_nowait()
        self.inbox.put_nowait(signal)


class HistoryUnavailable(RuntimeError):
    """A job's history could not be read (the stream is unreachable or too slow)."""


class TailState(enum.Enum):
    STOPPED = "stopped"
    CONNECTING = "connecting"
    ATTACHED = "attached"
    RECONNECTING = "reconnecting"


_TAIL_MOVES: dict[TailState, frozenset[TailState]] = {
    TailState.STOPPED: frozenset({TailState.CONNECTING}),
    TailState.CONNECTING: frozenset(
        {TailState.ATTACHED, TailState.RECONNECTING, TailState.STOPPED}
    ),
    TailState.ATTACHED: frozenset({TailState.RECONNECTING, TailState.STOPPED}),
    TailState.RECONNECTING: frozenset(
        {TailState.ATTACHED, TailState.RECONNECTING, TailState.STOPPED}
    ),
}


@dataclass
class _Replay:
    stop: int | None
    task: asyncio.Task[list[Frame]]


class Fanout:
    """The shared stream tail plus the per-job subscriber sets and history loading."""

    def __init__(
        self,
        amqp_url: str,
        metrics: GatewayMetrics,
        *,
        prefetch: int = 2000,
        replay_idle_s: float = 1.0,
        replay_timeout_s: float = 60.0,
        replay_grace_s: float = REPLAY_GRACE_S,
        name: str = "facefleet-gateway",
    ) -> None:
        self.amqp_url = amqp_url
        self.metrics = metrics
        self.prefetch = prefetch
        self.replay_idle_s = replay_idle_s
        self.replay_timeout_s = replay_timeout_s
        self.replay_grace_s = replay_grace_s
        """How long a session waits after a `dead_lettered` for a `replayed` (`EndOfWatch`)."""
        self.name = name
        self.state = TailState.STOPPED
        self.position: int | None = None
        """Offset the tail will deliver next (last delivered + 1); None until the first one."""
        self._topics: dict[str, set[Subscriber]] = {}
        self._replays: dict[str, _Replay] = {}
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._features: BrokerFeatures | None = None
        self._history_connection: aio_pika.abc.AbstractConnection | None = None
        """History reads open and close a channel each; they get a connection of their own, so
        a channel-level race there (RabbitMQ answers some with a connection error) can never
        take the live tail down with it."""
        self._history_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._attached = asyncio.Event()
        self._unacked = 0
        self._failed: str | None = None
        """host:port of the node the tail lost last: the next attach tries it last."""

    # --- life cycle ----------------------------------------------------------------------------

    def _set_state(self, new: TailState) -> None:
        if new not in _TAIL_MOVES[self.state]:
            raise RuntimeError(f"stream tail: illegal move {self.state.value} -> {new.value}")
        self.state = new
        if new is TailState.ATTACHED:
            self._attached.set()
        else:
            self._attached.clear()

    async def start(self) -> None:
        """Start the tail in the background; the gateway serves (readyz 503) while it connects."""
        self._set_state(TailState.CONNECTING)
        self._task = asyncio.create_task(self._run(), name="stream-tail")

    async def wait_attached(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._attached.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    @property
    def ready(self) -> bool:
        return self.state is TailState.ATTACHED

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._topics.values())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_connection()
        history, self._history_connection = self._history_connection, None
        if history is not None and not history.is_closed:
            with contextlib.suppress(aio_pika.exceptions.AMQPError, OSError, RuntimeError):
                await history.close()
        if self.state is not TailState.STOPPED:
            self._set_state(TailState.STOPPED)

    async def _close_connection(self) -> None:
        conn, self._connection = self._connection, None
        if conn is not None and not conn.is_closed:
            with contextlib.suppress(aio_pika.exceptions.AMQPError, OSError, RuntimeError):
                await conn.close()

    async def _run(self) -> None:
        backoff = Backoff(0.2, 10.0)
        while True:
            lost = asyncio.Event()
            delay = 0.0
            try:
                await self._attach(lost)
                backoff.reset()
                await lost.wait()
                log.warning("events stream consumer lost its connection; re-attaching")
            except asyncio.CancelledError:
                raise
            except (aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError, OSError) as exc:
                delay = backoff.next_s()
                log.warning("events stream unreachable (%r); retrying in %.1f s", exc, delay)
            if self._connection is not None:
                self._failed = aio_endpoint(self._connection) or self._failed
            await self._close_connection()
            self._set_state(TailState.RECONNECTING)
            # A lost link tries the other nodes at once (resuming at `position`); a round of
            # refusals waits a jittered, growing delay.
            await asyncio.sleep(delay)

    async def _attach(self, lost: asyncio.Event) -> None:
        conn = await aio_connect(self.amqp_url, f"{self.name}-tail", avoid=self._failed)
        self._connection = conn
        self._features = server_features(conn)
        conn.close_callbacks.add(lambda *_: lost.set())
        channel = await conn.channel()
        channel.close_callbacks.add(lambda *_: lost.set())
        await channel.set_qos(prefetch_count=self.prefetch)
        queue = await channel.declare_queue(EVENTS_STREAM, passive=True)
        self._unacked = 0
        # Resume exactly where we were; on the very first attach, the last chunk fixes the end
        # offset quickly (see the module docstring), and an empty stream is read from its start.
        offset: int | str = (
            self.position
            if self.position is not None
            else ("last" if self.state is TailState.CONNECTING else "first")
        )
        await queue.consume(self._on_message, arguments={"x-stream-offset": offset})
        self._set_state(TailState.ATTACHED)
        log.info("events stream consumer attached at offset %s", offset)

    # --- live fan-out --------------------------------------------------------------------------

    def subscribe(self, job_id: str, maxsize: int, after_seq: int = 0) -> Subscriber:
        sub = Subscriber(job_id, maxsize, after_seq, replay_grace_s=self.replay_grace_s)
        self._topics.setdefault(job_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.sink = None
        subs = self._topics.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._topics[sub.job_id]

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        offset = message.headers.get("x-stream-offset")
        if isinstance(offset, int):
            self.position = offset + 1
            self.metrics.stream_offset.set(offset)
        self.metrics.stream_events.inc()
        # Fan out before the first await: deliveries run as tasks, and an await here would let a
        # later event of the same job overtake this one.
        self._fan_out(message)
        self._unacked += 1
        if self._unacked >= ACK_EVERY:
            self._unacked = 0
            with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError):
                await message.ack(multiple=True)

    def _fan_out(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        job_id = _job_of(message.routing_key)
        subs = self._topics.get(job_id) if job_id else None
        if not subs or job_id is None:
            return
        decoded = _decode(message.body, job_id)
        if decoded is None:
            return
        event, text = decoded
        self.metrics.lag.observe(max(0.0, time.time() - event.ts.timestamp()))
        shared = Frame.of(event, text)
        written = 0
        for sub in tuple(subs):
            if sub.offer(shared) is Delivery.WRITTEN:
                written += 1
        if written:
            self.metrics.fanned_out.inc(written)
            self.metrics.direct_frames.inc(written)

    # --- history -------------------------------------------------------------------------------

    async def history(self, job_id: str, *, since: datetime | None) -> list[Frame]:
        """Every event of the job the stream holds, in seq order, each seq once.

        Call after `subscribe()`: the stop offset of the read is taken now, and everything past
        it reaches the subscriber live.
        """
        stop = self.position
        self.metrics.replays.inc()
        return await self.stream_history(job_id, since=since, stop=stop)

    async def stream_history(
        self, job_id: str, *, since: datetime | None, stop: int | None
    ) -> list[Frame]:
        """The job's events from the durable stream, read once per job and stop offset."""
        current = self._replays.get(job_id)
        if current is None or current.stop != stop or current.task.done():
            task = asyncio.create_task(self._read_stream(job_id, since, stop))
            current = _Replay(stop, task)
            self._replays[job_id] = current

            def forget(_: object, entry: _Replay = current) -> None:
                if self._replays.get(job_id) is entry:
                    del self._replays[job_id]

            task.add_done_callback(forget)
        return await asyncio.shield(current.task)

    async def _read_stream(
        self, job_id: str, since: datetime | None, stop: int | None
    ) -> list[Frame]:
        if self._features is None:
            raise HistoryUnavailable("the events stream is not reachable")
        conn = await self._history()
        loop = asyncio.get_running_loop()
        closing = False
        found: dict[int, Frame] = {}
        # The read may stop early at the event that ends the job (nothing of the job follows
        # it), told in seq order. A `dead_lettered` does not: a `replayed` may follow, and the
        # read goes on to `stop` (or the stream's quiet end), as EndOfWatch reads on to the end.
        ordered: SeqOrderer[Frame] = SeqOrderer()
        end = EndOfWatch()
        done = asyncio.Event()
        last_seen = loop.time()
        unacked = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal last_seen, unacked
            if closing:
                return  # in flight while the channel closes: acking it now is a protocol error
            last_seen = loop.time()
            unacked += 1
            if unacked >= ACK_EVERY:
                unacked = 0
                await message.ack(multiple=True)
            if _job_of(message.routing_key) == job_id:
                decoded = _decode(message.body, job_id)
                if decoded is not None:
                    frame = Frame.of(*decoded)
                    found[frame.seq] = frame
                    if any(end.saw(ready) for ready in ordered.push(frame)):
                        done.set()
            offset = message.headers.get("x-stream-offset")
            if stop is not None and isinstance(offset, int) and offset >= stop - 1:
                done.set()

        channel = await conn.channel()
        try:
            await channel.set_qos(prefetch_count=self.prefetch)
            queue = await channel.get_queue(EVENTS_STREAM, ensure=False)
            await queue.consume(
                on_message, arguments=stream_arguments(job_id, since, self._features)
            )
            deadline = loop.time() + self.replay_timeout_s
            while not done.is_set():
                if loop.time() > deadline:
                    raise HistoryUnavailable(
                        f"reading job {job_id} from the stream took over {self.replay_timeout_s} s"
                    )
                if loop.time() - last_seen > self.replay_idle_s:
                    break  # reached the stream's end; anything newer arrives live
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 0.05)
        finally:
            closing = True
            with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError, OSError):
                await channel.close()
        return [found[seq] for seq in sorted(found)]

    async def _history(self) -> aio_pika.abc.AbstractConnection:
        """The connection history reads use, (re)opened on demand."""
        async with self._history_lock:
            conn = self._history_connection
            if conn is None or conn.is_closed:
                try:
                    conn = await aio_connect(self.amqp_url, f"{self.name}-history")
                except (aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError, OSError) as exc:
                    raise HistoryUnavailable(f"the events stream is not reachable: {exc}") from exc
                self._history_connection = conn
            return conn


def _job_of(routing_key: str | None) -> str | None:
    """job id of `job.<job_id>.<type>`; None for anything else."""
    if not routing_key:
        return None
    parts = routing_key.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "job" else None


def _decode(body: bytes, job_id: str) -> tuple[JobEvent, str] | None:
    """Validate once per event; an event whose body names another job is never forwarded."""
    try:
        event = JobEvent.decode(body)
    except DecodeError:
        return None
    if event.job_id != job_id:
        return None
    return event, body.decode()
