"""The progress gateway against a real broker, a real sleep worker and real uvicorn processes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from facefleet.amqp import publish_event
from facefleet.wire import EventPayload, JobEvent, utcnow
from producer.gateway.auth import TokenSigner
from tests.conftest import free_port
from tests.gateway.conftest import (
    API_KEY,
    SECRET,
    Gateway,
    GatewayWorld,
    png,
    read_events,
    seqs,
)

pytestmark = pytest.mark.integration


def wait_for_seq(world: GatewayWorld, job_id: str, seq: int, timeout_s: float = 30) -> None:
    """Block until the job's journal holds `seq` (the worker got that far)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if len(world.journal(job_id)) >= seq:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached seq {seq}")


def assert_complete(frames: list[dict[str, Any]], journal: list[dict[str, Any]]) -> None:
    """Exactly the journal, in order: seq 1..n, no gap, no duplicate, ending in completed."""
    assert seqs(frames) == list(range(1, len(journal) + 1))
    assert [f["type"] for f in frames] == [e["type"] for e in journal]
    assert frames[0]["type"] == "queued"
    assert frames[-1]["type"] == "completed"


# --- follow a job --------------------------------------------------------------------------------


def test_events_arrive_in_order_then_close_after_terminal(
    world: GatewayWorld, gateway: Gateway
) -> None:
    job = world.submit(gateway, sleep_s=1.0, steps=5)
    frames, code, reason = read_events(gateway.ws_url(job["job_id"], token=job["token"]))
    assert_complete(frames, world.journal(job["job_id"]))
    assert "progress" in [f["type"] for f in frames]
    assert (code, reason) == (1000, "job ended")


def test_state_and_result_over_http(world: GatewayWorld, gateway: Gateway) -> None:
    job = world.submit(gateway, sleep_s=0.2, steps=2)
    read_events(gateway.ws_url(job["job_id"], token=job["token"]))
    auth = {"Authorization": f"Bearer {job['token']}"}
    with gateway.http() as client:
        state = client.get(f"/v1/jobs/{job['job_id']}", headers=auth).json()
        result = client.get(f"/v1/jobs/{job['job_id']}/result", headers=auth)
        by_key = client.get(
            f"/v1/jobs/{job['job_id']}", headers={"Authorization": f"Bearer {API_KEY}"}
        )
    assert state["state"] == "completed"
    assert state["progress"] == 1.0
    assert state["seq"] == len(world.journal(job["job_id"]))
    assert result.status_code == 200
    assert result.json()["job_id"] == job["job_id"]
    assert by_key.status_code == 200


def test_result_before_completion_is_409(world: GatewayWorld, gateway: Gateway) -> None:
    job = world.submit(gateway, sleep_s=3.0, steps=3)
    with gateway.http() as client:
        resp = client.get(
            f"/v1/jobs/{job['job_id']}/result", headers={"Authorization": f"Bearer {job['token']}"}
        )
    assert resp.status_code == 409
    read_events(gateway.ws_url(job["job_id"], token=job["token"]))


def test_reconnect_with_after_seq_misses_nothing(world: GatewayWorld, gateway: Gateway) -> None:
    job = world.submit(gateway, sleep_s=2.0, steps=8)
    url = gateway.ws_url(job["job_id"], token=job["token"])
    first, code, _ = read_events(url, limit=3)
    assert code is None  # we hung up, the gateway did not
    rest, code, _ = read_events(
        gateway.ws_url(job["job_id"], token=job["token"], after_seq=seqs(first)[-1])
    )
    assert code == 1000
    assert_complete(first + rest, world.journal(job["job_id"]))


def test_token_in_first_message_and_after_seq_there(world: GatewayWorld, gateway: Gateway) -> None:
    job = world.submit(gateway, sleep_s=0.2, steps=2)
    read_events(gateway.ws_url(job["job_id"], token=job["token"]))  # let it finish
    frames, code, _ = read_events(
        gateway.ws_url(job["job_id"]), first={"token": job["token"], "after_seq": 2}
    )
    assert code == 1000
    assert seqs(frames) == list(range(3, len(world.journal(job["job_id"])) + 1))


# --- tokens --------------------------------------------------------------------------------------


def _tokens(job: dict[str, Any], other: dict[str, Any]) -> dict[str, str | None]:
    signer = TokenSigner(SECRET, 3600)
    sig = job["token"].rsplit(".", 1)
    forged_sig = sig[0] + "." + ("A" if sig[1][0] != "A" else "B") + sig[1][1:]
    job_id = job["job_id"]
    return {
        "missing": None,
        "forged-signature": forged_sig,
        "other-secret": TokenSigner("x" * 40, 3600).issue(job_id),
        "expired": signer.issue(job_id, now=time.time() - 7200),
        "another-job": other["token"],
        "api-key-is-not-a-job-token": API_KEY,
    }


