"""Probes, metrics, the status page and the per-tier queue view it shows."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from facefleet.management import queues_request, rows_by_name
from facefleet.producer.gateway.core import STATIC_DIR, Gateway
from facefleet.producer.gateway.routes.jobs import gateway, require_api_key
from facefleet.wire import job_queue

router = APIRouter()

PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
    "connect-src 'self' ws: wss:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"},
    )


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (the event loop answers)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready when the broker is reachable: the stream consumer is attached and the publisher
    connection is open."""
    gw = gateway(request)
    problems = []
    if not gw.fanout.ready:
        problems.append(f"events stream consumer {gw.fanout.state.value}")
    if not gw.client.connected:
        try:
            await gw.client.connect()
        except Exception as exc:
            problems.append(f"publisher: {exc!r}")
    if problems:
        return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
    # A broker alarm keeps the gateway ready: submits answer 503 + Retry-After, which a client
    # can act on, rather than every replica leaving the Service (connection refused).
    return JSONResponse(
        {
            "status": "ready",
            "subscribers": gw.fanout.subscriber_count,
            "broker_blocked": gw.client.blocked,
        }
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    gw = gateway(request)
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/tiers")
async def tiers(request: Request) -> dict[str, Any]:
    """Per tier: jobs ready, jobs in progress (unacked; management API only) and consumers."""
    gw = gateway(request)
    require_api_key(request)
    mgmt = await management_queues(gw)
    rows = []
    for spec in gw.settings.tiers():
        name = job_queue(spec.name)
        # ready and consumers from AMQP (live); unacked only exists in the management API,
        # whose per-queue stats also lag a few seconds behind a new queue
        amqp = await gw.client.queue_info(spec.name)
        ready, consumers = amqp if amqp is not None else (None, None)
        rows.append(
            {
                "tier": spec.name,
                "queue": name,
                "max_length": spec.max_length,
                "ready": ready,
                "unacked": mgmt.get(name, {}).get("messages_unacknowledged"),
                "consumers": consumers,
            }
        )
    return {"tiers": rows}


async def management_queues(gw: Gateway) -> dict[str, dict[str, Any]]:
    """Queue rows from the RabbitMQ management API, {} when it is not enabled or unreachable."""
    url, auth = queues_request(gw.settings.amqp_urls[0], gw.settings.management_url or "")
    try:
        resp = await gw.http.get(url, auth=auth)
        resp.raise_for_status()
        return rows_by_name(resp.json())
    except (httpx.HTTPError, ValueError):
        return {}
