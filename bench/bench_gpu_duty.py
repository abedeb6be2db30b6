"""GPU duty cycle of the worker: sequential (pipeline depth 1) vs pipelined, in the same run.

A stream of 1080p photo face-swap jobs through the whole spine: confirmed publish (+ `queued`),
a real `facefleet worker` process (faceswap processor, `emulated` backend: real JPEG decode,
face crop, paste-back, JPEG encode, result commit with fsyncs, events confirmed into the
stream, ack after commit), job state in the journals. The model calls hold an emulated
exclusive device for a configured time and sleep (no CPU), so

    duty cycle = emulated model seconds (jobs x model time per job) / wall time (first
                 `started` .. last `completed`, from the jobs' events)

and, beside it, held / wall with the device's held seconds as the worker exports them
(facefleet_device_held_seconds_total, scraped before and after): the holds include sleep's
oversleep on a loaded machine, so that figure is a little higher; the headline is the lower one.

is measured on any machine. Each model time (30 ms and 8 ms per job by default) runs the
sequential worker (FACEFLEET_PIPELINE_DEPTH=1, today's path) and the pipelined one (--depth,
4 by default: job N on the device while others decode, paste back, encode and commit),
interleaved over --rounds, medians shown. Every job is checked to have completed exactly once.

Beside each figure, what this machine's CPU allows: the ceiling a CPU-bound worker could reach
(cores / worker CPU per job, as duty at that model time; the broker and this process share the
cores, so the real ceiling is lower) and the CPU the JPEG codec alone takes per job (decoding
both photos and encoding the result, measured here with the same OpenCV): no scheduling makes a
job cheaper than that.

    python -m bench.bench_gpu_duty [--jobs 150] [--rounds 1] [--depth 4] [--json]

JSON keys: duty_sequential / duty_pipelined (30 ms), duty_sequential_8ms / duty_pipelined_8ms,
held_duty_*, jobs_per_s_* likewise, cpu_ms_per_job_* (the worker's CPU per job),
cpu_ceiling_duty_pipelined*, codec_cpu_ms_per_job, depth_pipelined, loadavg (1-minute, before
and after: this machine's 2 cores are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.bench_spine import CpuMeter, _env, _wait_consumers, stop_workers
from facefleet.broker import discover
from facefleet.producer.sdk import JobClient, build_request
from facefleet.settings import ProducerSettings
from facefleet.wire import job_queue

MODEL_TIMES_MS = (30.0, 8.0)
PIPELINED_DEPTH = 4
PROCESSES = 2
"""Worker processes sharing the device in the third run (as worker pods share a GPU through
time-slicing or MPS): one Python process's GIL caps what its CPU lanes can feed."""
SPLIT = {"detect": 1 / 3, "embed": 1 / 15, "swap": 4 / 15}
"""A one-face photo job's model calls: detect twice (source, target), embed once, swap once;
these shares of the job's model time add up to 1."""


def model_ms(per_job_ms: float) -> str:
    """FACEFLEET_EMULATED_MODEL_MS for a job whose model calls take per_job_ms in all."""
    return ",".join(f"{name}={per_job_ms * share:.3f}" for name, share in SPLIT.items())


