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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aio_pika.exceptions
import aiormq.exceptions
import httpx
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from facefleet.jobstore import JobStore
from facefleet.media import MediaStore
from facefleet.producer.aio import AsyncJobClient
from facefleet.producer.gateway.auth import ApiKeys, TokenSigner
from facefleet.producer.gateway.fanout import Fanout
from facefleet.producer.gateway.metrics import GatewayMetrics
from facefleet.settings import GatewaySettings, SettingsError

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class Gateway:
    settings: GatewaySettings
    media: MediaStore
    client: AsyncJobClient
    fanout: Fanout
    signer: TokenSigner
    keys: ApiKeys
    metrics: GatewayMetrics
    http: httpx.AsyncClient
    uploads_in_flight: int = 0
    """Streaming uploads (multipart submits and PUTs) now running; bounded by MAX_UPLOADS."""
    store: JobStore | None = None
    """The job store (see open_gateway_store): per-key listing, usage and limits; None when
    the gateway has none (those answer 503; everything else works from the stream)."""
    key_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    """Per API key, held from a limit check to the job's record in the store (a key with
    limits only), so this replica's own concurrent submits cannot all pass one check."""


MAX_UPLOADS = 64
"""Concurrent streaming uploads (multipart submits and PUTs) per process: a submit holds two
threads, a PUT one, and for s3 each upload about 20 MiB; past it the request is answered 503
with Retry-After at once (no queueing: a waiting upload would hold its client's socket)."""


def open_gateway_store(settings: GatewaySettings) -> JobStore | None:
    """The job store the gateway records its submissions in and answers `GET /v1/jobs`,
    `GET /v1/usage` and the per-key limits from: FACEFLEET_STORE_URL when set (PostgreSQL: no
    volume needed); else the journals in FACEFLEET_DATA_ROOT if that directory exists (the
    workers' volume, mounted; with the default file:// media store the data root is the media
    store too); else none. The gateway never creates a data root for job state. Journals in a
    directory the workers do not share would never see a job end: point the gateway at theirs.
    Per-key limits need a store: without one they stop the gateway (SettingsError) instead of
    going unenforced.
    """
    if settings.store_url.strip():
        return settings.job_store()
    if settings.data_root.is_dir():
        return settings.job_store()
    if settings.key_limits_set:
        raise SettingsError(
            "per-key limits (FACEFLEET_KEY_MAX_ACTIVE, FACEFLEET_KEY_MAX_PER_MINUTE, "
            "FACEFLEET_KEY_LIMITS) need the job store: set FACEFLEET_STORE_URL, or point "
            f"FACEFLEET_DATA_ROOT at the workers' data root ({settings.data_root} does not exist)"
        )
    log.info(
        "no job store (FACEFLEET_STORE_URL unset, no data root at %s): GET /v1/jobs and "
        "/v1/usage answer 503",
        settings.data_root,
    )
    return None


def build_gateway(
    settings: GatewaySettings,
    media: MediaStore | None = None,
    store: JobStore | Literal["settings"] | None = "settings",
) -> Gateway:
    """The gateway's parts; `media` defaults to the store FACEFLEET_MEDIA_URL names (a bad URL
    raises SettingsError), `store` to open_gateway_store's."""
    media = media if media is not None else settings.media_store()
    job_store = open_gateway_store(settings) if store == "settings" else store
    keys = ApiKeys(k.get_secret_value() for k in settings.api_keys)
    unknown = sorted(set(settings.key_limit_ids()) - set(keys.ids))
    if unknown:
        log.warning("FACEFLEET_KEY_LIMITS names key ids of no configured API key: %s", unknown)
    metrics = GatewayMetrics()
    if settings.token_secret is not None:
        signer = TokenSigner(settings.token_secret.get_secret_value(), settings.token_ttl_s)
    else:
        log.warning("FACEFLEET_DEV_INSECURE_SECRET: job tokens use a throw-away secret")
        signer = TokenSigner.ephemeral(settings.token_ttl_s)
    return Gateway(
        settings=settings,
        media=media,
        client=AsyncJobClient(settings, media=media, connection_name="facefleet-gateway"),
        fanout=Fanout(
            settings.amqp_url,
            metrics,
            replay_idle_s=settings.replay_idle_s,
            replay_timeout_s=settings.replay_timeout_s,
        ),
        signer=signer,
        keys=keys,
        metrics=metrics,
        http=httpx.AsyncClient(timeout=3.0),
        store=job_store,
    )


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
    from facefleet.producer.gateway.routes import jobs, keys, status, uploads, ws

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
