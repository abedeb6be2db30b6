"""Per-API-key listing, usage and limits through real gateway processes, a real broker and a
real sleep worker, on both job stores: the workers' journals (the gateway on the same data
root) and PostgreSQL (FACEFLEET_STORE_URL for worker and gateway; the gateway has no data
root at all).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from facefleet.broker import Broker
from facefleet.producer.gateway.auth import key_id
from tests.conftest import Env, Worker, delete_tier_queues, free_port
from tests.gateway.conftest import API_KEY, SECRET, Gateway, GatewayWorld, png

pytestmark = pytest.mark.integration

OTHER_KEY = "other-key"  # the worlds' gateways accept it beside API_KEY


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class KeyWorld(GatewayWorld):
    worker: Worker | None = None

    def worker_metric(self, line_start: str) -> float:
        assert self.worker is not None
        status, text = self.worker.get("/metrics")
        assert status == 200
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(line_start)
        )


@pytest.fixture(
    scope="module",
    params=["file", pytest.param("postgres", marks=pytest.mark.integration)],
)
def kworld(
    request: pytest.FixtureRequest, broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KeyWorld]:
    """A gateway world (tests/gateway/conftest.py: a tier with a sleep worker, an idle tier
    without workers) whose job store is the data root's journals or a PostgreSQL database."""
    store_url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    tier = "gk" + uuid.uuid4().hex[:10]
    full = "gkfull" + uuid.uuid4().hex[:8]
    idle = "gkidle" + uuid.uuid4().hex[:8]
    root = tmp_path_factory.mktemp("gateway-keys") / "data"
    root.mkdir()
    tiers = [
        {"name": tier, "max_job_s": 60},
        {"name": full, "max_job_s": 60, "max_length": 1},
        {"name": idle, "max_job_s": 60},
    ]
    env = Env(broker.url, tier, root, tiers, store_url=store_url)
    world = KeyWorld(env, full, idle)
    world.worker = env.start_worker()
    try:
        yield world
    finally:
        for gw in world.gateways:
            gw.stop()
        env.stop_all()
        for name in (tier, full, idle):
            delete_tier_queues(broker.url, name)


def start(world: GatewayWorld, **extra: Any) -> Gateway:
    """A gateway of the world; on postgres its data root names nothing (it needs none)."""
    if world.env.store_url:
        extra.setdefault("FACEFLEET_DATA_ROOT", str(world.env.data_root / "no-such-dir"))
    return world.start_gateway(**extra)


@pytest.fixture(scope="module")
def kgateway(kworld: GatewayWorld) -> Gateway:
    return start(kworld)


def submit(
    gw: Gateway,
    key: str,
    tier: str,
    *,
    sleep_s: float = 0.2,
    idempotency_key: str | None = None,
    expect: int | None = 202,
) -> httpx.Response:
    data = {"options": json.dumps({"sleep_s": sleep_s, "steps": 2}), "tier": tier}
    headers = auth(key)
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    with gw.http() as client:
        resp = client.post(
            "/v1/jobs",
            headers=headers,
            files={
                "source": ("a.png", png(), "image/png"),
                "target": ("b.png", png(rgb=(1, 2, 3)), "image/png"),
            },
            data=data,
        )
    if expect is not None:
        assert resp.status_code == expect, resp.text
    return resp


