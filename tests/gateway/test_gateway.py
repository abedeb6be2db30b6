"""The progress gateway against a real broker, a real sleep worker and real uvicorn processes."""

from __future__ import annotations

import contextlib
import itertools
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
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.sync.client import connect
from websockets.uri import parse_uri

from facefleet.amqp import publish_event
from facefleet.producer.gateway.auth import TokenSigner
from facefleet.producer.gateway.client import watch_via_gateway
from facefleet.settings import GatewayClientSettings, ProducerSettings
from facefleet.wire import EventPayload, JobEvent, utcnow
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
    assert job["events_url"] == gateway.ws_url(job["job_id"])
    # the advertised URL itself, with the token in the first message as clients should send it
    frames, code, reason = read_events(job["events_url"], first={"token": job["token"]})
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


def test_reconnect_at_or_past_the_final_seq_closes_1000_at_once(
    world: GatewayWorld, gateway: Gateway
) -> None:
    """A client that already has the terminal event (or claims more) gets no frame and a normal
    close, instead of a socket that waits in LIVE forever."""
    job = world.submit(gateway, sleep_s=0.2, steps=2)
    read_events(gateway.ws_url(job["job_id"], token=job["token"]))  # let it finish
    final = len(world.journal(job["job_id"]))
    for after_seq in (final, final + 3):
        frames, code, reason = read_events(
            gateway.ws_url(job["job_id"]),
            first={"token": job["token"], "after_seq": after_seq},
            timeout_s=15,
        )
        assert (frames, code, reason) == ([], 1000, "job ended")
    # the CLI's client takes that close as the end, without reconnecting
    settings = ProducerSettings(gateway_url=gateway.url)
    client = GatewayClientSettings(gateway_token=job["token"], gateway_reconnects=0)
    started = time.monotonic()
    assert list(watch_via_gateway(settings, job["job_id"], after_seq=final, client=client)) == []
    assert time.monotonic() - started < 10


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


def test_gateway_restarted_mid_job_serves_full_history(
    world: GatewayWorld, gateway: Gateway, tmp_path: Path
) -> None:
    """A gateway killed mid-job and started again serves everything, from the durable stream
    alone: its data root is an empty directory of its own (the gateway never reads one)."""
    extra = {"FACEFLEET_DATA_ROOT": str(tmp_path / "empty")}
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
    assert restarted.metric("facefleet_gateway_history_loads_total") >= 2
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


# --- the live path: direct writes and the ASGI fallback --------------------------------------------


def _follow_synthetic_job(gw: Gateway, amqp_url: str, *, clients: int, events: int) -> None:
    """`clients` subscribers of one synthetic job (events published straight to the stream, each
    progress event twice, as a republishing outbox would) get seq 1..events+1 exactly once, in
    order, then close 1000."""
    job_id = str(uuid.uuid4())
    token = TokenSigner(SECRET, 600).issue(job_id)
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(connect(gw.ws_url(job_id, token=token), open_timeout=10))
            for _ in range(clients)
        ]
        deadline = time.monotonic() + 20
        while _subscribers(gw) < clients and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.0)  # past the (empty) stream history read: LIVE and caught up
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        ch = conn.channel()
        ch.confirm_delivery()
        for seq in range(1, events + 2):
            kind = "completed" if seq == events + 1 else "progress"
            event = JobEvent(job_id=job_id, seq=seq, type=kind, ts=utcnow())
            publish_event(ch, event)
            if kind == "progress":
                publish_event(ch, event)  # a duplicate: must not reach anyone twice
        conn.close()
        for ws in sockets:
            got: list[dict[str, Any]] = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    got.append(json.loads(ws.recv(timeout=30)))
            assert seqs(got) == list(range(1, events + 2))
            assert got[-1]["type"] == "completed"
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


def test_caught_up_subscribers_get_live_frames_written_directly(
    world: GatewayWorld, amqp_url: str
) -> None:
    gw = world.start_gateway()
    _follow_synthetic_job(gw, amqp_url, clients=10, events=300)
    direct = gw.metric("facefleet_gateway_direct_frames_total")
    # Everything after the subscribers went LIVE is written directly; duplicates never are.
    assert 0 < direct <= 10 * 301
    assert gw.metric("facefleet_gateway_events_fanned_out_total") == 10 * 301
    gw.stop()


