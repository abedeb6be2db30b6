"""Per-API-key views from the job store: `GET /v1/jobs` (the caller's jobs, newest first, with
cursor pagination) and `GET /v1/usage` (jobs by state and GPU-seconds).

Both need the job store (Gateway.store; 503 without one) and an API key; a caller only ever
sees the jobs submitted with its own key. Query parameters are checked here (400 with a
reason); store calls run in threads (the backends are blocking).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from fastapi import APIRouter, HTTPException, Request

from facefleet.jobstore import ACTIVE_STATES, JobStore, JobSummary, StoreError, store_outage
from facefleet.producer.gateway.core import Gateway
from facefleet.producer.gateway.routes.jobs import gateway, require_api_key
from facefleet.wire import TERMINAL_EVENTS, check_tier

router = APIRouter(prefix="/v1")

STATES: tuple[str, ...] = (*ACTIVE_STATES, *sorted(TERMINAL_EVENTS))
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000

T = TypeVar("T")


def need_store(gw: Gateway) -> JobStore:
    if gw.store is None:
        raise HTTPException(
            503,
            "this gateway has no job store: set FACEFLEET_STORE_URL (or FACEFLEET_DATA_ROOT to "
            "the workers' data root)",
        )
    return gw.store


async def in_store(gw: Gateway, call: Callable[[], T]) -> T:
    """Run a blocking store call in a thread: ValueError -> 400, store down -> 503."""
    try:
        return await asyncio.to_thread(call)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    except Exception as exc:
        if isinstance(exc, StoreError) or store_outage(exc):
            raise HTTPException(503, f"the job store did not answer: {exc}") from exc
        raise


def parse_since(raw: str | None) -> datetime | None:
    """ISO 8601 with a time zone (`2026-12-05T12:00:00Z`, `...+01:00`). A `+` sent unescaped in
    a query string arrives as a space; it is taken back."""
    if raw is None or raw == "":
        return None
    text = raw.strip()
    try:
        when = datetime.fromisoformat(text.replace(" ", "+") if " " in text else text)
    except ValueError:
        raise HTTPException(
            400, f"since: {raw!r} is not an ISO 8601 time (e.g. 2026-12-05T12:00:00Z)"
        ) from None
    if when.tzinfo is None:
        raise HTTPException(400, "since: give a time zone (e.g. 2026-12-05T12:00:00Z)")
    return when


def parse_limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise HTTPException(400, f"limit: a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def parse_state(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    if raw not in STATES:
        raise HTTPException(400, f"state: one of {', '.join(STATES)}")
    return raw


def parse_tier_filter(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    try:
        return check_tier(raw)
    except ValueError as exc:
        raise HTTPException(400, f"tier: {exc}") from None


def job_row(row: JobSummary) -> dict[str, Any]:
    return {
        "job_id": row.job_id,
        "state": row.state,
        "tier": row.tier,
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
        "error_code": row.error_code,
        "gpu_seconds": row.gpu_seconds,
    }


@router.get("/jobs")
async def list_jobs(request: Request) -> dict[str, Any]:
    """The caller's jobs, newest first: `?state=&tier=&since=&limit=&cursor=`; pass
    `next_cursor` back as `cursor` for the next page (null on the last one)."""
    gw = gateway(request)
    key = require_api_key(request)
    q = request.query_params
    unknown = sorted(set(q) - {"state", "tier", "since", "limit", "cursor"})
    if unknown:
        raise HTTPException(400, f"unknown query parameters: {', '.join(unknown)}")
    state = parse_state(q.get("state"))
    tier = parse_tier_filter(q.get("tier"))
    since = parse_since(q.get("since"))
    limit = parse_limit(q.get("limit"))
    cursor = q.get("cursor") or None
    store = need_store(gw)
    page = await in_store(
        gw,
        lambda: store.list_jobs(
            state=state, tier=tier, since=since, limit=limit, cursor=cursor, api_key_id=key
        ),
    )
    return {"jobs": [job_row(r) for r in page.jobs], "next_cursor": page.cursor}


@router.get("/usage")
async def usage(request: Request) -> dict[str, Any]:
    """The caller's jobs created since `since` (default: ever) by state, and the GPU-seconds
    (processing time on the workers) of the completed ones; its limits."""
    gw = gateway(request)
    key = require_api_key(request)
    since = parse_since(request.query_params.get("since"))
    store = need_store(gw)
    found = await in_store(gw, lambda: store.usage(key, since=since))
    active, per_minute = gw.settings.key_limits(key)
    return {
        "api_key_id": key,
        "since": since.isoformat() if since else None,
        "jobs": {**dict.fromkeys(STATES, 0), **found.jobs},
        "total": found.total,
        "gpu_seconds": found.gpu_seconds,
        "limits": {"active": active, "per_minute": per_minute},
    }
