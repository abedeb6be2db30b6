"""HTTP job routes: submit (202 + job token), state, result, token refresh, cancel.

Every refusal is decided before anything is queued and carries a reason:
400 bad input, 401 no credential, 403 wrong credential, 413 too large, 415 unknown media,
429 tier full or the API key over one of its limits (Retry-After; limits.py), 503 broker,
media store or (for a key with limits) job store unavailable, or the broker blocking publishers
(a memory or disk alarm: Retry-After, and the alarm in the body).

Uploads stream into the media store (forms.py, uploads.py), a job's state is derived from its
events in the durable stream, and its result is served from the media store (a redirect to a
presigned URL for s3, streamed for file://). A queued job carries its API key's id and is
recorded in the job store when the gateway has one (routes/keys.py reads it back).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import mimetypes
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import quote

import aio_pika.exceptions
import aiormq.exceptions
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from facefleet.jobstore import StoreError, store_outage
from facefleet.media import MediaStore
from facefleet.producer.errors import (
    BrokerBlockedError,
    InvalidJobError,
    SubmitError,
    TierFullError,
    UnroutableJobError,
)
from facefleet.producer.gateway.auth import JobClaims, TokenError, TokenSigner, bearer
from facefleet.producer.gateway.core import MAX_UPLOADS, Gateway
from facefleet.producer.gateway.fanout import HistoryUnavailable
from facefleet.producer.gateway.forms import parse_submit_form
from facefleet.producer.gateway.limits import LimitExceeded, check_limits, has_limits
from facefleet.producer.gateway.uploads import UploadRejected, check_uri
from facefleet.producer.sdk import build_request
from facefleet.storage import StorageError
from facefleet.wire import (
    EVENT_TYPES,
    DecodeError,
    EventType,
    JobEvent,
    JobOptionValue,
    JobRequest,
    check_tier,
    job_id_for_key,
    scoped_idempotency_key,
    utcnow,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")

MAX_OPTIONS = 64
RESULT_URL_TTL_S = 300
"""Lifetime of the presigned URL a result request is redirected to: enough to start the
download, short because anyone holding the URL can fetch the result."""
BROKER_ERRORS = (aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError, OSError, TimeoutError)


def gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


# --- credentials -------------------------------------------------------------------------------


def require_api_key(request: Request) -> str:
    """The caller's API key id (auth.key_id); raises 401/403 otherwise."""
    gw = gateway(request)
    cred = bearer(request.headers.get("authorization"))
    if cred is None:
        gw.metrics.auth_refused.labels("missing").inc()
        raise HTTPException(401, "API key required", headers={"WWW-Authenticate": "Bearer"})
    key_id = gw.keys.identify(cred)
    if key_id is None:
        gw.metrics.auth_refused.labels("api_key").inc()
        raise HTTPException(403, "invalid API key")
    return key_id


def authorize_job(request: Request, job_id: str) -> JobClaims | None:
    """The job token's claims, or None when an API key was given; raises 401/403 otherwise.

    The token may come as a Bearer header (preferred: query strings end up in access logs) or
    as the `token` query parameter (for links a browser opens directly)."""
    gw = gateway(request)
    check_job_id(job_id)
    cred = bearer(request.headers.get("authorization")) or request.query_params.get("token")
    if cred is None:
        gw.metrics.auth_refused.labels("missing").inc()
        raise HTTPException(
            401, "job token or API key required", headers={"WWW-Authenticate": "Bearer"}
        )
    if TokenSigner.looks_like_token(cred):
        try:
            return gw.signer.verify(cred, job_id)
        except TokenError as exc:
            gw.metrics.auth_refused.labels(exc.problem.name.lower()).inc()
            raise HTTPException(403, exc.problem.value) from exc
    if gw.keys.valid(cred):
        return None
    gw.metrics.auth_refused.labels("api_key").inc()
    raise HTTPException(403, "invalid job token or API key")


def check_job_id(job_id: str) -> None:
    try:
        uuid.UUID(job_id)
    except ValueError:
        raise HTTPException(404, "no such job") from None


# --- submit ------------------------------------------------------------------------------------


def parse_options(raw: Any) -> dict[str, JobOptionValue]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise HTTPException(400, f"options: not JSON ({exc.msg})") from exc
    if not isinstance(raw, dict):
        raise HTTPException(400, "options: must be a JSON object")
    if len(raw) > MAX_OPTIONS:
        raise HTTPException(400, f"options: at most {MAX_OPTIONS} keys")
    for key, value in raw.items():
        if not isinstance(value, str | int | float | bool) and value is not None:
            raise HTTPException(400, f"options.{key}: must be a string, number, boolean or null")
    return raw