@pytest.mark.parametrize(
    ("case", "http_status"),
    [
        pytest.param("missing", 401, id="missing"),
        pytest.param("forged-signature", 403, id="forged-signature"),
        pytest.param("other-secret", 403, id="other-secret"),
        pytest.param("expired", 403, id="expired"),
        pytest.param("another-job", 403, id="another-job"),
        # an API key may read a job over HTTP, but the event socket wants the job's token
        pytest.param("api-key-is-not-a-job-token", 200, id="api-key"),
    ],
)
def test_bad_tokens_get_policy_violation_and_no_event(
    world: GatewayWorld, gateway: Gateway, case: str, http_status: int
) -> None:
    job = world.submit(gateway, sleep_s=0.1, steps=1)
    other = world.submit(gateway, sleep_s=0.1, steps=1)
    token = _tokens(job, other)[case]
    params = {"token": token} if token is not None else {}
    frames, code, _ = read_events(gateway.ws_url(job["job_id"], **params), timeout_s=20)
    assert frames == []
    assert code == 1008
    # the same credential over HTTP
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    with gateway.http() as client:
        status = client.get(f"/v1/jobs/{job['job_id']}", headers=headers).status_code
    assert status == http_status


def test_bad_token_in_first_message_is_refused(world: GatewayWorld, gateway: Gateway) -> None:
    job = world.submit(gateway, sleep_s=0.1, steps=1)
    frames, code, _ = read_events(gateway.ws_url(job["job_id"]), first={"token": "a.b.c.d"})
    assert (frames, code) == ([], 1008)


def test_negative_after_seq_is_a_bad_request(world: GatewayWorld, gateway: Gateway) -> None:
    job = world.submit(gateway, sleep_s=0.1, steps=1)
    frames, code, _ = read_events(gateway.ws_url(job["job_id"], token=job["token"], after_seq=-1))
    assert (frames, code) == ([], 4400)


# --- submit refusals -----------------------------------------------------------------------------


def _count_jobs(world: GatewayWorld) -> int:
    jobs = world.env.data_root / "jobs"
    return len(list(jobs.iterdir())) if jobs.exists() else 0


BAD_SUBMITS = [
    pytest.param(
        {"source": ("a.txt", b"hello, not an image", "image/png")}, {}, 415, id="not-media"
    ),
    pytest.param(
        {"source": ("v.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, "video/mp4")},
        {},
        415,
        id="video-as-source",
    ),
    pytest.param({"target": ("e.png", b"", "image/png")}, {}, 400, id="empty-file"),
    pytest.param(
        {"target": ("big.png", png()[:16] + b"\x00" * 5000, "image/png")},
        {},
        413,
        id="over-upload-limit",
    ),
    pytest.param({"target": None}, {}, 400, id="missing-target"),
    pytest.param({}, {"options": "{not json"}, 400, id="options-not-json"),
    pytest.param({}, {"options": '{"a": [1, 2]}'}, 400, id="options-not-scalar"),
    pytest.param({}, {"tier": "nosuchtier"}, 400, id="unknown-tier"),
    pytest.param({}, {"tier": "Bad Tier!"}, 400, id="invalid-tier-name"),
]


@pytest.mark.parametrize(("files", "data", "status"), BAD_SUBMITS)
def test_bad_submissions_are_refused_before_queueing(
    world: GatewayWorld,
    gateway_small: Gateway,
    files: dict[str, Any],
    data: dict[str, str],
    status: int,
) -> None:
    before = _count_jobs(world)
    parts: dict[str, Any] = {
        "source": ("a.png", png(), "image/png"),
        "target": ("b.png", png(), "image/png"),
    }
    parts.update(files)
    with gateway_small.http() as client:
        resp = client.post(
            "/v1/jobs",
            headers={"Authorization": f"Bearer {API_KEY}"},
            files={k: v for k, v in parts.items() if v is not None},
            data={"tier": world.env.tier, **data},
        )
    assert resp.status_code == status, resp.text
    assert resp.json()["detail"]
    assert _count_jobs(world) == before


def test_body_far_over_the_limit_is_413_while_streaming(
    world: GatewayWorld, gateway_small: Gateway
) -> None:
    before = _count_jobs(world)
    with gateway_small.http() as client:
        resp = client.post(
            "/v1/jobs",
            headers={"Authorization": f"Bearer {API_KEY}"},
            files={
                "source": ("a.png", png() + b"\x00" * 3_000_000, "image/png"),
                "target": ("b.png", png(), "image/png"),
            },
        )
    assert resp.status_code == 413
    assert _count_jobs(world) == before


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="no-key"),
        pytest.param({"Authorization": "Bearer wrong"}, 403, id="wrong-key"),
        pytest.param({"Authorization": f"Basic {API_KEY}"}, 401, id="not-bearer"),
    ],
)
def test_submit_needs_an_api_key(
    world: GatewayWorld, gateway: Gateway, headers: dict[str, str], status: int
) -> None:
    before = _count_jobs(world)
    with gateway.http() as client:
        resp = client.post(
            "/v1/jobs",
            headers=headers,
            files={"source": ("a.png", png()), "target": ("b.png", png())},
        )
    assert resp.status_code == status
    assert _count_jobs(world) == before


