"""The job store goes away mid-load and comes back: workers pause, give their jobs back, resume;
nothing is lost, nothing completes twice, no job is dead-lettered for it.

The workers reach the real PostgreSQL through a loopback TCP proxy (tests/spine/tcpproxy.py):
`down()` drops every connection (the server sees the sessions end, so the workers' claims are
freed, as on a restart or a lost node) and resets new ones until `up()`, which is what a
PostgreSQL restart looks like from a worker, without restarting the machine's server under the
rest of the suite. The test reads job state over a direct connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import pytest

from facefleet.producer.sdk import JobClient
from facefleet.settings import ProducerSettings
from tests.conftest import Env
from tests.spine.tcpproxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOBS = 24
OUTAGE_S = 6.0


def via(proxy: TcpProxy, url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def test_workers_pause_while_the_job_store_is_down_and_lose_nothing(
    make_env: Callable[..., Env], pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = urlsplit(pg_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    try:
        env = make_env(store_url=pg_url)
        workers = [
            env.start_worker(FACEFLEET_STORE_URL=via(proxy, pg_url), FACEFLEET_CONCURRENCY="2")
            for _ in range(2)
        ]
        env.settings_env(monkeypatch)
        client = JobClient(ProducerSettings.load())
        client.apply_topology()
        src = env.data_root / "in.txt"
        src.write_text("x")
        jobs = [
            client.submit(env.tier, str(src), str(src), options={"sleep_s": 0.4}).job_id
            for _ in range(JOBS)
        ]
        deadline = time.monotonic() + 60
        while sum(1 for j in jobs if env.events(j)[-1:] and env.events(j)[-1].terminal) < 4:
            assert time.monotonic() < deadline, "no job finished before the outage"
            time.sleep(0.2)

        proxy.down()
        down_at = time.monotonic()
        paused = set()
        while time.monotonic() - down_at < OUTAGE_S:
            for i, worker in enumerate(workers):
                status, body = worker.get("/readyz")
                if status == 503 and "job store unavailable" in body:
                    paused.add(i)
            time.sleep(0.25)
        proxy.up()
        assert paused == {0, 1}, "every worker should report the outage on /readyz"

        deadline = time.monotonic() + 120
        while True:
            histories = {j: env.events(j) for j in jobs}
            if all(h and h[-1].terminal for h in histories.values()):
                break
            assert time.monotonic() < deadline, {
                j: [e.type for e in h][-3:]
                for j, h in histories.items()
                if not h or not h[-1].terminal
            }
            time.sleep(0.3)
        for job, events in histories.items():
            types = [e.type for e in events if e.type != "progress"]
            assert [e.seq for e in events] == list(range(1, len(events) + 1)), job
            assert types[0] == "queued" and types[-1] == "completed", (job, types)
            assert types.count("completed") == 1, (job, types)
            assert "dead_lettered" not in types and "failed" not in types, (job, types)
        for worker in workers:
            assert worker.get("/readyz")[0] == 200
        print(f"\n{JOBS} jobs, store down {OUTAGE_S:.0f} s: every job completed exactly once")
    finally:
        proxy.close()
