"""Direct WebSocket writes for live subscribers: one pre-encoded frame, one transport.write.

Why. Through ASGI every fanned-out frame costs a queue put, a task wake-up, a `send()` call,
a frame build and a socket write per subscriber (~50-140 µs on the 2-core bench hosts), so
10,000 frames/s took 0.5 core on a quiet host and saturated a slower one. A job's event is
the same bytes for all its subscribers, so it is framed once (`encode_text_frame`) and a
caught-up subscriber gets it with one `transport.write` from the stream tail's own callback.

How, without reaching into the server from the app. `DirectSendProtocol` is uvicorn's
`websockets-sansio` protocol plus one thing: it puts itself into the ASGI scope under the
extension key `DIRECT_SEND` (ASGI servers advertise optional features in
`scope["extensions"]`). A session that finds the key uses `FrameSink.write_frame`; any other
server, an in-memory test harness, or `facefleet gateway --no-direct-send` leaves it out and
every frame goes through ASGI `send()` as before. `protocol_class()` checks at start that
uvicorn's class still has what this relies on, and logs an error and falls back when not.

Invariants kept by the callers (`fanout.Subscriber`, `routes.ws`): only frames released in
seq order by the subscriber's `SeqOrderer` are written; nothing is written while an ASGI send
of the same connection is in flight (a session arms direct writes only between its awaited
sends); handshake, pings, close and replay still go through uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State

log = logging.getLogger(__name__)

DIRECT_SEND = "facefleet.websocket.direct_send"
"""ASGI scope extension: `scope["extensions"][DIRECT_SEND]["sink"]` is the connection's
`FrameSink`."""

FALLBACK_WS = "websockets-sansio"
"""uvicorn's own protocol name, used when `DirectSendProtocol` cannot be."""

_NEEDED = ("run_asgi", "send", "connection_lost", "shutdown")
"""Methods of uvicorn's protocol this module builds on (plus the attributes in `_usable`)."""


def encode_text_frame(payload: bytes) -> bytes:
    """One final, unmasked, uncompressed server text frame (RFC 6455 5.2), by websockets' own
    serializer, so the bytes are exactly what `ServerProtocol.send_text` would produce."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


class FrameSink(Protocol):
    """What a session needs to write pre-encoded frames to its client."""

    def write_frame(self, frame: bytes) -> bool:
        """Write one whole frame now; False when the connection is closing or closed."""

    def buffered(self) -> int:
        """Bytes waiting in user space for the client (the transport's write buffer)."""

    @property
    def high_water(self) -> int:
        """The transport's high-water mark: where ASGI sends start to wait."""


def sink_of(scope: dict[str, Any] | Any) -> FrameSink | None:
    """The connection's `FrameSink` when the server advertises one, else None."""
    extensions = scope.get("extensions") or {}
    entry = extensions.get(DIRECT_SEND)
    return None if entry is None else entry.get("sink")  # type: ignore[no-any-return]


class DirectSendProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol that also advertises itself as a `FrameSink`."""

    async def run_asgi(self) -> None:
        if self._usable():
            extensions = self.scope.setdefault("extensions", {})
            if extensions is not None:
                extensions[DIRECT_SEND] = {"sink": self}
        await super().run_asgi()

    def _usable(self) -> bool:
        """The attributes `write_frame` reads exist, and no extension (deflate) changes frames.

        The transport is checked by its methods: uvloop's is not an `asyncio.Transport`
        subclass, only one by behaviour."""
        try:
            transport_ok = all(
                callable(getattr(self.transport, name, None))
                for name in (
                    "write",
                    "is_closing",
                    "get_write_buffer_size",
                    "get_write_buffer_limits",
                )
            )
            fields_ok = (
                isinstance(self.conn.state, State)
                and isinstance(self.close_sent, bool)
                and isinstance(self.disconnected, bool)
            )
            extensions = list(self.conn.extensions)
        except AttributeError as exc:
            _warn_once(f"uvicorn's WebSocket protocol changed ({exc})")
            return False
        if not (transport_ok and fields_ok):
            _warn_once(f"unexpected transport {type(self.transport).__name__} or protocol fields")
            return False
        if extensions:
            _warn_once(f"WebSocket extensions negotiated ({extensions}): frames are not plain")
            return False
        return True

    def write_frame(self, frame: bytes) -> bool:
        if (
            self.close_sent
            or self.disconnected
            or self.conn.state is not State.OPEN
            or self.transport.is_closing()
        ):
            return False
        self.transport.write(frame)
        return True

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    @property
    def high_water(self) -> int:
        return self.transport.get_write_buffer_limits()[1]


def protocol_class(*, direct: bool = True) -> type[asyncio.Protocol] | str:
    """The `ws` protocol for uvicorn: `DirectSendProtocol`, or uvicorn's plain websockets-sansio
    when `direct` is off or this uvicorn lacks what it builds on (logged as an error: every
    frame then takes the slower ASGI path)."""
    if not direct:
        log.warning("direct WebSocket writes switched off; frames go through ASGI send")
        return FALLBACK_WS
    missing = [
        name for name in _NEEDED if not callable(getattr(WebSocketsSansIOProtocol, name, None))
    ]
    if missing:
        _warn_once(f"uvicorn's WebSocketsSansIOProtocol lacks {', '.join(missing)}")
        return FALLBACK_WS
    return DirectSendProtocol


_warned: set[str] = set()


def _warn_once(problem: str) -> None:
    if problem not in _warned:
        _warned.add(problem)
        log.error("direct WebSocket writes disabled: %s; frames go through ASGI send", problem)
