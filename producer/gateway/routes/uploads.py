"""Uploads that do not go through a submit: get a URL, PUT the bytes there, submit the URI.

    POST /v1/uploads            API key; {"name": "face.jpg", "kind": "jpeg"?}
      201 {"upload_url": URL, "method": "PUT", "expires_in": N, "uri": URI | null}
    PUT  <upload_url>           the raw bytes as the body
    POST /v1/jobs               JSON {"source_uri": URI, "target_uri": URI, ...}

Where the bytes go depends on the media store. An s3 store presigns a PUT straight to the
bucket: the gateway never sees the bytes, and `uri` (known in advance) is what to submit; size
and kind are checked when that URI is submitted (a presigned PUT cannot limit them). A file://
store cannot presign, so `upload_url` is this gateway's `PUT /v1/uploads/{token}` (a signed,
expiring upload token, auth.py), which streams the body into the store with the same checks as
a submit's uploads (size 413 while streaming, kind 415 from the first bytes, nothing left
behind on refusal) and answers with the stored `uri`; `uri` is null in the first answer
because file uploads are content-addressed (the URI is known only once the bytes are).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from facefleet.producer.gateway.auth import TokenError
from facefleet.producer.gateway.forms import drain
from facefleet.producer.gateway.routes.jobs import gateway, require_api_key, upload_slot
from facefleet.producer.gateway.uploads import StreamingUpload, UploadRejected, stored_name
from facefleet.storage import StorageError

router = APIRouter(prefix="/v1")

UPLOAD_URL_TTL_S = 900
"""Lifetime of an upload URL (presigned or gateway token): long enough for a large upload to
start; the upload itself may take longer once started."""
MAX_NAME = 200


def _upload_request(body: Any, allowed: tuple[str, ...]) -> tuple[str, str | None]:
    if not isinstance(body, dict):
        raise HTTPException(400, "body: must be a JSON object")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise HTTPException(400, f"name: required, a string of at most {MAX_NAME} characters")
    kind = body.get("kind")
    if kind is not None and (not isinstance(kind, str) or kind not in allowed):
        raise HTTPException(400, f"kind: one of {', '.join(allowed)} (or omit it)")
    return name, kind


@router.post("/uploads", status_code=201)
async def new_upload(request: Request) -> JSONResponse:
    """A URL to PUT one file to: presigned into the store (s3) or this gateway's (file://)."""
    gw = gateway(request)
    require_api_key(request)
    try:
        body = await request.json()
    except ValueError as exc:
        raise HTTPException(400, "body: not JSON") from exc
    name, kind = _upload_request(body, gw.settings.upload_types)
    if kind is not None:
        name = stored_name(name, kind)
    try:
        presigned = await asyncio.to_thread(gw.media.presign_put, name, UPLOAD_URL_TTL_S)
    except StorageError as exc:
        raise HTTPException(503, f"the media store did not answer: {exc.message}") from exc
    if presigned is not None:
        url, uri = presigned
        answer: dict[str, Any] = {"upload_url": url, "uri": uri}
    else:
        token = gw.signer.issue_upload(name, kind, UPLOAD_URL_TTL_S)
        base = str(request.base_url).rstrip("/")
        answer = {"upload_url": f"{base}/v1/uploads/{token}", "uri": None}
    answer.update(method="PUT", expires_in=UPLOAD_URL_TTL_S)
    return JSONResponse(answer, status_code=201, headers={"Cache-Control": "no-store"})


@router.put("/uploads/{token}", status_code=201)
async def put_upload(request: Request, token: str) -> JSONResponse:
    """Stream the body into the media store; 201 {"uri", "size", "sha256", "kind"}.

    The token is the credential (like a presigned URL): no API key is needed."""
    gw = gateway(request)
    s = gw.settings
    try:
        claims = gw.signer.verify_upload(token)
    except TokenError as exc:
        gw.metrics.auth_refused.labels(f"upload_{exc.problem.name.lower()}").inc()
        raise HTTPException(403, exc.problem.value) from exc
    allowed = (claims.kind,) if claims.kind is not None else s.upload_types
    upload = StreamingUpload(
        gw.media, "upload", claims.name, max_bytes=s.max_upload_bytes, allowed=allowed
    )
    body = request.stream()
    with upload_slot(gw):
        try:
            async for chunk in body:
                await upload.feed(chunk)
            stored = await upload.commit()
        except UploadRejected as exc:
            await upload.abort()
            await drain(body)
            raise HTTPException(exc.status, exc.reason) from exc
        except BaseException:
            await upload.abort()
            raise
    return JSONResponse(
        {"uri": stored.uri, "size": stored.size, "sha256": stored.sha256, "kind": upload.kind},
        status_code=201,
    )
