"""The gateway with either media store, file:// and s3:// (moto_server), and no shared volume.

Real broker, real sleep workers, real gateway processes, a real S3-API server (no S3 mocks):
the main path (upload, follow, result) with both stores, upload URLs (presigned for s3, the
gateway's own PUT for file://), media URIs in JSON submits, refused submits that must leave
nothing in the store, a gateway whose data root does not exist, and a 1 GB upload's memory.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from facefleet.producer.gateway.auth import TokenSigner
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
from tests.gateway.forms import JPEG_HEAD, Part, form

pytestmark = pytest.mark.integration

MiB = 1 << 20
KEY = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(params=["file", "s3"])
def media(request: pytest.FixtureRequest) -> tuple[GatewayWorld, Gateway]:
    """(world, its main gateway) for each media store."""
    if request.param == "file":
        return request.getfixturevalue("world"), request.getfixturevalue("gateway")
    return request.getfixturevalue("s3_world"), request.getfixturevalue("s3_gateway")


def follow_first(gw: Gateway, job: dict[str, Any]) -> dict[str, Any]:
    """The job's first event (its `queued`), as the events endpoint serves it."""
    with gw.http() as client:
        state = client.get(f"/v1/jobs/{job['job_id']}", headers=KEY)
    assert state.status_code == 200, state.text
    frames, _code, _ = read_events(gw.ws_url(job["job_id"], token=job["token"]), limit=1)
    return frames[0]


def follow(gw: Gateway, job: dict[str, Any]) -> list[dict[str, Any]]:
    frames, code, _ = read_events(gw.ws_url(job["job_id"], token=job["token"]))
    assert code == 1000
    return frames


def assert_full_history(world: GatewayWorld, job_id: str, frames: list[dict[str, Any]]) -> None:
    """seq 1..n, once each, exactly the worker's journal, from queued to completed."""
    journal = world.journal(job_id)
    assert seqs(frames) == list(range(1, len(journal) + 1))
    assert [f["type"] for f in frames] == [e["type"] for e in journal]
    assert frames[0]["type"] == "queued" and frames[-1]["type"] == "completed"


def fetch_result(gw: Gateway, world: GatewayWorld, job: dict[str, Any]) -> httpx.Response:
    """GET the result as a client would; for s3 check the redirect, then follow it."""
    auth = {"Authorization": f"Bearer {job['token']}"}
    with gw.http() as client:
        resp = client.get(f"/v1/jobs/{job['job_id']}/result", headers=auth)
    if world.s3 is None:
        assert resp.status_code == 200, resp.text
        return resp
    assert resp.status_code == 307, resp.text
    location = resp.headers["location"]
    prefix = f"{world.s3.endpoint}/{world.s3.bucket}/{world.s3.prefix}/results/"
    assert location.startswith(prefix)
    assert "X-Amz-Signature=" in location and "X-Amz-Expires=300" in location
    direct = httpx.get(location, timeout=30)  # no credential: the URL is the credential
    assert direct.status_code == 200
    return direct