def photos(root: Path) -> tuple[Path, Path]:
    """A 1080p target photo and a 640x640 source portrait: smooth content with noise, so the
    JPEGs cost what camera photos of that size cost to decode and encode."""
    rng = np.random.default_rng(7)
    out = []
    for name, (w, h) in (("target.jpg", (1920, 1080)), ("source.jpg", (640, 640))):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=-1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = root / name
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        out.append(path)
    return out[1], out[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _completed(text: str) -> float:
    m = re.search(r'^facefleet_jobs_total\{[^}]*outcome="completed"[^}]*\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        body: bytes = resp.read()
        return body.decode()


@dataclass(frozen=True)
class Run:
    depth: int
    model_ms: float
    jobs: int
    jobs_per_s: float
    duty: float
    """Emulated model seconds / wall."""
    held_duty: float
    """Device held seconds (the worker's metric) / wall."""
    held_s: float
    wall_s: float
    worker_cpu_ms_per_job: float


def run_once(amqp_url: str, jobs: int, per_job_ms: float, depth: int, processes: int = 1) -> Run:
    """`processes` workers sharing one device, `jobs` photo jobs queued at once; the figures of
    that stream."""
    tier = "gpuduty" + uuid.uuid4().hex[:8]
    data_root = Path(tempfile.mkdtemp(prefix="ff-gpuduty-"))
    ports = [_free_port() for _ in range(processes)]
    env = _env(
        amqp_url,
        data_root,
        tier,
        FACEFLEET_PROCESSOR="faceswap",
        FACEFLEET_BACKEND="emulated",
        FACEFLEET_EMULATED_MODEL_MS=model_ms(per_job_ms),
        FACEFLEET_PIPELINE_DEPTH=str(depth),
    )
    if processes > 1:
        env["FACEFLEET_EMULATED_DEVICE_LOCK"] = str(data_root / "device.lock")
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("FACEFLEET_", "AMQP_URL"))})
    client = JobClient(ProducerSettings.load())
    procs: list[subprocess.Popen[bytes]] = []
    try:
        client.apply_topology()
        media_dir = data_root / "media"
        media_dir.mkdir()
        source, target = photos(media_dir)
        for port in ports:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "facefleet.cli", "worker"],
                    env={**env, "FACEFLEET_HEALTH_PORT": str(port)},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        _wait_consumers(amqp_url, job_queue(tier), processes)

        def held_now() -> float:
            return sum(
                _metric(_scrape(port), "facefleet_device_held_seconds_total") for port in ports
            )

        def completed_now() -> float:
            return sum(_completed(_scrape(port)) for port in ports)

        held0 = held_now()
        requests = [
            build_request(client.media, tier, str(source), str(target)) for _ in range(jobs)
        ]
        meter = CpuMeter([p.pid for p in procs])
        meter.start()
        client.submit_many(requests)
        store = ProducerSettings.load().job_store()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and completed_now() < jobs:
            time.sleep(0.1)
        cpu = meter.stop(jobs)
        held = held_now() - held0
        first_start, last_done = None, None
        for req in requests:
            events = store.log(req.job_id).events()
            kinds = [e.type for e in events]
            if (
                kinds.count("completed") != 1
                or kinds.count("started") != 1
                or not events[-1].terminal
            ):
                raise RuntimeError(f"job {req.job_id} did not complete exactly once: {kinds}")
            started = next(e.ts for e in events if e.type == "started")
            first_start = started if first_start is None else min(first_start, started)
            last_done = events[-1].ts if last_done is None else max(last_done, events[-1].ts)
        store.close()
        assert first_start is not None and last_done is not None
        wall = (last_done - first_start).total_seconds()
        work = jobs * per_job_ms / 1000.0
        return Run(
            depth,
            per_job_ms,
            jobs,
            jobs / wall,
            work / wall,
            held / wall,
            held,
            wall,
            cpu["workers"],
        )
    finally:
        stop_workers(procs, client, tier)
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(data_root, ignore_errors=True)