def parse_tier(gw: Gateway, raw: Any) -> str:
    tier = raw or gw.settings.default_tier
    if not isinstance(tier, str):
        raise HTTPException(400, "tier: must be a string")
    try:
        check_tier(tier)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    known = [t.name for t in gw.settings.tiers()]
    if tier not in known:
        raise HTTPException(400, f"unknown tier {tier!r}; known tiers: {', '.join(known)}")
    return tier


def optional_text(raw: Any, name: str, limit: int = 200) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or len(raw) > limit:
        raise HTTPException(400, f"{name}: must be a string of at most {limit} characters")
    return raw


@dataclass(frozen=True)
class SubmitFields:
    """The non-media fields of a submit, validated."""

    tier: str
    options: dict[str, JobOptionValue]
    idempotency_key: str | None
    processor: str | None
    webhook_url: str | None = None
    webhook_events: tuple[EventType, ...] | None = None


def parse_webhook_events(raw: Any) -> tuple[EventType, ...] | None:
    """`webhook_events`: a JSON list (JSON submits) or a comma-separated string (forms)."""
    if raw is None or raw == "":
        return None
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise HTTPException(400, "webhook_events: a list of event types")
    unknown = [i.strip() for i in items if i.strip() not in EVENT_TYPES]
    if unknown:
        raise HTTPException(400, f"webhook_events: unknown event types {unknown}")
    return tuple(cast(EventType, i.strip()) for i in items)


def submit_fields(gw: Gateway, request: Request, fields: dict[str, Any]) -> SubmitFields:
    return SubmitFields(
        tier=parse_tier(gw, fields.get("tier")),
        options=parse_options(fields.get("options")),
        idempotency_key=optional_text(
            request.headers.get("idempotency-key") or fields.get("idempotency_key"),
            "idempotency_key",
        ),
        processor=optional_text(fields.get("processor"), "processor", 40),
        webhook_url=optional_text(fields.get("webhook_url"), "webhook_url", 2048),
        webhook_events=parse_webhook_events(fields.get("webhook_events")),
    )


@contextlib.contextmanager
def upload_slot(gw: Gateway) -> Iterator[None]:
    """Count a streaming upload against MAX_UPLOADS; 503 + Retry-After when none is free."""
    if gw.uploads_in_flight >= MAX_UPLOADS:
        raise HTTPException(
            503,
            f"{MAX_UPLOADS} uploads in progress on this gateway; retry shortly",
            headers={"Retry-After": "5"},
        )
    gw.uploads_in_flight += 1
    try:
        yield
    finally:
        gw.uploads_in_flight -= 1


async def _media_from_form(gw: Gateway, request: Request) -> tuple[SubmitFields, str, str]:
    """Stream both uploads into the media store while the body arrives, check every field, and
    only then commit the uploads: a refused submit leaves no object or file behind."""
    s = gw.settings
    with upload_slot(gw):
        try:
            form = await parse_submit_form(
                gw.media,
                request.headers.get("content-type", ""),
                request.stream(),
                max_bytes=s.max_upload_bytes,
                allowed=s.upload_types,
            )
        except UploadRejected as exc:
            raise HTTPException(exc.status, exc.reason) from exc
        try:
            fields = submit_fields(gw, request, form.fields)
            uris = await form.commit()
        except UploadRejected as exc:
            raise HTTPException(exc.status, exc.reason) from exc
        except BaseException:
            await form.abort()
            raise
    return fields, uris["source"], uris["target"]


async def _media_from_json(gw: Gateway, request: Request) -> tuple[dict[str, Any], str, str]:
    """Media URIs of a JSON submit: the store's own (checked: exists, size, kind from its first
    bytes) or https:// URLs (fetched by the worker, not here)."""
    s = gw.settings
    try:
        body = await request.json()
    except ValueError as exc:
        raise HTTPException(400, "body: not JSON") from exc
    if not isinstance(body, dict):
        raise HTTPException(400, "body: must be a JSON object")
    uris = []
    for role in ("source", "target"):
        uri = body.get(f"{role}_uri")
        if not isinstance(uri, str) or not uri:
            raise HTTPException(400, f"{role}_uri: required")
        try:
            uris.append(
                await asyncio.to_thread(
                    check_uri,
                    gw.media,
                    role,
                    uri,
                    max_bytes=s.max_upload_bytes,
                    allowed=s.upload_types,
                )
            )
        except UploadRejected as exc:
            raise HTTPException(exc.status, exc.reason) from exc
    return body, uris[0], uris[1]