def uploads_in_store(world: GatewayWorld) -> set[str]:
    """Every stored upload (temp files and in-progress multipart uploads included)."""
    if world.s3 is not None:
        return world.s3.objects() | {f"multipart:{k}" for k in world.s3.multipart_uploads()}
    root = world.env.data_root / "uploads"
    return {str(p) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


# --- the main path -------------------------------------------------------------------------------


def test_submit_follow_and_fetch_the_result(media: tuple[GatewayWorld, Gateway]) -> None:
    world, gw = media
    source, target = png(rgb=(7, 8, uuid.uuid4().bytes[0])), png(width=12, rgb=(1, 1, 1))
    with gw.http() as client:
        resp = client.post(
            "/v1/jobs",
            headers=KEY,
            files={"source": ("me.png", source), "target": ("group.png", target)},
            data={"options": json.dumps({"sleep_s": 0.4, "steps": 2})},
        )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert_full_history(world, job["job_id"], follow(gw, job))
    # the uploads are content-addressed in the store, named after their role and sniffed kind
    sha = hashlib.sha256(source).hexdigest()
    if world.s3 is not None:
        assert f"{world.s3.prefix}/uploads/{sha}/source.png" in world.s3.objects()
    else:
        assert (world.env.data_root / "uploads" / sha / "source.png").read_bytes() == source
    with gw.http() as client:
        by_token = client.get(
            f"/v1/jobs/{job['job_id']}", headers={"Authorization": f"Bearer {job['token']}"}
        ).json()
        by_key = client.get(f"/v1/jobs/{job['job_id']}", headers=KEY).json()
    assert by_token == by_key
    assert by_token["state"] == "completed"
    assert by_token["result_uri"].startswith("s3://" if world.s3 else "file://")
    result = fetch_result(gw, world, job)
    assert result.json() == {"job_id": job["job_id"], "slept_s": 0.4}
    if world.s3 is None:
        assert result.headers["content-type"] == "application/json"
        assert result.headers["content-disposition"] == 'attachment; filename="result.json"'
    # ?proxy=true (the status page): streamed through the gateway for either store
    with gw.http() as client:
        proxied = client.get(
            f"/v1/jobs/{job['job_id']}/result?proxy=true",
            headers={"Authorization": f"Bearer {job['token']}"},
        )
    assert proxied.status_code == 200
    assert proxied.json() == {"job_id": job["job_id"], "slept_s": 0.4}


def test_upload_urls_round_trip_into_a_job(media: tuple[GatewayWorld, Gateway]) -> None:
    """POST /v1/uploads, PUT the bytes to the URL it names, submit the URI, fetch the result."""
    world, gw = media
    uris = []
    for name, kind, data in (
        ("me.png", None, png(rgb=(uuid.uuid4().bytes[0], 3, 3))),
        ("group.png", "png", png(width=10, rgb=(uuid.uuid4().bytes[0], 4, 4))),
    ):
        body: dict[str, Any] = {"name": name} if kind is None else {"name": name, "kind": kind}
        with gw.http() as client:
            offer = client.post("/v1/uploads", headers=KEY, json=body)
        assert offer.status_code == 201, offer.text
        answer = offer.json()
        assert answer["method"] == "PUT" and answer["expires_in"] == 900
        put = httpx.put(answer["upload_url"], content=data, timeout=30)
        if world.s3 is not None:  # presigned: straight into the bucket, the URI known already
            assert answer["upload_url"].startswith(f"{world.s3.endpoint}/{world.s3.bucket}/")
            assert answer["uri"].startswith(f"{world.s3.media_url}/uploads/direct/")
            assert put.status_code == 200, put.text
            uris.append(answer["uri"])
        else:  # through the gateway: the URI comes back from the PUT
            assert answer["upload_url"].startswith(f"{gw.url}/v1/uploads/u1.")
            assert answer["uri"] is None
            assert put.status_code == 201, put.text
            stored = put.json()
            assert stored["size"] == len(data) and stored["kind"] == "png"
            assert stored["sha256"] == hashlib.sha256(data).hexdigest()
            assert stored["uri"].endswith(f"/{stored['sha256']}/{Path(name).stem}.png")
            uris.append(stored["uri"])
    with gw.http() as client:
        resp = client.post(
            "/v1/jobs",
            headers=KEY,
            json={
                "source_uri": uris[0],
                "target_uri": uris[1],
                "options": {"sleep_s": 0.2, "steps": 1},
            },
        )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert_full_history(world, job["job_id"], follow(gw, job))
    assert fetch_result(gw, world, job).json()["job_id"] == job["job_id"]


def test_json_submits_accept_store_uris_and_https_and_refuse_the_rest(
    media: tuple[GatewayWorld, Gateway],
) -> None:
    world, gw = media
    text, video = b"plain text, not an image " * 4, b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64
    if world.s3 is not None:
        for name, data in (("notes.txt", text), ("clip.mp4", video)):
            key = f"{world.s3.prefix}/misc/{name}"
            world.s3.client().put_object(Bucket=world.s3.bucket, Key=key, Body=data)
        base = f"{world.s3.media_url}/misc"
        outside = f"s3://another-bucket/{world.s3.prefix}/misc/{uuid.uuid4()}.png"
    else:
        misc = world.env.data_root / "misc"
        misc.mkdir(exist_ok=True)
        (misc / "notes.txt").write_bytes(text)
        (misc / "clip.mp4").write_bytes(video)
        base = misc.as_uri()
        outside = "file:///etc/passwd"
    with gw.http() as client:
        good = client.post("/v1/uploads", headers=KEY, json={"name": "g.png"}).json()
    put = httpx.put(good["upload_url"], content=png(rgb=(9, 9, uuid.uuid4().bytes[0])))
    image = good["uri"] or put.json()["uri"]
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"source_uri": f"{base}/notes.txt"}, 415, "source: not a recognised image or video"),
        ({"source_uri": f"{base}/clip.mp4"}, 415, "source: must be an image"),
        ({"source_uri": f"{base}/missing.png"}, 400, "no such file or object"),
        ({"source_uri": outside}, 400, "outside the media store"),
        ({"target_uri": "http://example.com/t.png"}, 400, "plain http:// is not accepted"),
        ({"target_uri": "ftp://example.com/t.png"}, 400, "outside the media store"),
        ({"target_uri": "relative/path.png"}, 400, "outside the media store"),
        ({"target_uri": None}, 400, "target_uri: required"),
        ({"webhook_url": "ftp://hooks.example/x"}, 400, "webhook URL must start with https://"),
        ({"webhook_events": ["completed", "exploded"]}, 400, "unknown event types ['exploded']"),
        ({"webhook_events": ["completed"]}, 400, "webhook_events without a webhook_url"),
    ]
    with gw.http() as client:
        for override, status, reason in cases:
            body = {"source_uri": image, "target_uri": image, "tier": world.idle_tier, **override}
            resp = client.post("/v1/jobs", headers=KEY, json=body)
            assert resp.status_code == status, (override, resp.text)
            assert reason in resp.json()["detail"], (override, resp.text)
        # a video target in the store, and an https:// input the gateway does not fetch: queued
        # on a tier without workers (nobody tries to fetch the URL)
        resp = client.post(
            "/v1/jobs",
            headers=KEY,
            json={
                "source_uri": "https://unreachable.invalid/face.jpg",
                "target_uri": f"{base}/clip.mp4",
                "tier": world.idle_tier,
                "webhook_url": "https://hooks.example/facefleet",
                "webhook_events": ["completed", "failed"],
            },
        )
    assert resp.status_code == 202, resp.text
    # the webhook rides in the job's queued event, where `facefleet webhooks` finds it
    queued = follow_first(gw, resp.json())
    assert queued["payload"]["webhook_url"] == "https://hooks.example/facefleet"
    assert queued["payload"]["webhook_events"] == ["completed", "failed"]