def codec_cpu_ms() -> float:
    """CPU ms per job of the JPEG codec alone: decode both photos, encode the 1080p result (at
    the faceswap processor's default quality); the median of 20."""
    from facefleet.consumer.processors.faceswap.options import FaceSwapOptions

    quality = FaceSwapOptions().quality
    with tempfile.TemporaryDirectory() as tmp:
        datas = [np.frombuffer(p.read_bytes(), np.uint8) for p in photos(Path(tmp))]
    samples = []
    for _ in range(20):
        t0 = time.process_time()
        frames = [cv2.imdecode(d, cv2.IMREAD_COLOR) for d in datas]
        cv2.imencode(".jpg", frames[1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        samples.append(time.process_time() - t0)
    return 1000 * statistics.median(samples)


def measure(
    amqp_url: str,
    jobs: int,
    rounds: int,
    times_ms: tuple[float, ...],
    depth: int = PIPELINED_DEPTH,
    processes: int = PROCESSES,
) -> dict[str, Any]:
    """Sequential, pipelined, and pipelined in `processes` workers sharing the device,
    interleaved per round, for each model time; medians."""
    out: dict[str, Any] = {
        "jobs": jobs,
        "rounds": rounds,
        "depth_pipelined": depth,
        "processes": processes,
    }
    out["loadavg_before"] = round(os.getloadavg()[0], 2)
    cpus = os.cpu_count() or 1
    out["codec_cpu_ms_per_job"] = round(codec_cpu_ms(), 2)
    for ms in times_ms:
        runs: dict[str, list[Run]] = {"sequential": [], "pipelined": []}
        if processes > 1:
            runs["processes"] = []
        for _ in range(rounds):
            runs["sequential"].append(run_once(amqp_url, jobs, ms, 1))
            runs["pipelined"].append(run_once(amqp_url, jobs, ms, depth))
            if processes > 1:
                runs["processes"].append(run_once(amqp_url, jobs, ms, depth, processes))
        suffix = "" if ms == MODEL_TIMES_MS[0] else f"_{ms:g}ms"
        for mode, rs in runs.items():
            out[f"duty_{mode}{suffix}"] = round(statistics.median(r.duty for r in rs), 4)
            out[f"held_duty_{mode}{suffix}"] = round(statistics.median(r.held_duty for r in rs), 4)
            out[f"jobs_per_s_{mode}{suffix}"] = round(
                statistics.median(r.jobs_per_s for r in rs), 2
            )
            out[f"cpu_ms_per_job_{mode}{suffix}"] = round(
                statistics.median(r.worker_cpu_ms_per_job for r in rs), 2
            )
        for mode in runs:
            cpu_ms = out[f"cpu_ms_per_job_{mode}{suffix}"]
            out[f"cpu_ceiling_duty_{mode}{suffix}"] = round(min(1.0, cpus * ms / cpu_ms), 4)
    out["loadavg_after"] = round(os.getloadavg()[0], 2)
    out["cpus"] = cpus
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=150)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--depth", type=int, default=PIPELINED_DEPTH, help="the pipelined runs' depth")
    p.add_argument(
        "--processes",
        type=int,
        default=PROCESSES,
        help="worker processes sharing the device in the third run (1: no third run)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    amqp_url = discover().url
    result = measure(amqp_url, args.jobs, args.rounds, MODEL_TIMES_MS, args.depth, args.processes)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{args.jobs} 1080p photo jobs per run, {args.rounds} round(s), one emulated device; "
        f"load average {result['loadavg_before']} -> {result['loadavg_after']} on "
        f"{result['cpus']} CPUs; pipelined depth {result['depth_pipelined']}; the JPEG codec "
        f"alone {result['codec_cpu_ms_per_job']:.1f} ms CPU/job"
    )
    for ms in MODEL_TIMES_MS:
        suffix = "" if ms == MODEL_TIMES_MS[0] else f"_{ms:g}ms"
        modes = ["sequential", "pipelined"] + (["processes"] if args.processes > 1 else [])
        for mode in modes:
            label = f"{args.processes} procs" if mode == "processes" else mode
            print(
                f"  model {ms:4g} ms/job  {label:10s}  {result[f'jobs_per_s_{mode}{suffix}']:6.1f}"
                f" jobs/s  duty {100 * result[f'duty_{mode}{suffix}']:5.1f}% (held "
                f"{100 * result[f'held_duty_{mode}{suffix}']:5.1f}%)  worker CPU "
                f"{result[f'cpu_ms_per_job_{mode}{suffix}']:5.1f} ms/job"
            )
        ratio = result[f"jobs_per_s_pipelined{suffix}"] / result[f"jobs_per_s_sequential{suffix}"]
        print(f"  model {ms:4g} ms/job  pipelined / sequential: {ratio:.2f}x")
        ceiling = result[f"cpu_ceiling_duty_{modes[-1]}{suffix}"]
        print(
            f"  model {ms:4g} ms/job  the most this CPU allows: duty {100 * ceiling:5.1f}% "
            f"({result['cpus']} cores / the last run's worker CPU per job)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
