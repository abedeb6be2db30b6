"""WS /v1/jobs/{id}/events: every event of one job after `after_seq`, in order, once, then live.

Protocol (client's view):

    connect  /v1/jobs/<id>/events[?after_seq=N][&token=T]
    send     {"token": T, "after_seq": N}      first message, when T is not in the URL (preferred:
                                               URLs end up in logs)
    receive  one text frame per event: the JobEvent JSON of the wire contract (seq, type, ...)
    close    1000 after the terminal event, or at once when after_seq is at or past it; after
             a `dead_lettered`, only once no `replayed` follows within the replay grace
             (producer/watch.py `EndOfWatch`, the sync watcher's and the SDK's rule too)
             1008 bad/missing/expired/other-job token (nothing was sent)   4400 bad after_seq
             4008 client too slow (reconnect with the last seq received)   1011 history
             unavailable, or a gap in it that one re-read did not fill (retry with after_seq)
             uvicorn's 1012 when the gateway stops; 1011 when pings go unanswered

Each connection is a `ClientSession` whose state moves AUTHENTICATING -> REPLAYING -> LIVE ->
CLOSED only (an illegal move is a bug and raises). Heartbeats are WebSocket pings sent by
uvicorn (`heartbeat_s`); a peer that stops answering is closed and unsubscribed.

Replay goes through ASGI `send()`. Once LIVE and caught up (inbox empty, no gap), a session on
a server that offers direct writes (`direct.sink_of`) arms its subscriber, and the stream tail
writes each next frame straight to the socket; the session task sleeps until a signal (the
terminal frame was written, too slow, gone) or a frame that needs the ordered path (a gap)
arrives, sends that through ASGI, and re-arms. The subscriber's `EndOfWatch` decides which
frame ends the session on both paths; after a `dead_lettered` the session waits its grace for
more of the job (a `replayed`, `facefleet dead replay`) and closes 1000 if none comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import uuid
from datetime import UTC, datetime

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from facefleet.producer.gateway.auth import JobClaims, TokenError
from facefleet.producer.gateway.core import Gateway
from facefleet.producer.gateway.direct import FrameSink, sink_of
from facefleet.producer.gateway.fanout import Frame, HistoryUnavailable, Signal, Subscriber
from facefleet.producer.watch import SeqOrderer

router = APIRouter()


class Close(enum.IntEnum):
    NORMAL = 1000
    POLICY_VIOLATION = 1008
    INTERNAL_ERROR = 1011
    SLOW_CLIENT = 4008
    BAD_REQUEST = 4400


class SessionState(enum.Enum):
    AUTHENTICATING = "authenticating"
    REPLAYING = "replaying"
    LIVE = "live"
    CLOSED = "closed"


_MOVES: dict[SessionState, frozenset[SessionState]] = {
    SessionState.AUTHENTICATING: frozenset({SessionState.REPLAYING, SessionState.CLOSED}),
    SessionState.REPLAYING: frozenset({SessionState.LIVE, SessionState.CLOSED}),
    SessionState.LIVE: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}

SEND_ERRORS = (WebSocketDisconnect, RuntimeError, OSError)


class _Refused(Exception):
    def __init__(self, code: Close, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class ClientSession:
    """One subscriber connection, from handshake to close."""

    def __init__(self, ws: WebSocket, gw: Gateway, job_id: str) -> None:
        self.ws = ws
        self.gw = gw
        self.job_id = job_id
        self.state = SessionState.AUTHENTICATING
        self.sub: Subscriber | None = None
        self.gap_retried = False

    @property
    def last_sent(self) -> int:
        """Seq of the last frame given to the client (what it should resume after)."""
        return self.sub.last_sent if self.sub is not None else 0

    def move(self, new: SessionState) -> None:
        if new not in _MOVES[self.state]:
            raise RuntimeError(
                f"session {self.job_id}: illegal move {self.state.value} -> {new.value}"
            )
        self.state = new

    async def run(self) -> None:
        await self.ws.accept()
        try:
            claims, after_seq = await self._authenticate()
        except _Refused as exc:
            await self.close(exc.code, exc.reason)
            return
        sub = self.gw.fanout.subscribe(self.job_id, self.gw.settings.ws_send_queue, after_seq)
        self.sub = sub
        self.gw.metrics.connections.inc()
        watcher = asyncio.create_task(self._watch_disconnect(sub))
        try:
            await self._serve(sub, claims, after_seq)
        finally:
            watcher.cancel()
            self.gw.fanout.unsubscribe(sub)
            self.gw.metrics.connections.dec()

    async def _authenticate(self) -> tuple[JobClaims, int]:
        params = self.ws.query_params
        token = params.get("token")
        raw_after: object = params.get("after_seq")
        if token is None:
            token, first_after = await self._first_message()
            raw_after = raw_after if raw_after is not None else first_after
        try:
            uuid.UUID(self.job_id)
            claims = self.gw.signer.verify(token, self.job_id)
        except ValueError:
            self.gw.metrics.auth_refused.labels("malformed").inc()
            raise _Refused(Close.POLICY_VIOLATION, "no such job") from None
        except TokenError as exc:
            self.gw.metrics.auth_refused.labels(exc.problem.name.lower()).inc()
            raise _Refused(Close.POLICY_VIOLATION, exc.problem.value) from exc
        try:
            after_seq = int(raw_after) if raw_after is not None else 0  # type: ignore[call-overload]
        except (TypeError, ValueError):
            after_seq = -1
        if after_seq < 0:
            raise _Refused(Close.BAD_REQUEST, "after_seq must be an integer >= 0")
        return claims, after_seq

    async def _first_message(self) -> tuple[str | None, object]:
        try:
            async with asyncio.timeout(self.gw.settings.auth_timeout_s):
                text = await self.ws.receive_text()
        except (TimeoutError, WebSocketDisconnect, KeyError, RuntimeError):
            return None, None
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return text.strip(), None  # a bare token
        if not isinstance(data, dict):
            return None, None
        token = data.get("token")
        return (token if isinstance(token, str) else None), data.get("after_seq")

    async def _watch_disconnect(self, sub: Subscriber) -> None:
        """Read (and ignore) client frames until it goes away, then wake the sender."""
        with contextlib.suppress(*SEND_ERRORS):
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
        sub.signal(Signal.DISCONNECTED)

    async def _serve(self, sub: Subscriber, claims: JobClaims, after_seq: int) -> None:
        self.move(SessionState.REPLAYING)
        orderer = sub.orderer
        since = datetime.fromtimestamp(claims.iat, UTC)
        history = await self._history(since)
        if history is None or await self._push(orderer, history):
            return
        if orderer.holding and await self._fill_gap(orderer, since):
            return
        self.move(SessionState.LIVE)
        sink = self._direct_sink()
        while True:
            if sink is not None:
                sub.arm(sink)  # only takes when caught up: inbox empty, nothing behind a gap
            item = await self._next(sub)
            if item is None:
                if sub.end.idle(caught_up=True):  # a dead letter that no replay followed
                    await self.close(Close.NORMAL, "job ended")
                    return
                continue  # a replay was written directly meanwhile: the job goes on
            if item is Signal.DEAD_LETTERED:
                continue  # wait for a replay, timed by `_next`
            if item is Signal.DISCONNECTED:
                self.move(SessionState.CLOSED)
                return
            if item is Signal.ENDED:
                await self.close(Close.NORMAL, "job ended")
                return
            if item is Signal.DROPPED:
                self.gw.metrics.dropped_slow.inc()
                await self.close(
                    Close.SLOW_CLIENT,
                    f"client too slow: reconnect with after_seq={self.last_sent}",
                )
                return
            assert isinstance(item, Frame)
            if await self._push(orderer, [item]):
                return
            if orderer.holding and await self._fill_gap(orderer, since):
                return

    @staticmethod
    async def _next(sub: Subscriber) -> Frame | Signal | None:
        """The next inbox item; None when the client was given a `dead_lettered` and nothing
        arrived within the end's grace (the async SDK's wait for a `replayed`)."""
        if not sub.end.pending:
            return await sub.inbox.get()
        try:
            return await asyncio.wait_for(sub.inbox.get(), sub.end.grace_s)
        except TimeoutError:
            return None

    def _direct_sink(self) -> FrameSink | None:
        """The connection's direct-write sink, if the server offers one (`direct.py`)."""
        return sink_of(self.ws.scope)

    async def _history(self, since: datetime) -> list[Frame] | None:
        """The job's history, or None after closing with 1011 when it cannot be read."""
        try:
            return await self.gw.fanout.history(self.job_id, since=since)
        except HistoryUnavailable as exc:
            await self.close(Close.INTERNAL_ERROR, f"history unavailable: {exc}"[:120])
            return None

    async def _push(self, orderer: SeqOrderer[Frame], frames: list[Frame]) -> bool:
        """Order and send frames; True once the session is over.

        A frame the orderer drops (seq <= the client's after_seq) is still told to the end: an
        ending frame there ends the session (nothing will follow it, and a client reconnecting
        after the end must not wait in LIVE forever), a `dead_lettered` there waits for its
        replay like one sent now."""
        for frame in frames:
            had = frame.seq < orderer.next_seq
            if await self._send_ready(orderer.push(frame)):
                return True
            if had and self._ends(frame):
                await self.close(Close.NORMAL, "job ended")
                return True
        return False

    async def _fill_gap(self, orderer: SeqOrderer[Frame], since: datetime) -> bool:
        """Read history once more to fill a gap; else close 1011 so the client resumes with
        after_seq instead of stalling silently. True once the session is over.

        A gap means the history read stopped early (e.g. `replay_idle_s` of silence on a busy
        broker); the live path never skips, since the journal makes the stream gapless."""
        if not self.gap_retried:
            self.gap_retried = True
            history = await self._history(since)
            if history is None or await self._push(orderer, history):
                return True
            if not orderer.holding:
                return False
        await self.close(
            Close.INTERNAL_ERROR,
            f"history has a gap after seq {self.last_sent}: "
            f"reconnect with after_seq={self.last_sent}",
        )
        return True

    async def _send_ready(self, frames: list[Frame]) -> bool:
        """Send frames released by the orderer; True once the session is over."""
        for frame in frames:
            try:
                await self.ws.send_text(frame.text)
            except SEND_ERRORS:
                self.move(SessionState.CLOSED)
                return True
            if self.sub is not None:
                self.sub.last_sent = frame.seq
            self.gw.metrics.fanned_out.inc()
            if self._ends(frame):
                await self.close(Close.NORMAL, "job ended")
                return True
        return False

    def _ends(self, frame: Frame) -> bool:
        """Whether the job ends with this frame (the subscriber's `EndOfWatch`)."""
        return self.sub.ends(frame) if self.sub is not None else frame.terminal

    async def close(self, code: Close, reason: str) -> None:
        if self.state is not SessionState.CLOSED:
            self.move(SessionState.CLOSED)
        if self.ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(*SEND_ERRORS):
                await self.ws.close(code=int(code), reason=reason)


@router.websocket("/v1/jobs/{job_id}/events")
async def job_events_ws(websocket: WebSocket, job_id: str) -> None:
    gw: Gateway = websocket.app.state.gateway
    await ClientSession(websocket, gw, job_id).run()