def test_refused_submits_leave_nothing_in_the_store(media: tuple[GatewayWorld, Gateway]) -> None:
    """Fields after the files (as a browser may send them) are checked before the uploads are
    committed; a second file refused mid-stream aborts the first. Unique bytes each time:
    uploads are content-addressed, so reused bytes could hide a leftover."""
    world, gw = media
    before = uploads_in_store(world)

    def unique_png() -> bytes:
        return png(width=5, rgb=(uuid.uuid4().bytes[0], uuid.uuid4().bytes[1], 5))

    cases = [
        ([Part("tier", b"nosuchtier")], 400),
        ([Part("options", b"{not json")], 400),
        ([Part("processor", b"p" * 41)], 400),
    ]
    for after, status in cases:
        f = form(Part("source", unique_png(), "a.png"), Part("target", unique_png(), "b"), *after)
        with gw.http() as client:
            resp = client.post("/v1/jobs", headers=f.headers(API_KEY), content=f.body())
        assert resp.status_code == status, resp.text
    f = form(Part("source", unique_png(), "a.png"), Part("target", b"#!/bin/sh\n" * 10, "b.png"))
    with gw.http() as client:
        resp = client.post("/v1/jobs", headers=f.headers(API_KEY), content=f.body())
    assert resp.status_code == 415, resp.text
    assert uploads_in_store(world) == before


