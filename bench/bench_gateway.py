"""Gateway fan-out benchmark: 10,000 WebSocket subscribers, 1,000 events/s, one gateway process.

    .venv/bin/python bench/bench_gateway.py [--sockets 10000] [--jobs 1000] [--rate 1000]
                                            [--duration 20] [--client-procs 4]

What it does (all on loopback, bounded in sockets, events and time):

1. starts a real `facefleet gateway` (uvicorn, one process) with its fd limit raised to the hard
   limit, on a throw-away data root;
2. creates `--jobs` synthetic jobs, each with a journal holding its `queued` event (the gateway's
   production history path: it shares the data root with the workers);
3. spreads `--sockets` WebSocket subscribers over `--client-procs` client processes
   (sockets / jobs subscribers per job), each authenticating with a job token, and measures the
   gateway's RSS before and after: memory per connection;
4. publishes `--rate` progress events/s round-robin over the jobs straight to the events stream
   for `--duration` s (as workers would), each stamped with its publish time; then one
   `completed` event per job, which makes the gateway close every socket with 1000;
5. every client records publish->receipt latency of each frame; the parent prints p50/p99/max,
   delivered/expected frames, and memory per connection.

The event timestamp is taken right before the publish, so latency = broker routing + stream
delivery + gateway fan-out + WebSocket send + client receive, with everything (broker, gateway,
clients, publisher) sharing the same 2 cores.

Results (2026-11-21, 2 shared cores, RabbitMQ 3.10.8, Python 3.11 + uvloop, `--client-procs 2`,
20 s at 1,000 events/s, every run delivered every expected frame and closed all sockets 1000):

    sockets  jobs    subs/job  frames/s  p50 ms  p99 ms  max ms  gateway CPU  RSS/conn
    10,000   1,000   10        10,000    5.0     11.0    20.1    0.49 core    39 KB
    10,000   1,000   10        10,000    5.4     41.2    59.1    0.52 core    39 KB
    10,000   1,000   10        10,000    5.7     25.3    34.3    0.57 core    39 KB
    10,000   10,000  1         1,000     3.6      6.5    15.1    0.39 core    40 KB

Gateway RSS: 71 MB idle, 454 MB with 10,000 sockets. Before `tune_gc()` (app.py) full
collections over the ~millions of per-connection objects paused the loop for 0.2-0.8 s and p99
was 0.36-1.2 s; with a full-library client (websockets) instead of the minimal one below, the
clients took the CPU the gateway needed and p99 was 0.9 s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# --- client process ------------------------------------------------------------------------------


async def client_main(args: argparse.Namespace) -> None:
    """Open this process's share of sockets, record latencies until every socket is closed.

    A minimal RFC 6455 client (handshake, unmasked server frames, masked pongs) instead of a
    full library: the clients share the 2 cores with the gateway and the broker, and every
    cycle they spend parsing is a cycle taken from the system under test."""
    raise_fd_limit()
    plan: list[tuple[str, str]] = json.loads(Path(args.plan).read_text())
    latencies: list[float] = []
    frames = 0
    closes: dict[int, int] = {}
    connected = 0
    gate = asyncio.Semaphore(100)
    all_connected = asyncio.Event()

    async def one(job_id: str, token: str) -> None:
        nonlocal frames, connected
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                (
                    f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                raise RuntimeError(f"handshake refused: {head[:80]!r}")
            writer.write(_client_frame(0x1, json.dumps({"token": token, "after_seq": 0}).encode()))
        connected += 1
        if connected == len(plan):
            all_connected.set()
        code = 1006
        try:
            while True:
                b0, b1 = await reader.readexactly(2)
                length = b1 & 0x7F
                if length == 126:
                    length = int.from_bytes(await reader.readexactly(2), "big")
                elif length == 127:
                    length = int.from_bytes(await reader.readexactly(8), "big")
                payload = await reader.readexactly(length)
                opcode = b0 & 0x0F
                if opcode == 0x1:
                    now = time.time()
                    frames += 1
                    if b'"type":"progress"' in payload:
                        at = payload.index(b'"ts":"') + 6
                        stamp = payload[at : payload.index(b'"', at)].decode()
                        latencies.append(now - datetime.fromisoformat(stamp).timestamp())
                elif opcode == 0x9:
                    writer.write(_client_frame(0xA, payload))
                elif opcode == 0x8:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    writer.write(_client_frame(0x8, payload[:2]))
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()
        closes[code] = closes.get(code, 0) + 1

    tasks = [asyncio.create_task(one(job_id, token)) for job_id, token in plan]
    await asyncio.wait_for(all_connected.wait(), args.connect_timeout)
    print("connected", flush=True)
    done, pending = await asyncio.wait(tasks, timeout=args.duration + 120)
    for task in pending:
        task.cancel()
    errors = [repr(t.exception()) for t in done if t.exception() is not None][:3]
    Path(args.out).write_text(
        json.dumps(
            {
                "latencies": latencies,
                "frames": frames,
                "closes": closes,
                "errors": errors,
                "unfinished": len(pending),
            }
        )
    )


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (payloads here are always < 64 KiB)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    if len(payload) < 126:
        header = bytes([0x80 | opcode, 0x80 | len(payload)])
    else:
        header = bytes([0x80 | opcode, 0x80 | 126]) + len(payload).to_bytes(2, "big")
    return header + mask + masked


# --- publisher -----------------------------------------------------------------------------------


async def publish(amqp_url: str, jobs: list[str], rate: int, duration: float) -> tuple[int, float]:
    """`rate` progress events/s round-robin over the jobs, then one `completed` per job.

    Each event's ts is taken just before its publish: receipt time - ts is the latency."""
    import aio_pika

    from facefleet.wire import EVENTS_EXCHANGE, EventPayload, JobEvent, event_routing_key, utcnow
    from producer.aio import event_message

    conn = await aio_pika.connect(amqp_url)
    channel = await conn.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
    seq = dict.fromkeys(jobs, 1)
    sent = 0
    tick = 0.01
    per_tick = rate * tick
    start = time.monotonic()
    owed = 0.0
    pending: set[asyncio.Future[Any]] = set()
    index = 0
    while (elapsed := time.monotonic() - start) < duration:
        owed += per_tick
        while owed >= 1:
            owed -= 1
            job = jobs[index % len(jobs)]
            index += 1
            seq[job] += 1
            event = JobEvent(
                job_id=job,
                seq=seq[job],
                type="progress",
                ts=utcnow(),
                payload=EventPayload(fraction=min(1.0, elapsed / duration), stage="bench"),
            )
            fut = asyncio.ensure_future(
                exchange.publish(
                    event_message(event), event_routing_key(job, "progress"), mandatory=False
                )
            )
            pending.add(fut)
            fut.add_done_callback(pending.discard)
            sent += 1
        next_at = start + (int(elapsed / tick) + 1) * tick
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if len(pending) > 5000:
            await asyncio.gather(*list(pending))
    await asyncio.gather(*list(pending))
    actual = time.monotonic() - start
    for job in jobs:
        seq[job] += 1
        done = JobEvent(job_id=job, seq=seq[job], type="completed", ts=utcnow())
        await exchange.publish(
            event_message(done), event_routing_key(job, "completed"), mandatory=False
        )
    await conn.close()
    return sent, actual