def test_without_direct_writes_every_frame_goes_through_asgi(
    world: GatewayWorld, amqp_url: str
) -> None:
    """`--no-direct-send` (and any server that does not advertise the extension): same frames,
    same order, same close, all through ASGI send."""
    gw = world.start_gateway(args=("--no-direct-send",))
    _follow_synthetic_job(gw, amqp_url, clients=3, events=50)
    assert gw.metric("facefleet_gateway_direct_frames_total") == 0
    assert gw.metric("facefleet_gateway_events_fanned_out_total") == 3 * 51
    gw.stop()


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
        rss_before = rss_mb(gw)
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
    # It was dropped on the direct path: its socket's write buffer, not an inbox, overflowed.
    assert gw.metric("facefleet_gateway_direct_frames_total") > 0
    # 12 MB were published for it; the gateway held at most its transport's high-water mark
    # plus 4 frames of them (the kernel's socket buffer holds the rest, outside the process).
    assert rss_mb(gw) - rss_before < 6
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


def test_refused_multipart_submit_leaves_no_upload_behind(
    world: GatewayWorld, gateway: Gateway
) -> None:
    """Tier and options are checked before the uploads are copied into the data root. The
    images are unique to this test: uploads/ is content-addressed, so reused bytes would hide
    a copy."""

    def files_in_uploads() -> int:
        return sum(1 for p in (world.env.data_root / "uploads").rglob("*") if p.is_file())

    before = files_in_uploads() if (world.env.data_root / "uploads").exists() else 0
    for i, data in enumerate(
        [
            {"tier": "nosuchtier"},
            {"tier": world.env.tier, "options": "{not json"},
            {"tier": world.env.tier, "processor": "p" * 41},
        ]
    ):
        unique = png(rgb=(i, uuid.uuid4().bytes[0], 77), width=9 + i)
        with gateway.http() as client:
            resp = client.post(
                "/v1/jobs",
                headers={"Authorization": f"Bearer {API_KEY}"},
                files={
                    "source": ("a.png", unique, "image/png"),
                    "target": ("b.png", unique + b"x", "image/png"),
                },
                data=data,
            )
        assert resp.status_code == 400, resp.text
    assert (files_in_uploads() if (world.env.data_root / "uploads").exists() else 0) == before