def test_an_s3_upload_aborted_mid_multipart_leaves_no_object_and_no_upload(
    s3_world: GatewayWorld, tmp_path: Path
) -> None:
    """A 6 MiB source is already a multipart upload in the bucket (one 5 MiB part sent) when
    the target passes the 8 MiB limit: 413, the multipart upload is aborted, nothing stays."""
    assert s3_world.s3 is not None
    gw = s3_world.start_gateway(
        FACEFLEET_MAX_UPLOAD_BYTES=str(8 * MiB), FACEFLEET_DATA_ROOT=str(tmp_path / "absent")
    )
    before = uploads_in_store(s3_world)
    nonce = uuid.uuid4().bytes
    f = form(
        Part("source", JPEG_HEAD + nonce, "a.jpg", padding=6 * MiB),
        Part("target", JPEG_HEAD + nonce, "b.jpg", padding=9 * MiB),
        Part("tier", s3_world.idle_tier.encode()),
    )
    with gw.http() as client:
        resp = client.post("/v1/jobs", headers=f.headers(API_KEY), content=f.stream())
    assert resp.status_code == 413, resp.text
    assert "target: over the limit" in resp.json()["detail"]
    assert uploads_in_store(s3_world) == before
    gw.stop()


def test_a_client_gone_mid_upload_leaves_nothing_behind(
    s3_world: GatewayWorld, s3_gateway: Gateway
) -> None:
    """The client hangs up after 7 MiB of a 20 MiB source (a multipart upload in the bucket by
    then): the upload is aborted, and nothing stays in the bucket."""
    before = uploads_in_store(s3_world)
    f = form(
        Part("source", JPEG_HEAD + uuid.uuid4().bytes, "a.jpg", padding=20 * MiB),
        Part("target", png(), "b.png"),
    )
    head = (
        "POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in f.headers(API_KEY).items())
        + "\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", s3_gateway.port), timeout=10) as sock:
        sock.sendall(head)
        sent = 0
        for chunk in f.stream():
            sock.sendall(chunk)
            sent += len(chunk)
            if sent > 7 * MiB:
                break
        time.sleep(1.0)  # the gateway is mid-upload: 5 MiB part sent, the next one filling
        assert uploads_in_store(s3_world) - before, "no multipart upload in flight"
    deadline = time.monotonic() + 15
    while uploads_in_store(s3_world) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert uploads_in_store(s3_world) == before
    with s3_gateway.http() as client:
        assert client.get("/readyz").status_code == 200


def test_put_uploads_refuse_bad_tokens_kinds_and_sizes(world: GatewayWorld, tmp_path: Path) -> None:
    """The gateway's own upload URL (file:// stores): the token is the credential; kind and
    size are checked while streaming; nothing is left behind on refusal."""
    gw = world.start_gateway(FACEFLEET_MAX_UPLOAD_BYTES="4096")
    before = uploads_in_store(world)
    signer = TokenSigner(SECRET, 600)
    with gw.http() as client:
        offer = client.post("/v1/uploads", headers=KEY, json={"name": "x.jpg", "kind": "jpeg"})
        assert offer.status_code == 201
        url = offer.json()["upload_url"]
        cases = [
            (url, png(), 415, "upload: png is not accepted here (jpeg)"),
            (url, JPEG_HEAD + b"\0" * 5000, 413, "over the limit of 4096"),
            (url, b"", 400, "upload: empty file"),
            (url[:-3] + "AAA", JPEG_HEAD, 403, "invalid token signature"),
            (
                f"{gw.url}/v1/uploads/{signer.issue_upload('x', None, 60, now=time.time() - 61)}",
                JPEG_HEAD,
                403,
                "token expired",
            ),
            (f"{gw.url}/v1/uploads/{signer.issue(str(uuid.uuid4()))}", JPEG_HEAD, 403, "malformed"),
        ]
        for target, data, status, reason in cases:
            resp = client.put(target, content=data)
            assert resp.status_code == status, (reason, resp.text)
            assert reason in resp.json()["detail"]
        refusals = [
            client.post("/v1/uploads", json={"name": "x.png"}).status_code,
            client.post("/v1/uploads", headers=KEY, json={"name": ""}).status_code,
            client.post("/v1/uploads", headers=KEY, json={"name": "a", "kind": "exe"}).status_code,
        ]
        assert refusals == [401, 400, 400]
        ok = client.put(url, content=JPEG_HEAD + uuid.uuid4().bytes)
    assert ok.status_code == 201, ok.text
    assert ok.json()["uri"].endswith("/x.jpg")
    assert len(uploads_in_store(world) - before) == 1
    gw.stop()


# --- no shared volume ------------------------------------------------------------------------------


