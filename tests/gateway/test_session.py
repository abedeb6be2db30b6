"""`ClientSession` offline: the real WS route driven in memory, with a fake history source.

History gaps and a reconnect past the end are timing-dependent against a real broker, so
these tests script what `Fanout.history` returns and drive the ASGI app directly; every wait is
bounded, so a session that stalls fails in seconds instead of hanging.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI
from starlette.types import Message

from facefleet.producer.gateway.auth import TokenSigner
from facefleet.producer.gateway.fanout import Fanout, Frame, Subscriber
from facefleet.producer.gateway.metrics import GatewayMetrics
from facefleet.producer.gateway.routes import ws
from facefleet.wire import EventType, JobEvent, utcnow

SIGNER = TokenSigner("f" * 40, ttl_s=600)


def frame(job_id: str, seq: int, kind: EventType = "progress") -> Frame:
    return Frame.of(JobEvent(job_id=job_id, seq=seq, type=kind, ts=utcnow()))


def job(job_id: str, last: int) -> list[Frame]:
    """Frames 1..last of a job that completed at seq `last`."""
    kinds: dict[int, EventType] = {1: "queued", last: "completed"}
    return [frame(job_id, seq, kinds.get(seq, "progress")) for seq in range(1, last + 1)]


class FakeHistoryFanout(Fanout):
    """A fake history source (no broker): `history()` answers the scripted frame lists in turn
    (the last one again once they run out), and on its first call offers `live` frames to the
    subscribers, as if they had reached the shared tail while history was loading."""

    def __init__(self, scripts: list[list[Frame]], live: list[Frame] | None = None) -> None:
        super().__init__("amqp://unused", GatewayMetrics())
        self.scripts = scripts
        self.live = live or []
        self.calls = 0
        self.subscribers: list[Subscriber] = []

    def subscribe(self, job_id: str, maxsize: int, after_seq: int = 0) -> Subscriber:
        sub = super().subscribe(job_id, maxsize, after_seq)
        self.subscribers.append(sub)
        return sub

    async def history(self, job_id: str, *, since: datetime | None) -> list[Frame]:
        script = self.scripts[min(self.calls, len(self.scripts) - 1)]
        self.calls += 1
        if self.calls == 1:
            for sub in self.subscribers:
                for live in self.live:
                    sub.offer(live)
        return list(script)


def app_with(fanout: Fanout) -> FastAPI:
    app = FastAPI()
    app.include_router(ws.router)
    app.state.gateway = SimpleNamespace(
        fanout=fanout,
        signer=SIGNER,
        metrics=fanout.metrics,
        settings=SimpleNamespace(ws_send_queue=64, auth_timeout_s=2.0),
    )
    return app


def ws_scope(job_id: str, extensions: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ASGI scope of a WebSocket connection to the job's events route."""
    path = f"/v1/jobs/{job_id}/events"
    return {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "server": ("test", 80),
        "client": ("127.0.0.1", 50000),
        "subprotocols": [],
        "extensions": extensions or {},
    }


async def converse(
    app: FastAPI, job_id: str, after_seq: int, *, timeout_s: float = 5.0
) -> tuple[list[int], int, str]:
    """Connect, send the token and after_seq, read until the server closes: (seqs, code,
    reason). Raises TimeoutError when the session stalls."""
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = ws_scope(job_id)
    await to_app.put({"type": "websocket.connect"})
    task = asyncio.create_task(app(scope, to_app.get, from_app.put))
    try:
        async with asyncio.timeout(timeout_s):
            accepted = await from_app.get()
            assert accepted["type"] == "websocket.accept", accepted
            token = SIGNER.issue(job_id)
            await to_app.put(
                {
                    "type": "websocket.receive",
                    "text": json.dumps({"token": token, "after_seq": after_seq}),
                }
            )
            return await read_until_close(from_app, [])
    finally:
        await to_app.put({"type": "websocket.disconnect", "code": 1000})
        async with asyncio.timeout(timeout_s):
            await task


async def read_until_close(
    from_app: asyncio.Queue[Message], got: list[int]
) -> tuple[list[int], int, str]:
    """Collect the seqs the app sends until it closes: (seqs, close code, reason)."""
    while True:
        message = await from_app.get()
        if message["type"] == "websocket.close":
            return got, message["code"], message.get("reason") or ""
        got.append(json.loads(message["text"])["seq"])


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_reconnect_at_or_past_the_final_seq_closes_at_once() -> None:
    job_id = str(uuid.uuid4())
    for after_seq in (5, 9):
        fanout = FakeHistoryFanout([job(job_id, 5)])
        assert run(converse(app_with(fanout), job_id, after_seq)) == ([], 1000, "job ended")
        assert fanout.subscriber_count == 0


def test_a_live_terminal_at_or_before_after_seq_also_ends_the_session() -> None:
    """The job ended while the client reconnected: history was read before the terminal event,
    which then arrives live but is not newer than after_seq."""
    job_id = str(uuid.uuid4())
    fanout = FakeHistoryFanout([job(job_id, 5)[:4]], live=[job(job_id, 5)[4]])
    assert run(converse(app_with(fanout), job_id, 5)) == ([], 1000, "job ended")


def test_a_gap_in_history_is_filled_by_one_more_read() -> None:
    job_id = str(uuid.uuid4())
    full = job(job_id, 5)
    fanout = FakeHistoryFanout([[full[0], full[1], full[3], full[4]], full])
    assert run(converse(app_with(fanout), job_id, 0)) == ([1, 2, 3, 4, 5], 1000, "job ended")
    assert fanout.calls == 2


def test_a_gap_that_stays_closes_1011_with_the_seq_to_resume_from() -> None:
    job_id = str(uuid.uuid4())
    full = job(job_id, 5)
    fanout = FakeHistoryFanout([[full[0], full[1], full[3]]])
    seqs, code, reason = run(converse(app_with(fanout), job_id, 0))
    assert (seqs, code) == ([1, 2], 1011)
    assert "after_seq=2" in reason
    assert fanout.calls == 2
    assert fanout.subscriber_count == 0


def test_a_gap_between_history_and_live_is_filled_too() -> None:
    """History stopped early (idle cut-off) at seq 2; the tail delivers 4 and 5 live. Without a
    re-read, 4 and 5 would wait in the orderer for a 3 that never comes."""
    job_id = str(uuid.uuid4())
    full = job(job_id, 5)
    fanout = FakeHistoryFanout([full[:2], full[:3]], live=full[3:])
    assert run(converse(app_with(fanout), job_id, 0)) == ([1, 2, 3, 4, 5], 1000, "job ended")
    assert fanout.calls == 2


def test_no_gap_means_no_second_read() -> None:
    job_id = str(uuid.uuid4())
    full = job(job_id, 4)
    fanout = FakeHistoryFanout([full[:2]], live=full[1:])
    assert run(converse(app_with(fanout), job_id, 0)) == ([1, 2, 3, 4], 1000, "job ended")
    assert fanout.calls == 1