@router.post("/jobs", status_code=202)
async def submit_job(request: Request) -> JSONResponse:
    """Submit a job: multipart (`source`, `target` files; `tier`, `options`, `idempotency_key`,
    `processor` fields) or JSON (`source_uri`, `target_uri`: URIs of the media store, e.g. from
    POST /v1/uploads, or https:// URLs; same fields)."""
    gw = gateway(request)
    key_id = require_api_key(request)
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        # Refuse a key over its limits before its uploads stream in (checked again below).
        refused = await over_limits(
            gw, key_id, scoped(key_id, request.headers.get("idempotency-key"))
        )
        if refused is not None:
            return refused
        fields, src, tgt = await _media_from_form(gw, request)
    elif ctype.startswith("application/json"):
        body, src, tgt = await _media_from_json(gw, request)
        fields = submit_fields(gw, request, body)
    else:
        raise HTTPException(415, "use multipart/form-data (uploads) or application/json (URIs)")
    tier = fields.tier
    async with key_guard(gw, key_id):
        idempotency_key = scoped(key_id, fields.idempotency_key)
        refused = await over_limits(gw, key_id, idempotency_key)
        if refused is not None:
            return refused
        try:
            job = await asyncio.to_thread(
                functools.partial(
                    build_request,
                    gw.media,
                    tier,
                    src,
                    tgt,
                    cost_model=gw.client.cost_model,
                    options=fields.options,
                    idempotency_key=idempotency_key,
                    processor=fields.processor,
                    webhook_url=fields.webhook_url,
                    webhook_events=fields.webhook_events,
                )
            )
            # the owner rides in the request and its queued event: every store learns it
            result = await gw.client.submit_request(job.model_copy(update={"api_key_id": key_id}))
        except TierFullError as exc:
            gw.metrics.submits.labels(key_id, "tier_full").inc()
            return JSONResponse(
                {"detail": str(exc), "tier": tier},
                status_code=429,
                headers={"Retry-After": str(gw.settings.retry_after_s)},
            )
        except BrokerBlockedError as exc:
            gw.metrics.submits.labels(key_id, "broker_blocked").inc()
            return JSONResponse(
                {"detail": str(exc), "alarm": exc.alarm},
                status_code=503,
                headers={"Retry-After": str(gw.settings.retry_after_s)},
            )
        except InvalidJobError as exc:
            gw.metrics.submits.labels(key_id, "invalid").inc()
            raise HTTPException(400, str(exc)) from exc
        except UnroutableJobError as exc:
            gw.metrics.submits.labels(key_id, "unroutable").inc()
            raise HTTPException(503, str(exc)) from exc
        except (SubmitError, *BROKER_ERRORS) as exc:
            gw.metrics.submits.labels(key_id, "broker_error").inc()
            raise HTTPException(503, f"the job could not be queued: {exc!r}") from exc
        if result.request is not None:
            await record_submitted(gw, result.request)
    gw.metrics.submits.labels(key_id, "duplicate" if result.duplicate else "queued").inc()
    if result.request is not None:
        created = int(result.request.created_at.timestamp())
    else:
        created = await _created_at(gw, result.job_id) or 0
    body = job_links(request, gw, result.job_id, created)
    body.update(duplicate=result.duplicate, tier=tier)
    return JSONResponse(body, status_code=200 if result.duplicate else 202)


def scoped(key_id: str, idempotency_key: str | None) -> str | None:
    return None if not idempotency_key else scoped_idempotency_key(key_id, idempotency_key)


@contextlib.asynccontextmanager
async def key_guard(gw: Gateway, key_id: str) -> AsyncIterator[None]:
    """Hold the key's lock from its limit check to its job's record in the store (keys with
    limits only: the others never wait on each other)."""
    if gw.store is None or not has_limits(gw.settings, key_id):
        yield
        return
    lock = gw.key_locks.setdefault(key_id, asyncio.Lock())
    async with lock:
        yield


