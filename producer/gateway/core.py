"""The gateway's parts, apart from the ASGI app that serves them: the `Gateway` every request
reaches through `app.state.gateway`, how it is built from settings, and the limits the routes
share. The routes import this module, never `app` (which imports the routes): no cycle.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from facefleet.jobstore import JobStore
from facefleet.media import MediaStore
from facefleet.producer.aio import AsyncJobClient
from facefleet.producer.gateway.auth import ApiKeys, TokenSigner
from facefleet.producer.gateway.fanout import Fanout
from facefleet.producer.gateway.metrics import GatewayMetrics
from facefleet.producer.watch import REPLAY_GRACE_S
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
            replay_grace_s=settings.replay_grace_s or REPLAY_GRACE_S,
        ),
        signer=signer,
        keys=keys,
        metrics=metrics,
        http=httpx.AsyncClient(timeout=3.0),
        store=job_store,
    )
