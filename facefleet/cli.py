"""The `facefleet` command: one entry point, subcommands registered by each part of the system.

Each part owns a module with `register(subparsers)`; modules are imported lazily by name so the
producer's CLI never loads the consumer (nor onnxruntime) and `facefleet --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from facefleet import tracing

# (command, module, one-line help). The module's register() adds the subcommand's arguments and
# sets `func` (argparse.Namespace -> exit code).
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("topology", "facefleet.producer.cli", "declare exchanges and queues (idempotent)"),
    ("submit", "facefleet.producer.cli", "submit a face-fusion job"),
    ("watch", "facefleet.producer.cli", "replay and follow a job's events"),
    ("cancel", "facefleet.producer.cli", "cancel a job"),
    ("status", "facefleet.producer.cli", "per-tier queue depth and consumers"),
    ("worker", "facefleet.consumer.cli", "run a consumer worker"),
    ("models", "facefleet.models.cli", "pull, verify and generate model weights"),
    ("simulate", "facefleet.keda.cli", "simulate KEDA/HPA scaling for a tier and plan thresholds"),
    (
        "scaler",
        "facefleet.keda.scaler.server",
        "run KEDA's external scaler (work, latency, predictive)",
    ),
    ("gateway", "facefleet.producer.gateway.cli", "run the HTTP/WebSocket progress gateway"),
    ("webhooks", "facefleet.webhooks", "POST job events to their webhook URLs (signed, retried)"),
    ("store", "facefleet.storecli", "job store administration (migrate, check)"),
    ("jobs", "facefleet.storecli", "list and inspect jobs in the job store"),
    ("dead", "facefleet.storecli", "list and replay dead-lettered jobs"),
    ("demo", "facefleet.demo", "run one job end to end on a local broker"),
    ("doctor", "facefleet.doctor", "check the broker or cluster for what FaceFleet needs"),
)


EXTRA_FOR_MODULE: dict[str, str] = {
    "numpy": "worker",
    "cv2": "worker",
    "av": "worker",
    "PIL": "worker",
    "onnxruntime": "worker",
    "kubernetes": "worker",
    "fastapi": "gateway",
    "uvicorn": "gateway",
    "multipart": "gateway",
    "websockets": "gateway",
    "grpc": "scaler",
    "google": "scaler",
    "matplotlib": "sim",
    "insightface": "demo",
}
"""Which extra brings a module the base install leaves out (pyproject: the base install is the
producer SDK and CLI)."""


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """A clear line for a command run without its extra, instead of an ImportError trace."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_FOR_MODULE.get(top)
    if extra is None:
        return None
    return (
        f"facefleet: this command needs the `{extra}` extra (module {top!r} is not installed): "
        f"pip install 'facefleet[{extra}]'"
    )


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facefleet",
        description="FaceFleet: GPU face-fusion jobs on RabbitMQ. Submit and follow jobs, run "
        "workers and the gateway, pull models, and simulate scaling.",
        epilog="Settings come from the environment (AMQP_URL, FACEFLEET_*; see the README). "
        "`facefleet COMMAND --help` for each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = argv[0] if argv else None
    for name, module_name, help_text in COMMANDS:
        if wanted in (name,) or wanted in (None, "-h", "--help"):
            if wanted == name:
                module = importlib.import_module(module_name)
                module.register(sub, name)
            else:
                sub.add_parser(name, help=help_text)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(args_list)
        args = parser.parse_args(args_list)
        func = getattr(args, "func", None)
        if func is None:
            parser.error(f"{args.command}: not available in this build")
        # OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set (README "Tracing"); else no-op.
        tracing.configure(f"facefleet-{args.command}")
        return int(func(args))
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        line = missing_extra(exc)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