async def over_limits(gw: Gateway, key_id: str, idempotency_key: str | None) -> JSONResponse | None:
    """429 + Retry-After naming the limit when one more job would pass one of the key's
    limits; None to go on. A resubmission of an existing job (its idempotency key was seen)
    queues nothing and is never refused."""
    store = gw.store
    if store is None or not has_limits(gw.settings, key_id):
        return None
    if idempotency_key:
        job_id = job_id_for_key(idempotency_key)
        with contextlib.suppress(StorageError, ValueError):
            if await asyncio.to_thread(gw.media.submitted, job_id):
                return None
    try:
        await asyncio.to_thread(check_limits, store, gw.settings, key_id, utcnow())
    except LimitExceeded as exc:
        gw.metrics.submits.labels(key_id, f"limit_{exc.limit}").inc()
        return JSONResponse(
            exc.body(), status_code=429, headers={"Retry-After": str(exc.retry_after_s)}
        )
    except Exception as exc:
        if isinstance(exc, StoreError) or store_outage(exc):
            raise HTTPException(
                503, f"the job store did not answer, so the key's limits cannot be checked: {exc}"
            ) from exc
        raise
    return None


async def record_submitted(gw: Gateway, job: JobRequest) -> None:
    """Record a job just queued in the job store (its `queued` event as seq 1, published), so
    listings and limits see it before a worker takes it. A failure only delays that: the first
    worker to take the job records the same event."""
    if gw.store is None:
        return
    try:
        await asyncio.to_thread(gw.store.record_submitted, job)
    except Exception as exc:
        gw.metrics.store_errors.inc()
        log.warning("job %s: not recorded in the job store (%r)", job.job_id, exc)


def job_links(request: Request, gw: Gateway, job_id: str, created: int) -> dict[str, Any]:
    token = gw.signer.issue(job_id, iat=created)
    base = str(request.base_url).rstrip("/")
    ws_base = "ws" + base[4:] if base.startswith("http") else base
    return {
        "job_id": job_id,
        "token": token,
        "token_expires_at": datetime.fromtimestamp(int(token.split(".")[2]), UTC).isoformat(),
        "events_url": f"{ws_base}/v1/jobs/{job_id}/events",
        "status_url": f"{base}/v1/jobs/{job_id}",
        "result_url": f"{base}/v1/jobs/{job_id}/result",
    }


async def _created_at(gw: Gateway, job_id: str) -> int | None:
    created = await submitted_at(gw.media, job_id)
    if created is not None:
        return int(created.timestamp())
    frames = await gw.fanout.history(job_id, since=None)
    if not frames:
        return None
    return int(JobEvent.decode(frames[0].text.encode()).ts.timestamp())


async def submitted_at(media: MediaStore, job_id: str) -> datetime | None:
    """When a job was created, from its submission record in the media store, or None.

    Why: an API-key caller has no token carrying the creation time, and without it a history
    read would start at the stream's first message (up to 7 days of every job's events); the
    record bounds it to the job's lifetime, as a job token does."""

    def read() -> datetime | None:
        try:
            data = media.submission(job_id)
        except (StorageError, ValueError):
            return None
        if data is None:
            return None
        try:
            request = JobRequest.decode(data)
        except DecodeError:
            return None
        return request.created_at if request.job_id == job_id else None

    return await asyncio.to_thread(read)


# --- state and result --------------------------------------------------------------------------


async def job_events(
    gw: Gateway, job_id: str, claims: JobClaims | None, caller: str | None = None
) -> list[JobEvent]:
    """The job's events from the durable stream, read from its creation time (the token's, or
    the submission record's for an API key); 404 when there are none, and for an API key
    (`caller`, its id) other than the one that submitted the job (its `queued` names the owner;
    jobs queued by AMQP producers without an owner are visible to every key)."""
    if claims is not None:
        since: datetime | None = datetime.fromtimestamp(claims.iat, UTC)
    else:
        since = await submitted_at(gw.media, job_id)
    try:
        frames = await gw.fanout.history(job_id, since=since)
    except HistoryUnavailable as exc:
        raise HTTPException(503, str(exc)) from exc
    if not frames:
        raise HTTPException(404, "no such job")
    events = [JobEvent.decode(f.text.encode()) for f in frames]
    owner = events[0].payload.api_key_id if events[0].type == "queued" else None
    if claims is None and owner is not None and caller != owner:
        raise HTTPException(404, "no such job")  # not yours: nothing about it is revealed
    return events


