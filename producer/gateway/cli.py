"""`facefleet gateway`: load GatewaySettings, build the app, serve it with uvicorn.

uvicorn options that matter at 10,000 sockets: the sans-I/O websockets protocol (flow control:
a slow client blocks its own sender, never the loop), extended to let caught-up subscribers get
pre-encoded frames written directly (`direct.py`; `--no-direct-send` turns that off), no
per-message deflate (a zlib context per socket costs more memory than everything else together,
and direct writes need plain frames), pings every heartbeat_s, and no access log by default (a
WebSocket URL may carry a job token).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from facefleet.logs import configure as configure_logs
from facefleet.settings import GatewaySettings, SettingsError, die


def register(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="run the HTTP/WebSocket progress gateway")
    p.add_argument("--host", help="listen address (FACEFLEET_GATEWAY_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (FACEFLEET_GATEWAY_PORT, default 8080)")
    p.add_argument("--access-log", action="store_true", help="log every request (may log tokens)")
    p.add_argument(
        "--no-direct-send",
        action="store_true",
        help="send every WebSocket frame through ASGI (slower; for comparison and diagnosis)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {
        key: value
        for key, value in {"gateway_host": args.host, "gateway_port": args.port}.items()
        if value is not None
    }
    try:
        settings = GatewaySettings.load(**overrides)
    except SettingsError as exc:
        die(exc)
        return 2
    configure_logs(settings.log_level, settings.log_format)
    for noisy in ("aio_pika", "aiormq", "pika"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import uvicorn

    from facefleet.producer.gateway.app import create_app, tune_gc
    from facefleet.producer.gateway.direct import protocol_class

    try:
        app = create_app(settings)
    except SettingsError as exc:  # FACEFLEET_MEDIA_URL names no usable store
        die(exc)
        return 2
    tune_gc()  # a process-wide choice, so made here and not in the app factory
    config = uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        ws=protocol_class(direct=not args.no_direct_send),
        ws_ping_interval=settings.heartbeat_s,
        ws_ping_timeout=settings.heartbeat_s,
        ws_per_message_deflate=False,
        ws_max_size=64 * 1024,
        backlog=4096,
        timeout_graceful_shutdown=5,
        access_log=bool(args.access_log),
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's loggers go through facefleet.logs like the rest
    )
    uvicorn.Server(config).run()
    return 0