def listing(gw: Gateway, key: str, **params: Any) -> dict[str, Any]:
    with gw.http() as client:
        resp = client.get("/v1/jobs", headers=auth(key), params=params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def all_jobs(gw: Gateway, key: str, limit: int, **params: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        page = listing(gw, key, limit=limit, **({"cursor": cursor} if cursor else {}), **params)
        assert len(page["jobs"]) <= limit
        rows += page["jobs"]
        cursor = page["next_cursor"]
        if cursor is None:
            return rows
    raise AssertionError("pagination never ended")


def wait_state(gw: Gateway, key: str, job_id: str, state: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        rows = {r["job_id"]: r for r in listing(gw, key, limit=1000)["jobs"]}
        seen = rows.get(job_id, {}).get("state")
        if seen == state:
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {seen}, never {state}")


# --- listing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status_for_owner"),
    [
        pytest.param("GET", "", 200, id="state"),
        pytest.param("GET", "/result", 409, id="result"),
        pytest.param("POST", "/token", 200, id="token"),
        pytest.param("POST", "/cancel", 202, id="cancel"),
    ],
)
def test_another_key_cannot_see_or_touch_a_job(
    kworld: GatewayWorld, kgateway: Gateway, method: str, path: str, status_for_owner: int
) -> None:
    """A job belongs to the key that submitted it: every per-job endpoint answers another key
    404 (as for no job at all), and the owner as usual."""
    job_id = submit(kgateway, API_KEY, kworld.idle_tier).json()["job_id"]
    with kgateway.http() as client:
        theirs = client.request(
            method, f"/v1/jobs/{job_id}{path}", headers={"Authorization": f"Bearer {OTHER_KEY}"}
        )
        mine = client.request(
            method, f"/v1/jobs/{job_id}{path}", headers={"Authorization": f"Bearer {API_KEY}"}
        )
    assert theirs.status_code == 404, theirs.text
    assert mine.status_code == status_for_owner, mine.text


def test_an_idempotency_key_is_scoped_to_its_api_key(
    kworld: GatewayWorld, kgateway: Gateway
) -> None:
    """Two keys that both say `order-1` get two jobs (neither can reach the other's job by
    guessing its idempotency key); the same key saying it again gets its own job back."""
    idem = "order-" + uuid.uuid4().hex
    mine = submit(kgateway, API_KEY, kworld.idle_tier, idempotency_key=idem).json()
    theirs = submit(kgateway, OTHER_KEY, kworld.idle_tier, idempotency_key=idem).json()
    assert (mine["duplicate"], theirs["duplicate"]) == (False, False)
    assert mine["job_id"] != theirs["job_id"]
    again = submit(kgateway, API_KEY, kworld.idle_tier, idempotency_key=idem, expect=200).json()
    assert (again["job_id"], again["duplicate"]) == (mine["job_id"], True)


def test_a_key_lists_its_own_jobs_only_and_sees_them_queued_at_once(
    kworld: GatewayWorld, kgateway: Gateway
) -> None:
    """Jobs on a tier no worker consumes are listed right after their submit (the gateway
    recorded them); another key sees none of them."""
    mine = [submit(kgateway, API_KEY, kworld.idle_tier).json()["job_id"] for _ in range(2)]
    theirs = submit(kgateway, OTHER_KEY, kworld.idle_tier).json()["job_id"]
    rows = {r["job_id"]: r for r in all_jobs(kgateway, API_KEY, 1000)}
    for job_id in mine:
        assert rows[job_id]["state"] == "queued"
        assert rows[job_id]["tier"] == kworld.idle_tier
        assert rows[job_id]["finished_at"] is None and rows[job_id]["error_code"] is None
    assert theirs not in rows
    other = {r["job_id"] for r in all_jobs(kgateway, OTHER_KEY, 1000)}
    assert theirs in other and not other & set(mine)
    # filters: state and tier, still only the caller's
    queued = {r["job_id"] for r in all_jobs(kgateway, API_KEY, 1000, state="queued")}
    assert set(mine) <= queued and theirs not in queued
    idle = all_jobs(kgateway, API_KEY, 1000, tier=kworld.idle_tier)
    assert {r["tier"] for r in idle} == {kworld.idle_tier}
    assert all_jobs(kgateway, API_KEY, 1000, tier="no-such-tier") == []


def test_listing_pages_with_a_cursor_newest_first(kworld: GatewayWorld, kgateway: Gateway) -> None:
    for _ in range(5):
        submit(kgateway, API_KEY, kworld.idle_tier)
    everything = listing(kgateway, API_KEY, limit=1000)["jobs"]
    assert listing(kgateway, API_KEY, limit=1000)["next_cursor"] is None
    paged = all_jobs(kgateway, API_KEY, 2)
    assert [r["job_id"] for r in paged] == [r["job_id"] for r in everything]
    assert len(everything) >= 5 and len({r["job_id"] for r in paged}) == len(paged)
    stamps = [datetime.fromisoformat(r["created_at"]) for r in everything]
    assert stamps == sorted(stamps, reverse=True)
    # since: the jobs created at or after it
    cut = stamps[2]
    since = [r["job_id"] for r in listing(kgateway, API_KEY, since=cut.isoformat())["jobs"]]
    assert since == [
        r["job_id"] for r in everything if datetime.fromisoformat(r["created_at"]) >= cut
    ]


# --- usage ------------------------------------------------------------------------------------


def test_usage_counts_a_completed_job_and_its_gpu_seconds(
    kworld: KeyWorld, kgateway: Gateway
) -> None:
    key = "usage-" + uuid.uuid4().hex
    gw = start(kworld, FACEFLEET_API_KEYS=f"{key},{API_KEY}")
    started = datetime.now(UTC) - timedelta(seconds=1)
    job_id = submit(gw, key, kworld.env.tier, sleep_s=0.4).json()["job_id"]
    wait_state(gw, key, job_id, "completed")
    with gw.http() as client:
        usage = client.get("/v1/usage", headers=auth(key)).json()
        recent = client.get(
            "/v1/usage", headers=auth(key), params={"since": started.isoformat()}
        ).json()
        future = client.get(
            "/v1/usage", headers=auth(key), params={"since": "2999-01-01T00:00:00Z"}
        ).json()
        other = client.get("/v1/usage", headers=auth(API_KEY)).json()
    assert usage["api_key_id"] == key_id(key) and usage["since"] is None
    assert usage["jobs"]["completed"] == 1 and usage["total"] == 1
    assert usage["jobs"]["failed"] == 0 and usage["jobs"]["queued"] == 0
    assert 0.3 < usage["gpu_seconds"] < 30  # the sleep processor ran 0.4 s
    assert recent["jobs"]["completed"] == 1 and recent["gpu_seconds"] == usage["gpu_seconds"]
    assert datetime.fromisoformat(recent["since"]) == started
    assert future["total"] == 0 and future["gpu_seconds"] == 0
    assert other["api_key_id"] == key_id(API_KEY) and other["total"] >= 0
    row = next(r for r in listing(gw, key)["jobs"] if r["job_id"] == job_id)
    assert row["gpu_seconds"] == usage["gpu_seconds"] and row["finished_at"] is not None
    assert usage["limits"] == {"active": None, "per_minute": None}
    # the worker's Prometheus counters, labelled by the key's id
    owner, tier = f'api_key_id="{key_id(key)}"', f'tier="{kworld.env.tier}"'
    gpu = kworld.worker_metric(f"facefleet_gpu_seconds_total{{{owner},{tier}}}")
    assert gpu == pytest.approx(usage["gpu_seconds"], abs=1e-3)
    ended = kworld.worker_metric(f'facefleet_key_jobs_total{{{owner},outcome="completed",{tier}}}')
    assert ended == 1


# --- limits -----------------------------------------------------------------------------------


def test_the_active_limit_refuses_with_429_and_retry_after(kworld: GatewayWorld) -> None:
    key = "active-" + uuid.uuid4().hex
    gw = start(
        kworld,
        FACEFLEET_API_KEYS=f"{key},{API_KEY}",
        FACEFLEET_KEY_LIMITS=json.dumps({key_id(key): {"active": 2}}),
        FACEFLEET_RETRY_AFTER_S="7",
    )
    submit(gw, key, kworld.idle_tier)
    submit(gw, key, kworld.idle_tier)
    refused = submit(gw, key, kworld.idle_tier, expect=429)
    assert refused.headers["Retry-After"] == "7"
    body = refused.json()
    assert (body["limit"], body["allowed"], body["current"]) == ("active", 2, 2)
    assert body["api_key_id"] == key_id(key) and "queued or running" in body["detail"]
    # another key is not limited
    submit(gw, API_KEY, kworld.idle_tier)
    with gw.http() as client:
        usage = client.get("/v1/usage", headers=auth(key)).json()
    assert usage["limits"] == {"active": 2, "per_minute": None}
    assert usage["jobs"]["queued"] == 2
    mine = f'facefleet_gateway_submits_total{{api_key_id="{key_id(key)}"'
    assert gw.metric(mine + ',outcome="queued"}') == 2
    assert gw.metric(mine + ',outcome="limit_active"}') == 1


def test_a_resubmission_over_the_limit_returns_the_existing_job(kworld: GatewayWorld) -> None:
    key = "dup-" + uuid.uuid4().hex
    gw = start(kworld, FACEFLEET_API_KEYS=key, FACEFLEET_KEY_MAX_ACTIVE="1")
    idem = "dup-" + uuid.uuid4().hex
    first = submit(gw, key, kworld.idle_tier, idempotency_key=idem)
    assert submit(gw, key, kworld.idle_tier, expect=429).json()["limit"] == "active"
    again = submit(gw, key, kworld.idle_tier, idempotency_key=idem, expect=200)
    assert again.json()["duplicate"] is True
    assert again.json()["job_id"] == first.json()["job_id"]


def test_the_per_minute_limit_refuses_with_429_until_the_window_moves(
    kworld: GatewayWorld,
) -> None:
    key = "rate-" + uuid.uuid4().hex
    gw = start(kworld, FACEFLEET_API_KEYS=key, FACEFLEET_KEY_MAX_PER_MINUTE="2")
    t0 = time.monotonic()
    submit(gw, key, kworld.env.tier, sleep_s=0.05)
    submit(gw, key, kworld.env.tier, sleep_s=0.05)
    refused = submit(gw, key, kworld.env.tier, expect=429)
    elapsed = time.monotonic() - t0
    body = refused.json()
    assert (body["limit"], body["allowed"]) == ("per_minute", 2)
    assert "in the last minute" in body["detail"]
    retry = int(refused.headers["Retry-After"])
    # the oldest of the two leaves the window 60 s after its creation
    assert 60 - elapsed - 2 <= retry <= 60


# --- bad requests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "word"),
    [
        ("/v1/jobs", {"state": "bogus"}, "state"),
        ("/v1/jobs", {"limit": "0"}, "limit"),
        ("/v1/jobs", {"limit": "1001"}, "limit"),
        ("/v1/jobs", {"limit": "ten"}, "limit"),
        ("/v1/jobs", {"cursor": "not a cursor!"}, "cursor"),
        ("/v1/jobs", {"since": "yesterday"}, "since"),
        ("/v1/jobs", {"since": "2026-01-01T00:00:00"}, "time zone"),
        ("/v1/jobs", {"tier": "Not A Tier"}, "tier"),
        ("/v1/jobs", {"stat": "failed"}, "unknown query"),
        ("/v1/usage", {"since": "last week"}, "since"),
    ],
)
def test_bad_query_parameters_are_400(
    kgateway: Gateway, path: str, params: dict[str, str], word: str
) -> None:
    with kgateway.http() as client:
        resp = client.get(path, headers=auth(API_KEY), params=params)
    assert resp.status_code == 400, resp.text
    assert word in resp.json()["detail"]


def test_listing_and_usage_need_an_api_key(kgateway: Gateway) -> None:
    with kgateway.http() as client:
        for path in ("/v1/jobs", "/v1/usage"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers=auth("wrong")).status_code == 403


def test_limits_without_a_job_store_stop_the_gateway(kworld: GatewayWorld) -> None:
    env = kworld.env.vars(
        FACEFLEET_API_KEYS=API_KEY,
        FACEFLEET_TOKEN_SECRET=SECRET,
        FACEFLEET_KEY_MAX_ACTIVE="3",
        FACEFLEET_DATA_ROOT=str(kworld.env.data_root / "absent"),
        # media on the workers' volume, named on its own (by default it is the data root)
        FACEFLEET_MEDIA_URL=kworld.env.data_root.resolve().as_uri(),
    )
    env.pop("FACEFLEET_STORE_URL", None)
    out = subprocess.run(
        [sys.executable, "-m", "facefleet.cli", "gateway", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "FACEFLEET_STORE_URL" in out.stderr and "limits" in out.stderr
    assert not (kworld.env.data_root / "absent").exists()


def test_a_gateway_without_a_job_store_answers_503_and_creates_no_data_root(
    kworld: GatewayWorld,
) -> None:
    if kworld.env.store_url:
        pytest.skip("the postgres world's gateways always have a store")
    nowhere = kworld.env.data_root / "nowhere"
    gw = kworld.start_gateway(
        FACEFLEET_DATA_ROOT=str(nowhere),
        FACEFLEET_MEDIA_URL=kworld.env.data_root.resolve().as_uri(),
    )
    job = submit(gw, API_KEY, kworld.env.tier, sleep_s=0.05).json()  # submits still work
    with gw.http() as client:
        for path in ("/v1/jobs", "/v1/usage"):
            resp = client.get(path, headers=auth(API_KEY))
            assert resp.status_code == 503 and "FACEFLEET_STORE_URL" in resp.json()["detail"]
    assert job["job_id"] and not nowhere.exists()
    gw.stop()