def api_caller(request: Request, claims: JobClaims | None) -> str | None:
    """The API key id of a caller that authorized with a key (None for a job token)."""
    if claims is not None:
        return None
    cred = bearer(request.headers.get("authorization"))
    return None if cred is None else gateway(request).keys.identify(cred)


STATE_OF = {"progress": "running", "started": "running"}


def job_state(events: list[JobEvent]) -> dict[str, Any]:
    """A snapshot for polling clients, derived from the history alone."""
    last = events[-1]
    fraction = 0.0
    stage = None
    for ev in events:
        if ev.type == "progress" and ev.payload.fraction is not None:
            fraction, stage = ev.payload.fraction, ev.payload.stage
    out: dict[str, Any] = {
        "job_id": last.job_id,
        "state": STATE_OF.get(last.type, last.type),
        "last_event": last.type,
        "seq": last.seq,
        "updated_at": last.ts.isoformat(),
        "progress": 1.0 if last.type == "completed" else fraction,
        "stage": stage,
        "terminal": last.terminal,
    }
    if last.type == "completed":
        out["result_uri"] = last.payload.result_uri
    if last.type in ("failed", "dead_lettered", "cancelled", "retrying"):
        out["error"] = {"code": last.payload.code, "message": last.payload.message}
    return out


@router.get("/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> dict[str, Any]:
    gw = gateway(request)
    claims = authorize_job(request, job_id)
    state = job_state(await job_events(gw, job_id, claims, api_caller(request, claims)))
    if state["state"] == "completed":
        state["result_url"] = str(request.url_for("get_result", job_id=job_id))
    return state


@router.get("/jobs/{job_id}/result", name="get_result")
async def get_result(request: Request, job_id: str) -> Response:
    """The result file of a completed job, from the media store: a 307 redirect to a presigned
    URL (valid RESULT_URL_TTL_S) when the store has them (s3), else the file streamed with its
    content type (file://). `?proxy=true` streams it through the gateway for every store: the
    status page's fetch() may not follow a redirect to another origin (its CSP allows 'self')."""
    gw = gateway(request)
    claims = authorize_job(request, job_id)
    events = await job_events(gw, job_id, claims, api_caller(request, claims))
    last = events[-1]
    uri = last.payload.result_uri
    if last.type != "completed" or not uri:
        raise HTTPException(409, f"job is {STATE_OF.get(last.type, last.type)}: no result")
    if not gw.media.owns(uri):
        raise HTTPException(404, "the result is outside this gateway's media store")
    try:
        proxy = request.query_params.get("proxy", "").lower() in ("1", "true", "yes")
        url = (
            None if proxy else await asyncio.to_thread(gw.media.presign_get, uri, RESULT_URL_TTL_S)
        )
        if url is not None:
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
        chunks, size, content_type = await asyncio.to_thread(gw.media.open, uri)
    except StorageError as exc:
        if exc.code == "media_not_found":
            raise HTTPException(404, "the result file is gone from the media store") from exc
        raise HTTPException(503, f"the media store did not answer: {exc.message}") from exc
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    media_type = content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
    return StreamingResponse(
        chunks,
        media_type=media_type,
        headers={"Content-Length": str(size), "Content-Disposition": attachment(name)},
    )


def attachment(name: str) -> str:
    """Content-Disposition for a download named `name` (RFC 6266; as FileResponse writes it)."""
    quoted = quote(name)
    if quoted != name:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{name}"'


@router.post("/jobs/{job_id}/token")
async def new_token(request: Request, job_id: str) -> dict[str, Any]:
    """A fresh job token for an API-key holder (the CLI's `watch` uses this)."""
    gw = gateway(request)
    caller = require_api_key(request)
    check_job_id(job_id)
    events = await job_events(gw, job_id, None, caller)
    return job_links(request, gw, job_id, int(events[0].ts.timestamp()))


@router.post("/jobs/{job_id}/cancel", status_code=202)
async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    gw = gateway(request)
    claims = authorize_job(request, job_id)
    events = await job_events(gw, job_id, claims, api_caller(request, claims))
    if events[-1].terminal:
        raise HTTPException(409, f"job already {events[-1].type}")
    try:
        await gw.client.cancel(job_id, "cancelled through the gateway")
    except BROKER_ERRORS as exc:
        raise HTTPException(503, f"cancel not delivered: {exc!r}") from exc
    return {"job_id": job_id, "cancel_requested": True}
