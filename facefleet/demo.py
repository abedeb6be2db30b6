"""`make demo` / `facefleet demo`: one real job end to end on a local broker.

It finds (or starts) a broker, declares the topology, starts one worker as a subprocess, submits
a face swap of two sample photos that ship with insightface (a Tom Hanks portrait into t1.jpg's
group photo), follows the job's events with a progress bar, and prints where the result is.
The worker runs the `faceswap` processor with the `classic` backend (OpenCV only, no model
weights), so the demo needs nothing that cannot be installed from PyPI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from facefleet.broker import NoBrokerError, discover


def register(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help="run one job end to end on a local broker")
    p.add_argument("--data-root", default="var/demo", help="where media and results go")
    p.add_argument("--source", help="source face photo (default: insightface's Tom Hanks)")
    p.add_argument("--target", help="target photo (default: insightface's t1.jpg)")
    p.add_argument("--processor", default=None, help="faceswap (default) or sleep")
    p.set_defaults(func=run)


def sample_photo(name: str) -> Path:
    spec = importlib.util.find_spec("insightface")
    if spec is None or spec.origin is None:
        raise SystemExit("insightface is not installed; pass --source/--target photos")
    return Path(spec.origin).parent / "data" / "images" / name


def run(args: argparse.Namespace) -> int:
    try:
        broker = discover()
    except NoBrokerError as exc:
        print(f"facefleet demo: {exc}", file=sys.stderr)
        return 4
    processor = args.processor or (
        "faceswap"
        if importlib.util.find_spec("facefleet.consumer.processors.faceswap") is not None
        else "sleep"
    )
    data_root = Path(args.data_root).resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    tier = "standard"
    env = {
        **os.environ,
        "AMQP_URL": broker.url,
        "FACEFLEET_DATA_ROOT": str(data_root),
        "FACEFLEET_BACKEND": "classic",
        "FACEFLEET_HEALTH_PORT": "0",
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith(("FACEFLEET_", "AMQP_URL"))})
    print(f"broker: {broker.origin} ({_redact(broker.url)})")
    if processor == "sleep":
        print("note: the faceswap processor is not in this build; running the `sleep` processor")
    from facefleet.producer.cli import follow
    from facefleet.producer.sdk import JobClient
    from facefleet.settings import ProducerSettings

    settings = ProducerSettings.load()
    log_path = data_root / "demo-worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "facefleet.cli",
                "worker",
                "--tier",
                tier,
                "--processor",
                processor,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        with JobClient(settings) as client:
            client.apply_topology()
            source = args.source or str(sample_photo("Tom_Hanks_54745.png"))
            target = args.target or str(sample_photo("t1.jpg"))
            options: dict[str, Any] = {"sleep_s": 2} if processor == "sleep" else {}
            result = client.submit(tier, source, target, options=options, processor=processor)
        print(f"job {result.job_id} submitted: {Path(source).name} -> {Path(target).name}")
        code = follow(settings, result.job_id, json_lines=False, timeout_s=300)
        manifest = _manifest(data_root, result.job_id)
        if code == 0 and manifest is not None:
            out = data_root / "results" / result.job_id / str(manifest["result_file"])
            print(f"\nresult: {out}")
            print(f"manifest: {out.parent / 'manifest.json'}")
        else:
            print(f"\njob did not complete (exit {code}); worker log: {log_path}")
        return code
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        broker.stop()


def _manifest(data_root: Path, job_id: str) -> dict[str, Any] | None:
    path = data_root / "results" / job_id / "manifest.json"
    for _ in range(20):
        if path.exists():
            data: dict[str, Any] = json.loads(path.read_text())
            return data
        time.sleep(0.1)
    return None


def _redact(url: str) -> str:
    from urllib.parse import urlparse

    p = urlparse(url)
    return url.replace(f":{p.password}@", ":***@") if p.password else url