def test_a_gateway_without_a_data_root_serves_history_state_and_results(
    media: tuple[GatewayWorld, Gateway], tmp_path: Path
) -> None:
    """FACEFLEET_DATA_ROOT names a directory that does not exist (and never will): uploads,
    history, state and results all work, from the events stream and the media store."""
    world, main = media
    nowhere = tmp_path / "no" / "such" / "dir"
    extra = {"FACEFLEET_DATA_ROOT": str(nowhere)}
    if world.s3 is None:  # file media: the store is the workers' volume, named on its own
        extra["FACEFLEET_MEDIA_URL"] = world.env.data_root.resolve().as_uri()
    gw = world.start_gateway(**extra)
    mine = world.submit(gw, sleep_s=0.4, steps=2)
    theirs = world.submit(main, sleep_s=0.4, steps=2)  # submitted through another replica
    for job in (mine, theirs):
        assert_full_history(world, job["job_id"], follow(gw, job))
        with gw.http() as client:
            state = client.get(f"/v1/jobs/{job['job_id']}", headers=KEY)
            token = client.post(f"/v1/jobs/{job['job_id']}/token", headers=KEY)
        assert state.status_code == 200 and state.json()["state"] == "completed"
        assert token.status_code == 200
        assert fetch_result(gw, world, job).json()["job_id"] == job["job_id"]
    assert gw.metric("facefleet_gateway_history_loads_total") >= 6
    assert not nowhere.exists() and not nowhere.parent.parent.exists()
    gw.stop()


def test_a_media_url_naming_no_usable_store_stops_the_gateway(world: GatewayWorld) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "facefleet.cli", "gateway", "--port", str(free_port())],
        env=world.env.vars(
            FACEFLEET_API_KEYS=API_KEY,
            FACEFLEET_TOKEN_SECRET=SECRET,
            FACEFLEET_MEDIA_URL="s3://Not_A_Bucket/x",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "FACEFLEET_MEDIA_URL" in out.stderr and "not a valid S3 bucket name" in out.stderr


# --- memory ------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


@pytest.mark.slow
def test_a_1gb_upload_streams_into_s3_in_bounded_memory(
    s3_world: GatewayWorld, tmp_path: Path
) -> None:
    """A 1 GiB source (a JPEG header and padding, generated block by block) goes through a
    multipart submit into the s3 store; the gateway's peak RSS grows by well under 150 MB."""
    assert s3_world.s3 is not None
    s3 = s3_world.s3
    gw = s3_world.start_gateway(
        FACEFLEET_MAX_UPLOAD_BYTES=str(1100 * MiB), FACEFLEET_DATA_ROOT=str(tmp_path / "absent")
    )
    s3_world.submit(gw, tier=s3_world.idle_tier)  # warm: boto3 loaded, its client made
    nonce = uuid.uuid4().bytes
    source = Part("source", JPEG_HEAD + nonce, "big.jpg", padding=1024 * MiB)
    f = form(
        source,
        Part("target", png(rgb=(nonce[0], 2, 3)), "t.png"),
        Part("tier", s3_world.idle_tier.encode()),
    )
    digest = hashlib.sha256()
    for chunk in source.chunks():
        digest.update(chunk)
    base = proc_status(gw.proc.pid)
    started = time.monotonic()
    with httpx.Client(timeout=300) as client:
        resp = client.post(f"{gw.url}/v1/jobs", headers=f.headers(API_KEY), content=f.stream())
    elapsed = time.monotonic() - started
    assert resp.status_code == 202, resp.text
    peak = proc_status(gw.proc.pid)["VmHWM"]
    growth = peak - base["VmRSS"]
    print(
        f"\n1 GiB multipart upload into s3 in {elapsed:.1f} s ({1024 / elapsed:.0f} MiB/s): "
        f"gateway RSS before {base['VmRSS'] / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB, "
        f"growth {growth / MiB:.1f} MiB"
    )
    key = f"{s3.prefix}/uploads/{digest.hexdigest()}/source.jpg"
    head = s3.client().head_object(Bucket=s3.bucket, Key=key)
    assert head["ContentLength"] == source.size
    s3.client().delete_object(Bucket=s3.bucket, Key=key)
    assert growth < 150 * MiB
    gw.stop()