def test_full_tier_is_429_with_retry_after(world: GatewayWorld, gateway: Gateway) -> None:
    """Quorum queues may overshoot max-length by one, so fill until the broker says no."""
    with gateway.http() as client:
        for _ in range(10):
            resp = client.post(
                "/v1/jobs",
                headers={"Authorization": f"Bearer {API_KEY}"},
                files={"source": ("a.png", png()), "target": ("b.png", png(rgb=(9, 9, 9)))},
                data={"tier": world.full_tier},
            )
            if resp.status_code != 202:
                break
    assert resp.status_code == 429, resp.text
    assert resp.headers["Retry-After"] == "30"
    assert "full" in resp.json()["detail"]


def test_json_submit_with_uris_in_the_data_root(world: GatewayWorld, gateway: Gateway) -> None:
    media = world.env.data_root / "media"
    media.mkdir(exist_ok=True)
    (media / "s.png").write_bytes(png())
    (media / "t.png").write_bytes(png(rgb=(5, 5, 5)))
    body = {
        "source_uri": (media / "s.png").as_uri(),
        "target_uri": (media / "t.png").as_uri(),
        "options": {"sleep_s": 0.1, "steps": 1},
        "idempotency_key": "json-" + uuid.uuid4().hex,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with gateway.http() as client:
        first = client.post("/v1/jobs", headers=headers, json=body)
        again = client.post("/v1/jobs", headers=headers, json=body)
        outside = client.post(
            "/v1/jobs", headers=headers, json={**body, "source_uri": "file:///etc/passwd"}
        )
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert again.json()["job_id"] == first.json()["job_id"]
    assert outside.status_code == 400
    frames, code, _ = read_events(
        gateway.ws_url(first.json()["job_id"], token=again.json()["token"])
    )
    assert code == 1000
    assert frames[-1]["type"] == "completed"


# --- restarts and replicas -----------------------------------------------------------------------


@pytest.mark.parametrize("history", ["journal", "stream"])
def test_gateway_restarted_mid_job_serves_full_history(
    world: GatewayWorld, gateway: Gateway, tmp_path: Path, history: str
) -> None:
    """A gateway killed mid-job and started again serves everything: from the journal when it
    shares the data root, from the durable stream alone when it does not."""
    extra = {"FACEFLEET_DATA_ROOT": str(tmp_path / "empty")} if history == "stream" else {}
    port = free_port()
    replica = world.start_gateway(port=port, **extra)
    job = world.submit(gateway, sleep_s=3.0, steps=6)
    first, _, _ = read_events(replica.ws_url(job["job_id"], token=job["token"]), limit=3)
    replica.stop(signal.SIGKILL)
    wait_for_seq(world, job["job_id"], 5)  # the job moved on while the gateway was down
    restarted = world.start_gateway(port=port, **extra)
    rest, code, _ = read_events(
        restarted.ws_url(job["job_id"], token=job["token"], after_seq=seqs(first)[-1])
    )
    assert code == 1000
    assert_complete(first + rest, world.journal(job["job_id"]))
    everything, _, _ = read_events(restarted.ws_url(job["job_id"], token=job["token"]))
    assert_complete(everything, world.journal(job["job_id"]))
    assert restarted.metric(f'facefleet_gateway_history_loads_total{{source="{history}"}}') >= 2
    restarted.stop()


def test_two_replicas_serve_the_same_job(
    world: GatewayWorld, gateway: Gateway, tmp_path: Path
) -> None:
    other = world.start_gateway(FACEFLEET_DATA_ROOT=str(tmp_path / "elsewhere"))
    job = world.submit(gateway, sleep_s=1.5, steps=5)
    urls = [g.ws_url(job["job_id"], token=job["token"]) for g in (gateway, other)]
    with connect(urls[0]) as a, connect(urls[1]) as b:
        got: list[list[dict[str, Any]]] = [[], []]
        for i, ws in enumerate((a, b)):
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    got[i].append(json.loads(ws.recv(timeout=30)))
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    journal = world.journal(job["job_id"])
    assert_complete(got[0], journal)
    assert got[1] == got[0]
    other.stop()


# --- slow clients ----------------------------------------------------------------------------------


def test_slow_client_is_dropped_with_4008(world: GatewayWorld, amqp_url: str) -> None:
    """A client that stops reading is closed once its bounded queue is full; memory stays flat.

    The job is synthetic (events published straight to the stream, no journal), so thousands of
    large events can outrun the socket buffers quickly."""
    gw = world.start_gateway(FACEFLEET_WS_SEND_QUEUE="4")
    job_id = str(uuid.uuid4())
    token = TokenSigner(SECRET, 600).issue(job_id)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()
    with connect(gw.ws_url(job_id, token=token), sock=sock, max_size=1 << 20) as ws:
        time.sleep(2.5)  # subscribed and past the (empty) history read, so only slowness counts
        blob = "x" * 8000
        for seq in range(1, 1501):
            event = JobEvent(
                job_id=job_id,
                seq=seq,
                type="progress",
                ts=utcnow(),
                payload=EventPayload(fraction=0.0, message=blob),
            )
            publish_event(ch, event)
        received = 0
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=60)
                received += 1
    conn.close()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4008
    assert "after_seq=" in closed.value.rcvd.reason
    assert received < 1500
    assert gw.metric("facefleet_gateway_slow_clients_dropped_total") == 1
    gw.stop()


