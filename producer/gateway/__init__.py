"""The progress gateway: submit jobs over HTTP, follow them live over WebSocket.

    facefleet gateway --host 127.0.0.1 --port 8080

Modules: app (the ASGI app factory), auth (API keys, job tokens), fanout (the one stream
consumer and per-job subscriber sets, history replay), uploads (checks before queueing),
routes/ (jobs, ws, status), cli (`facefleet gateway`), client (`watch` through the gateway),
static/ (the status page).
"""

from producer.gateway.app import create_app

__all__ = ["create_app"]
