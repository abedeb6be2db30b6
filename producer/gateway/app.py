"""The gateway's ASGI app: built from one explicit settings object, no globals.

    app = create_app(GatewaySettings.load())     # uvicorn runs it; tests build their own

Everything a request needs hangs off `app.state.gateway` (a `Gateway`): the async producer
client (submit with confirms), the fan-out (one stream consumer), the token signer, the API
keys, the media store and metrics. Broker connections open in the lifespan; if the broker is
down the process still serves /healthz and answers /readyz with 503 until it is back.

The gateway needs no shared volume: media goes through the media store (FACEFLEET_MEDIA_URL;
file:// or s3://), job history and state come from the durable events stream. Only a file://
media store that defaults to the data root puts media there. Per-key listing, usage and limits
come from the job store (open_gateway_store): FACEFLEET_STORE_URL (PostgreSQL, no volume), or
the workers' journals when FACEFLEET_DATA_ROOT names an existing directory (never created).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

import aio_pika.exceptions
import aiormq.exceptions
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from facefleet.media import MediaStore
from facefleet.producer.gateway.core import STATIC_DIR, build_gateway
from facefleet.producer.gateway.routes import jobs, keys, status, uploads, ws
from facefleet.settings import GatewaySettings

log = logging.getLogger(__name__)


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413 while they stream in, so an oversized
    upload is never spooled whole to disk or memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = b'{"detail":"request body too large: over %d bytes"}' % self.max_bytes
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def tune_gc() -> None:
    """Keep cyclic-GC pauses out of the fan-out's tail latency.

    With 10,000 sockets the heap holds millions of tracked objects, and CPython's full (gen 2)
    collection walks all of them: measured pauses of 0.2-0.8 s on the 2-core bench, straight
    into p99. Objects alive after start-up (modules, app, settings) are frozen out of every
    collection, and collections run far less often; per-connection objects are freed by
    reference counting when a socket closes, so the cyclic collector has little left to find.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def create_app(
    settings: GatewaySettings, *, apply_topology: bool = True, media: MediaStore | None = None
) -> FastAPI:
    """The gateway app. `apply_topology` declares exchanges/queues at start (idempotent);
    `media` overrides the store FACEFLEET_MEDIA_URL names (tests)."""
    gateway = build_gateway(settings, media)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            if apply_topology:
                await gateway.client.apply_topology()
            await gateway.client.connect()
        except (aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError, OSError) as exc:
            log.warning("broker not reachable at start (%r); /readyz is 503 until it is", exc)
        except Exception as exc:  # pika errors from the shared declaration, TopologyError
            log.error("topology not applied: %s", exc)
        await gateway.fanout.start()
        await gateway.fanout.wait_attached(5.0)
        try:
            yield
        finally:
            await gateway.fanout.stop()
            with contextlib.suppress(Exception):
                await gateway.client.close()
            await gateway.http.aclose()
            if gateway.store is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(gateway.store.close)

    app = FastAPI(
        title="FaceFleet gateway",
        summary="Submit face-fusion jobs over HTTP; follow them live over WebSocket.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.gateway = gateway
    app.add_middleware(BodyLimit, max_bytes=2 * settings.max_upload_bytes + (1 << 20))
    app.include_router(keys.router)
    app.include_router(jobs.router)
    app.include_router(uploads.router)
    app.include_router(ws.router)
    app.include_router(status.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