# --- probes and the CLI ----------------------------------------------------------------------------


def test_probes_and_metrics(world: GatewayWorld, gateway: Gateway) -> None:
    with gateway.http() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
        text = client.get("/metrics").text
        tiers = client.get("/v1/tiers", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert client.get("/v1/tiers").status_code == 401
    for name in ("ws_connections", "events_fanned_out_total", "event_lag_seconds_bucket"):
        assert f"facefleet_gateway_{name}" in text
    mine = {row["tier"]: row for row in tiers["tiers"]}
    assert mine[world.env.tier]["consumers"] >= 1


def test_readyz_is_503_without_a_broker(world: GatewayWorld, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "gw.log"
    env = world.env.vars(
        AMQP_URL="amqp://guest:guest@127.0.0.1:1/%2F",
        FACEFLEET_API_KEYS=API_KEY,
        FACEFLEET_TOKEN_SECRET=SECRET,
    )
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "facefleet.cli", "gateway", "--port", str(port)],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline and status is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code
            except httpx.HTTPError:
                time.sleep(0.2)
        assert status == 503, log.read_text()
    finally:
        proc.terminate()
        proc.wait(15)


def test_gateway_refuses_to_start_without_a_token_secret(world: GatewayWorld) -> None:
    env = world.env.vars(FACEFLEET_API_KEYS=API_KEY)
    out = subprocess.run(
        [sys.executable, "-m", "facefleet.cli", "gateway", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "FACEFLEET_TOKEN_SECRET" in out.stderr


def test_cli_watch_through_the_gateway_prints_the_same_lines(
    world: GatewayWorld, gateway: Gateway
) -> None:
    job = world.submit(gateway, sleep_s=0.5, steps=3)

    def watch(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "facefleet.cli",
                "watch",
                job["job_id"],
                "--json",
                "--timeout",
                "60",
            ],
            env=world.env.vars(**extra),
            capture_output=True,
            text=True,
            timeout=90,
        )

    via_gateway = watch(FACEFLEET_GATEWAY_URL=gateway.url, FACEFLEET_GATEWAY_API_KEY=API_KEY)
    via_amqp = watch()
    assert via_gateway.returncode == 0, via_gateway.stderr
    assert via_amqp.returncode == 0, via_amqp.stderr
    assert via_gateway.stdout == via_amqp.stdout
    lines = [json.loads(line) for line in via_gateway.stdout.splitlines()]
    assert seqs(lines) == list(range(1, len(world.journal(job["job_id"])) + 1))
    refused = watch(FACEFLEET_GATEWAY_URL=gateway.url, FACEFLEET_GATEWAY_API_KEY="wrong")
    assert refused.returncode == 4
    assert "403" in refused.stderr


@pytest.fixture(scope="module")
def gateway_small(world: GatewayWorld) -> Gateway:
    """A gateway with a 4 KB upload limit (413 tests without big bodies)."""
    return world.start_gateway(FACEFLEET_MAX_UPLOAD_BYTES="4096")
