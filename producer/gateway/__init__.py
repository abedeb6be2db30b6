"""The progress gateway: submit jobs over HTTP, follow them live over WebSocket.

    facefleet gateway --host 127.0.0.1 --port 8080

Modules: app (the ASGI app factory), auth (API keys, job and upload tokens), fanout (the one
stream consumer and per-job subscriber sets, history replay from the stream), uploads (checks
before queueing, streaming into the media store), forms (the submit's multipart body, parsed
as it arrives), routes/ (jobs, uploads, ws, status), cli (`facefleet gateway`), client (`watch`
through the gateway), static/ (the status page). No module reads the data root.
"""

from facefleet.producer.gateway.app import create_app

__all__ = ["create_app"]