# --- driver --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=1_000)
    parser.add_argument("--rate", type=int, default=1_000, help="events per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of publishing")
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--connect-timeout", type=float, default=180.0)
    parser.add_argument("--keep", action="store_true", help="keep the work dir (gateway log)")
    parser.add_argument(
        "--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    )
    parser.add_argument(
        "--role", choices=["driver", "client"], default="driver", help=argparse.SUPPRESS
    )
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "client":
        import uvloop

        uvloop.run(client_main(args))
        return 0
    if not (1 <= args.sockets <= 20_000 and 1 <= args.jobs <= args.sockets and args.rate <= 5_000):
        parser.error("bounded: sockets 1..20000, jobs 1..sockets, rate <= 5000")
    if args.duration > 120:
        parser.error("bounded: duration <= 120 s")
    return drive(args)


def drive(args: argparse.Namespace) -> int:
    from facefleet.journal import JobJournal
    from facefleet.storage import Storage
    from facefleet.wire import EventPayload
    from producer.gateway.auth import TokenSigner

    fd_limit = raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="facefleet-bench-"))
    data = work / "data"
    secret = secrets.token_hex(32)
    port = free_port()
    tier = "bench" + uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEFLEET_")}
    env.update(
        AMQP_URL=args.amqp_url,
        FACEFLEET_DATA_ROOT=str(data),
        FACEFLEET_TIERS=json.dumps([{"name": tier}]),
        FACEFLEET_DEFAULT_TIER=tier,
        FACEFLEET_API_KEYS="bench",
        FACEFLEET_TOKEN_SECRET=secret,
        FACEFLEET_LOG_LEVEL="WARNING",
    )
    gateway_log = open(work / "gateway.log", "wb")  # noqa: SIM115
    gateway = subprocess.Popen(
        [sys.executable, "-m", "facefleet.cli", "gateway", "--port", str(port)],
        env=env,
        stdout=gateway_log,
        stderr=subprocess.STDOUT,
        preexec_fn=raise_fd_limit,
    )
    clients: list[subprocess.Popen[bytes]] = []
    try:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise SystemExit("gateway did not become ready:\n" + (work / "gateway.log").read_text())
        storage = Storage(data)
        signer = TokenSigner(secret, 3600)
        jobs = [str(uuid.uuid4()) for _ in range(args.jobs)]
        for job in jobs:
            JobJournal(storage, job, fsync=False).append(
                "queued", EventPayload(tier=tier), lambda e: None
            )
        plans: list[list[tuple[str, str]]] = [[] for _ in range(args.client_procs)]
        for i in range(args.sockets):
            job = jobs[i % len(jobs)]
            plans[i % args.client_procs].append((job, signer.issue(job)))
        time.sleep(1.0)
        baseline = rss_bytes(gateway.pid)
        outs = []
        t0 = time.monotonic()
        for i, plan in enumerate(plans):
            plan_path, out = work / f"plan-{i}.json", work / f"out-{i}.json"
            plan_path.write_text(json.dumps(plan))
            outs.append(out)
            clients.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--role",
                        "client",
                        "--plan",
                        str(plan_path),
                        "--out",
                        str(out),
                        "--port",
                        str(port),
                        "--duration",
                        str(args.duration),
                        "--connect-timeout",
                        str(args.connect_timeout),
                    ],
                    stdout=subprocess.PIPE,
                    preexec_fn=raise_fd_limit,
                )
            )
        for proc in clients:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode().strip()
            if line != "connected":
                raise SystemExit(f"a client failed to connect its sockets (got {line!r})")
        connect_s = time.monotonic() - t0
        time.sleep(2.0)  # every session past its history load
        loaded = rss_bytes(gateway.pid)
        gauge = _metric(port, "facefleet_gateway_ws_connections")
        print(
            f"connected {args.sockets} sockets in {connect_s:.1f}s; gateway reports {gauge:.0f}",
            flush=True,
        )
        cpu0 = _cpu_s(gateway.pid)
        sent, actual_s = asyncio.run(publish(args.amqp_url, jobs, args.rate, args.duration))
        cpu1 = _cpu_s(gateway.pid)
        clients_cpu = sum(_cpu_s(proc.pid) for proc in clients)
        lag = _histogram(port, "facefleet_gateway_event_lag_seconds")
        for proc in clients:
            proc.wait(args.duration + 180)
        results = [json.loads(out.read_text()) for out in outs]
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(20)
        except subprocess.TimeoutExpired:
            gateway.kill()
        _delete_queue(args.amqp_url, tier)
    latencies = [x for r in results for x in r["latencies"]]
    frames = sum(r["frames"] for r in results)
    closes: dict[str, int] = {}
    for r in results:
        for code, n in r["closes"].items():
            closes[code] = closes.get(code, 0) + n
    subs_per_job = args.sockets / args.jobs
    expected = int((sent + 2 * args.jobs) * subs_per_job)  # progress + queued + completed
    report = {
        "sockets": args.sockets,
        "jobs": args.jobs,
        "subscribers_per_job": subs_per_job,
        "events_published": sent,
        "publish_rate_per_s": round(sent / actual_s, 1),
        "frames_delivered": frames,
        "frames_expected": expected,
        "fanout_frames_per_s": round(sent * subs_per_job / actual_s, 1),
        "latency_ms": {
            "p50": round(percentile(latencies, 50) * 1000, 1),
            "p99": round(percentile(latencies, 99) * 1000, 1),
            "max": round(max(latencies) * 1000, 1) if latencies else None,
            "mean": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
        },
        "gateway_rss_mb": {
            "idle": round(baseline / 2**20, 1),
            "connected": round(loaded / 2**20, 1),
        },
        "memory_per_connection_kb": round((loaded - baseline) / args.sockets / 1024, 1),
        "gateway_cpu_during_publish": round((cpu1 - cpu0) / actual_s, 2),
        "client_procs_cpu_total_s": round(clients_cpu, 1),
        "stream_to_gateway_lag_ms": {q: round(_quantile(lag, q) * 1000, 1) for q in ("p50", "p99")},
        "close_codes": closes,
        "client_errors": [e for r in results for e in r["errors"]][:3],
        "fd_limit": fd_limit,
    }
    print(json.dumps(report, indent=2))
    if args.keep:
        print(f"kept {work} (gateway.log, plans, per-client results)")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if frames == expected else 1


def _metric(port: int, name: str) -> float:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
    )


def _histogram(port: int, name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) buckets of a Prometheus histogram."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    return out


def _quantile(buckets: list[tuple[float, float]], q: str) -> float:
    """Upper bound of the bucket holding quantile q ("p50"): a bound, not an estimate."""
    total = buckets[-1][1] if buckets else 0
    want = total * int(q[1:]) / 100
    for le, count in buckets:
        if count >= want:
            return le
    return float("nan")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _delete_queue(amqp_url: str, tier: str) -> None:
    import pika

    from facefleet.wire import dead_notify_queue, job_queue

    try:
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        ch = conn.channel()
        for name in (job_queue(tier), dead_notify_queue(tier)):
            ch.queue_delete(name)
        conn.close()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