def test_cli_submit_wait_json_through_the_gateway(
    world: GatewayWorld, gateway: Gateway, tmp_path: Path
) -> None:
    """`submit --wait --json` followed through the gateway prints what the AMQP path prints:
    one submit object, then every event in seq order, the same types as an AMQP-followed job
    and the very lines an AMQP `watch` of the same job prints."""
    photo = tmp_path / "face.png"
    photo.write_bytes(png(rgb=(3, 141, 59)))
    # 0.4 s per step, above the worker's progress interval: both jobs report every step
    args = world.env.submit_args(str(photo), str(photo), "sleep_s=1.2", "steps=3")

    def submit(**extra: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        proc = world.env.cli(*args, "--wait", "--json", "--timeout", "60", timeout_s=90, **extra)
        assert proc.returncode == 0, proc.stderr
        head, *events = [json.loads(line) for line in proc.stdout.splitlines()]
        return head, events

    head, via_gateway = submit(FACEFLEET_GATEWAY_URL=gateway.url, FACEFLEET_GATEWAY_API_KEY=API_KEY)
    _, via_amqp = submit()
    journal = world.journal(head["job_id"])
    assert head["tier"] == world.env.tier and head["duplicate"] is False
    assert seqs(via_gateway) == list(range(1, len(journal) + 1))
    assert [e["type"] for e in via_gateway] == [e["type"] for e in journal]
    assert [e["type"] for e in via_gateway] == [e["type"] for e in via_amqp]
    assert via_gateway[0]["type"] == "queued" and via_gateway[-1]["type"] == "completed"
    replay = world.env.cli("watch", head["job_id"], "--json", "--timeout", "60")
    assert replay.returncode == 0, replay.stderr
    assert [json.loads(line) for line in replay.stdout.splitlines()] == via_gateway


def test_cli_watch_since_is_refused_through_the_gateway(
    world: GatewayWorld, gateway: Gateway
) -> None:
    """The gateway replays from the job's creation time in its token, so `--since` would be
    silently ignored there: it is refused (exit 2) and still works on the AMQP path."""
    job = world.submit(gateway, sleep_s=0.2, steps=1)
    read_events(gateway.ws_url(job["job_id"], token=job["token"]))  # let it finish
    args = ("watch", job["job_id"], "--since", "30m", "--json", "--timeout", "60")
    refused = world.env.cli(
        *args, FACEFLEET_GATEWAY_URL=gateway.url, FACEFLEET_GATEWAY_API_KEY=API_KEY
    )
    assert refused.returncode == 2, refused.stderr
    assert "--since does not apply through the gateway" in refused.stderr
    assert refused.stdout == ""
    direct = world.env.cli(*args)
    assert direct.returncode == 0, direct.stderr
    assert json.loads(direct.stdout.splitlines()[-1])["type"] == "completed"


# --- heartbeats ----------------------------------------------------------------------------------


class RawPeer:
    """A WebSocket client on websockets' sans-I/O protocol over a plain socket, so the test
    decides whether pings are answered (websockets' own clients always answer them)."""

    def __init__(self, url: str, *, answer_pings: bool) -> None:
        uri = parse_uri(url)
        self.answer_pings = answer_pings
        self.proto = ClientProtocol(uri)
        self.sock = socket.create_connection((uri.host, uri.port), timeout=10)
        self.proto.send_request(self.proto.connect())
        self.sock.sendall(b"".join(self.proto.data_to_send()))
        self.eof = False
        while self.proto.state is not State.OPEN:
            self.proto.receive_data(self.sock.recv(65536))
            self.proto.events_received()  # the handshake response
            if self.proto.handshake_exc is not None:
                raise self.proto.handshake_exc

    def send_text(self, text: str) -> None:
        self.proto.send_text(text.encode())
        self.sock.sendall(b"".join(self.proto.data_to_send()))

    def read(self, duration_s: float) -> list[tuple[float, Frame]]:
        """Frames received within `duration_s` (or until the server hangs up), timestamped."""
        got: list[tuple[float, Frame]] = []
        deadline = time.monotonic() + duration_s
        while not self.eof and (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            if data:
                self.proto.receive_data(data)
            else:
                self.eof = True
                self.proto.receive_eof()
            now = time.monotonic()
            got.extend((now, ev) for ev in self.proto.events_received() if isinstance(ev, Frame))
            replies = b"".join(self.proto.data_to_send())  # pongs, close echo
            if self.answer_pings and replies and not self.eof:
                self.sock.sendall(replies)
        return got

    def close(self) -> None:
        self.sock.close()


def rss_mb(gw: Gateway) -> float:
    for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _subscribers(gw: Gateway) -> int:
    count: int = httpx.get(f"{gw.url}/readyz", timeout=5).json()["subscribers"]
    return count


def test_heartbeat_pings_reach_a_connected_client(gateway_heartbeat: Gateway) -> None:
    """With FACEFLEET_HEARTBEAT_S=0.5 a client following a (quiet) job gets a ping about every
    half second, and answering them keeps the socket open."""
    job_id = str(uuid.uuid4())
    peer = RawPeer(gateway_heartbeat.ws_url(job_id), answer_pings=True)
    try:
        peer.send_text(json.dumps({"token": TokenSigner(SECRET, 600).issue(job_id)}))
        frames = peer.read(3.0)
        assert _subscribers(gateway_heartbeat) == 1
    finally:
        peer.close()
    pings = [t for t, f in frames if f.opcode is Opcode.PING]
    assert [f.opcode for _, f in frames if f.opcode is not Opcode.PING] == []  # no close
    assert len(pings) >= 3
    assert all(0.3 < b - a < 1.5 for a, b in itertools.pairwise(pings))


def test_a_peer_that_never_answers_pings_is_closed_and_unsubscribed(
    gateway_heartbeat: Gateway,
) -> None:
    job_id = str(uuid.uuid4())
    peer = RawPeer(gateway_heartbeat.ws_url(job_id), answer_pings=False)
    try:
        peer.send_text(json.dumps({"token": TokenSigner(SECRET, 600).issue(job_id)}))
        frames = peer.read(10.0)
    finally:
        peer.close()
    assert peer.eof, "the gateway kept a silent peer open"
    first_ping = next(t for t, f in frames if f.opcode is Opcode.PING)
    closed_at, close = next((t, f) for t, f in frames if f.opcode is Opcode.CLOSE)
    assert Close.parse(close.data).code == 1011
    assert 0.3 < closed_at - first_ping < 2.0  # about one heartbeat after the unanswered ping
    deadline = time.monotonic() + 5
    while _subscribers(gateway_heartbeat) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _subscribers(gateway_heartbeat) == 0
    assert gateway_heartbeat.metric("facefleet_gateway_ws_connections") == 0


@pytest.fixture(scope="module")
def gateway_heartbeat(world: GatewayWorld) -> Gateway:
    """A gateway that pings every 0.5 s and closes a peer silent for 0.5 s after a ping."""
    return world.start_gateway(FACEFLEET_HEARTBEAT_S="0.5")


@pytest.fixture(scope="module")
def gateway_small(world: GatewayWorld) -> Gateway:
    """A gateway with a 4 KB upload limit (413 tests without big bodies)."""
    return world.start_gateway(FACEFLEET_MAX_UPLOAD_BYTES="4096")
