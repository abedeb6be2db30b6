"""`facefleet worker`: build the settings, the processor and the worker, then run until drained."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from facefleet.logs import configure as configure_logs
from facefleet.settings import SettingsError, WorkerSettings, die


def register(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="run a consumer worker for one tier")
    p.add_argument("--tier", help="QoS tier to consume (FACEFLEET_TIER)")
    p.add_argument("--processor", help="sleep | noop | faceswap (FACEFLEET_PROCESSOR)")
    p.add_argument(
        "--backend",
        help="faceswap backend: insightface | classic | emulated (FACEFLEET_BACKEND)",
    )
    p.add_argument(
        "--concurrency", type=int, help="GPU slots (inference lanes) (FACEFLEET_CONCURRENCY)"
    )
    p.add_argument(
        "--pipeline-depth",
        type=int,
        help="jobs in flight per GPU slot; 3 overlaps decode/models/commit (FACEFLEET_PIPELINE_DEPTH)",
    )
    p.add_argument(
        "--instances",
        type=int,
        help="onnxruntime sessions per model on the device (FACEFLEET_INSTANCES)",
    )
    p.add_argument(
        "--batch",
        type=int,
        help="short jobs: jobs per slot taken at once, one sync per step (FACEFLEET_BATCH)",
    )
    p.add_argument("--health-port", type=int, help="0 disables (FACEFLEET_HEALTH_PORT)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {
        key: value
        for key, value in {
            "tier": args.tier,
            "processor": args.processor,
            "backend": args.backend,
            "concurrency": args.concurrency,
            "pipeline_depth": args.pipeline_depth,
            "instances": args.instances,
            "batch": args.batch,
            "health_port": args.health_port,
        }.items()
        if value is not None
    }
    try:
        settings = WorkerSettings.load(**overrides)
        settings.tier_spec(settings.tier)
        settings.providers()
    except SettingsError as exc:
        die(exc)
        return 2
    configure_logs(settings.log_level, settings.log_format)
    logging.getLogger("pika").setLevel(logging.WARNING)
    from facefleet.consumer.errors import JobError
    from facefleet.consumer.health import serve_health
    from facefleet.consumer.processors import create_processor
    from facefleet.consumer.worker import Worker

    try:
        processor = create_processor(settings.processor, settings)
    except (ValueError, JobError) as exc:
        die(SettingsError(f"cannot start processor {settings.processor!r}: {exc}"))
        return 2
    on_busy = None
    if settings.deletion_cost:
        try:
            from facefleet.consumer.podcost import PodDeletionCost

            cost = PodDeletionCost(settings.pod_name, settings.pod_namespace, True)
            on_busy = lambda busy: cost.busy() if busy else cost.idle()  # noqa: E731
        except ImportError:
            logging.getLogger(__name__).warning("pod deletion cost unavailable")
    worker = Worker(settings, processor, on_busy=on_busy)
    server = None
    if settings.health_port:
        server = serve_health(worker, settings.health_host, settings.health_port)
    try:
        return worker.run()
    finally:
        if server is not None:
            server.shutdown()
