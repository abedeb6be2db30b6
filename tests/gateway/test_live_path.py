"""The direct live path offline: frame bytes, `Subscriber` with a fake socket, the real WS route
driven in memory with and without a direct sink, and the server-protocol fallback.

No broker and no timing: a fake `FrameSink` records what would reach the socket and reports
whatever write-buffer size the test sets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest
from fastapi import FastAPI
from starlette.types import Message
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.protocol import Protocol, Side, State

from facefleet.producer.gateway import direct
from facefleet.producer.gateway.direct import (
    DIRECT_SEND,
    encode_text_frame,
    protocol_class,
    sink_of,
)
from facefleet.producer.gateway.fanout import Delivery, Frame, Signal, Subscriber
from tests.gateway.test_session import (
    SIGNER,
    FakeHistoryFanout,
    app_with,
    frame,
    job,
    read_until_close,
    ws_scope,
)


class FakeSink:
    """What a socket would receive; `buffer` is the write-buffer size reported to the caller."""

    high_water = 1000

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.buffer = 0
        self.closing = False

    def write_frame(self, data: bytes) -> bool:
        if self.closing:
            return False
        self.written.append(data)
        return True

    def buffered(self) -> int:
        return self.buffer

    def seqs(self) -> list[int]:
        return [json.loads(_unframe(data))["seq"] for data in self.written]


def _unframe(data: bytes) -> str:
    """Parse server frame bytes as a client does (websockets' sans-I/O client)."""
    client = Protocol(Side.CLIENT, state=State.OPEN)
    client.receive_data(data)
    (event,) = client.events_received()
    assert isinstance(event, WsFrame) and event.opcode is Opcode.TEXT and event.fin
    return bytes(event.data).decode()


def drain(sub: Subscriber) -> list[Frame | Signal]:
    items = []
    while not sub.inbox.empty():
        items.append(sub.inbox.get_nowait())
    return items


# --- frame bytes -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [10, 125, 126, 300, 70_000])
def test_encoded_frames_are_what_websockets_sends_and_parse_back(size: int) -> None:
    text = json.dumps({"seq": 1, "pad": "é" * size})
    server = Protocol(Side.SERVER, state=State.OPEN)
    server.send_text(text.encode())
    assert encode_text_frame(text.encode()) == b"".join(server.data_to_send())
    assert _unframe(encode_text_frame(text.encode())) == text


def test_a_frame_carries_its_wire_bytes() -> None:
    f = frame(str(uuid.uuid4()), 3)
    assert _unframe(f.wire) == f.text


# --- Subscriber ----------------------------------------------------------------------------------


def armed(after_seq: int = 0, maxsize: int = 4) -> tuple[Subscriber, FakeSink]:
    sub, sink = Subscriber("j", maxsize, after_seq), FakeSink()
    sub.arm(sink)
    assert sub.sink is sink
    return sub, sink


def test_caught_up_frames_are_written_in_order_without_the_inbox() -> None:
    sub, sink = armed(after_seq=2)
    frames = job("j", 6)
    assert [sub.offer(f) for f in frames[2:5]] == [Delivery.WRITTEN] * 3
    assert sink.seqs() == [3, 4, 5]
    assert (sub.last_sent, sub.orderer.next_seq) == (5, 6)
    assert sub.inbox.empty()


def test_duplicates_are_skipped_and_old_frames_never_rewritten() -> None:
    sub, sink = armed()
    frames = job("j", 5)
    for f in [frames[0], frames[1], frames[0], frames[1], frames[2]]:
        sub.offer(f)
    assert sink.seqs() == [1, 2, 3]
    assert sub.sink is sink and sub.inbox.empty()


def test_a_gap_disarms_and_hands_the_frame_to_the_ordered_path() -> None:
    sub, sink = armed()
    frames = job("j", 6)
    sub.offer(frames[0])
    assert sub.offer(frames[2]) is Delivery.QUEUED  # 2 is missing
    assert sub.sink is None
    assert sub.offer(frames[1]) is Delivery.QUEUED  # not written around the held frame
    assert sink.seqs() == [1]
    assert drain(sub) == [frames[2], frames[1]]


def test_arming_waits_until_the_session_is_caught_up() -> None:
    sub, sink = Subscriber("j", 4), FakeSink()
    frames = job("j", 5)
    sub.offer(frames[0])  # queued: not armed yet
    sub.arm(sink)
    assert sub.sink is None  # inbox not empty
    drain(sub)
    sub.orderer.push(frames[2])  # something held behind a gap
    sub.arm(sink)
    assert sub.sink is None
    sub.orderer.push(frames[0])
    sub.orderer.push(frames[1])
    sub.arm(sink)
    assert sub.sink is sink
    assert sub.offer(frames[3]) is Delivery.WRITTEN
    assert sink.seqs() == [4]


def test_the_terminal_frame_is_written_then_the_session_is_told_to_close() -> None:
    sub, sink = armed()
    frames = job("j", 3)
    for f in frames:
        sub.offer(f)
    assert sink.seqs() == [1, 2, 3]
    assert drain(sub) == [Signal.ENDED]
    assert sub.sink is None


def test_a_terminal_frame_at_or_before_after_seq_goes_to_the_session() -> None:
    """The session, not the tail, decides to close 1000 on a stale terminal event."""
    sub, sink = armed(after_seq=5)
    stale = job("j", 5)[4]
    assert sub.offer(stale) is Delivery.QUEUED
    assert sink.written == [] and drain(sub) == [stale]


def test_a_client_whose_socket_buffer_overflows_is_dropped_and_gets_no_more_bytes() -> None:
    """The bound is the transport's high-water mark plus `maxsize` frames of this size."""
    sub, sink = armed(maxsize=4)
    frames = [frame("j", seq) for seq in range(1, 200)]
    limit = sink.high_water + 4 * len(frames[0].wire)
    written_before_drop = 0
    for f in frames:
        result = sub.offer(f)
        if result is Delivery.REFUSED:
            break
        written_before_drop += 1
        sink.buffer += len(f.wire)  # the client reads nothing
    assert sub.dropped
    assert drain(sub) == [Signal.DROPPED]
    assert sum(map(len, sink.written)) <= limit + len(frames[0].wire)
    assert written_before_drop == len(sink.written) < len(frames)
    assert sub.offer(frames[-1]) is Delivery.REFUSED  # nothing more, not even to the inbox
    assert sub.inbox.empty()


def test_a_closing_socket_refuses_and_disarms() -> None:
    sub, sink = armed()
    sink.closing = True
    assert sub.offer(frame("j", 1)) is Delivery.REFUSED
    assert sub.sink is None and not sub.dropped
    assert sub.offer(frame("j", 1)) is Delivery.QUEUED  # the session handles it from here


def test_a_signal_disarms() -> None:
    sub, _ = armed()
    sub.signal(Signal.DISCONNECTED)
    assert sub.sink is None
    assert drain(sub) == [Signal.DISCONNECTED]


# --- the WS route with and without a sink -----------------------------------------------------


async def converse_live(
    app: FastAPI,
    fanout: FakeHistoryFanout,
    job_id: str,
    live: list[Frame],
    sink: FakeSink | None,
    *,
    timeout_s: float = 5.0,
) -> tuple[list[int], int, str]:
    """Connect, authenticate, wait until the session is LIVE (armed when there is a sink, inbox
    drained otherwise), offer `live` as the tail would, read until the close. Returns the seqs
    sent through ASGI, the close code and reason."""
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = ws_scope(job_id, None if sink is None else {DIRECT_SEND: {"sink": sink}})
    await to_app.put({"type": "websocket.connect"})
    task = asyncio.create_task(app(scope, to_app.get, from_app.put))
    got: list[int] = []
    try:
        async with asyncio.timeout(timeout_s):
            assert (await from_app.get())["type"] == "websocket.accept"
            token = SIGNER.issue(job_id)
            await to_app.put({"type": "websocket.receive", "text": json.dumps({"token": token})})
            while not fanout.subscribers:
                await asyncio.sleep(0)
            sub = fanout.subscribers[0]
            for f in live:
                while (sink is not None and sub.sink is None) or not sub.inbox.empty():
                    try:  # history frames, or the ordered path's sends
                        message = from_app.get_nowait()
                    except asyncio.QueueEmpty:
                        await asyncio.sleep(0)
                        continue
                    if message["type"] == "websocket.close":
                        return got, message["code"], message.get("reason") or ""
                    got.append(json.loads(message["text"])["seq"])
                sub.offer(f)
                await asyncio.sleep(0)
            return await read_until_close(from_app, got)
    finally:
        await to_app.put({"type": "websocket.disconnect", "code": 1000})
        async with asyncio.timeout(timeout_s):
            await task


def test_history_through_asgi_then_live_frames_written_directly_then_close_1000() -> None:
    job_id = str(uuid.uuid4())
    full = job(job_id, 6)
    fanout, sink = FakeHistoryFanout([full[:2]]), FakeSink()
    sent = asyncio.run(converse_live(app_with(fanout), fanout, job_id, full[2:], sink))
    assert sent == ([1, 2], 1000, "job ended")
    assert sink.seqs() == [3, 4, 5, 6]
    assert fanout.subscriber_count == 0


def test_a_live_gap_is_filled_through_asgi_and_direct_writes_resume() -> None:
    """Live 4 arrives before 3: the session re-reads history (which has 3), sends 3 and 4
    through ASGI, re-arms, and 5 and 6 are written directly again."""
    job_id = str(uuid.uuid4())
    full = job(job_id, 6)
    fanout, sink = FakeHistoryFanout([full[:2], full[:3]]), FakeSink()
    live = [full[3], full[4], full[5]]
    sent = asyncio.run(converse_live(app_with(fanout), fanout, job_id, live, sink))
    assert sent == ([1, 2, 3, 4], 1000, "job ended")
    assert sink.seqs() == [5, 6]
    assert fanout.calls == 2


def test_a_slow_direct_client_is_closed_4008_with_its_resume_point() -> None:
    job_id = str(uuid.uuid4())
    full = job(job_id, 200)
    fanout, sink = FakeHistoryFanout([full[:1]]), FakeSink()
    sink.buffer = 10**9  # the client reads nothing and its socket buffer is full
    sent = asyncio.run(converse_live(app_with(fanout), fanout, job_id, full[1:5], sink))
    assert sent == ([1], 4008, "client too slow: reconnect with after_seq=1")
    assert sink.written == []


def test_without_a_sink_live_frames_go_through_asgi() -> None:
    """The fallback: a server that does not advertise DIRECT_SEND gets every frame via send()."""
    job_id = str(uuid.uuid4())
    full = job(job_id, 5)
    fanout = FakeHistoryFanout([full[:2]])
    sent = asyncio.run(converse_live(app_with(fanout), fanout, job_id, full[2:], None))
    assert sent == ([1, 2, 3, 4, 5], 1000, "job ended")


def test_sink_of_reads_only_the_advertised_extension() -> None:
    sink = FakeSink()
    assert sink_of({"extensions": {DIRECT_SEND: {"sink": sink}}}) is sink
    assert sink_of({"extensions": {"websocket.http.response": {}}}) is None
    assert sink_of({"extensions": None}) is None
    assert sink_of({}) is None


# --- which server protocol ----------------------------------------------------------------------


def test_the_direct_protocol_is_uvicorns_websockets_sansio_plus_a_sink() -> None:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    chosen = protocol_class()
    assert isinstance(chosen, type) and issubclass(chosen, WebSocketsSansIOProtocol)
    assert chosen is direct.DirectSendProtocol


def test_switched_off_or_incompatible_falls_back_to_plain_websockets_sansio(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert protocol_class(direct=False) == "websockets-sansio"
    monkeypatch.setattr(direct, "_NEEDED", (*direct._NEEDED, "method_uvicorn_never_had"))
    monkeypatch.setattr(direct, "_warned", set())
    with caplog.at_level(logging.ERROR, logger="facefleet.producer.gateway.direct"):
        assert protocol_class() == "websockets-sansio"
    assert "method_uvicorn_never_had" in caplog.text
    assert "direct WebSocket writes disabled" in caplog.text
