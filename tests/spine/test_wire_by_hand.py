"""A producer in "another language": plain pika and boto3, from README "Wire contract" alone.

Nothing here builds a message with FaceFleet code: the job id derivation, the fields, the
headers and the events stream are taken from the README. If the README and the code drift
apart, this test fails. Real broker, real worker process, real S3-API server (moto_server).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pika
import pytest

from tests.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

NAMESPACE = uuid.UUID("6f1c1a52-3c55-4f43-8a51-0d1f4c6a9e21")  # README: "Job id"


def read_events(amqp_url: str, job_id: str, since: datetime, timeout_s: float) -> list[Any]:
    """The job's events from the facefleet.events.log stream, up to its terminal one."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=500)
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for method, _props, body in ch.consume(
            "facefleet.events.log",
            arguments={"x-stream-offset": since.replace(microsecond=0)},
            inactivity_timeout=1,
        ):
            if time.monotonic() > deadline:
                break
            if method is None:
                continue
            ch.basic_ack(method.delivery_tag)
            if not method.routing_key.startswith(f"job.{job_id}."):
                continue
            event = json.loads(body)
            seen.setdefault(event["seq"], event)  # a seq may arrive twice: keep the first
            if event["type"] in ("completed", "failed", "dead_lettered", "cancelled"):
                break
    finally:
        conn.close()
    return [seen[k] for k in sorted(seen)]


def test_a_job_published_by_hand_from_the_readme_completes(
    make_env: Callable[..., Env], s3_media_url: str, s3_bucket: str, tmp_path: Path
) -> None:
    env = make_env(media_url=s3_media_url)
    assert env.cli("topology", "apply").returncode == 0
    env.start_worker()  # the sleep processor; inputs are still fetched from the store

    photo = tmp_path / "me.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"by hand" * 10)
    s3 = boto3.client("s3")
    key = "facefleet/uploads/by-hand/me.png"
    s3.upload_file(str(photo), s3_bucket, key)

    idempotency_key = f"by-hand-{uuid.uuid4().hex}"
    job_id = str(uuid.uuid5(NAMESPACE, idempotency_key))
    created_at = datetime.now(UTC)
    ts = created_at.isoformat().replace("+00:00", "Z")
    job = {
        "schema_version": 1,
        "job_id": job_id,
        "idempotency_key": idempotency_key,
        "tier": env.tier,
        "created_at": ts,
        "source_uri": f"s3://{s3_bucket}/{key}",
        "target_uri": f"s3://{s3_bucket}/{key}",
        "output_uri_prefix": f"s3://{s3_bucket}/facefleet/results/",
        "options": {"sleep_s": 0.2},
    }
    queued = {
        "schema_version": 1,
        "job_id": job_id,
        "seq": 1,
        "type": "queued",
        "ts": ts,
        "payload": {"tier": env.tier},
    }
    headers = {"x-facefleet-schema": 1, "x-facefleet-job-id": job_id}
    conn = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish(
        "facefleet.jobs",
        env.tier,
        json.dumps(job).encode(),
        pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=job_id,
            headers=headers,
        ),
        mandatory=True,
    )
    ch.basic_publish(
        "facefleet.events",
        f"job.{job_id}.queued",
        json.dumps(queued).encode(),
        pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=f"{job_id}:1",
            headers={**headers, "x-stream-filter-value": job_id},
        ),
        mandatory=True,
    )
    conn.close()

    events = read_events(env.amqp_url, job_id, created_at, timeout_s=60)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "queued" and events[-1]["type"] == "completed", events[-1]
    result_uri = events[-1]["payload"]["result_uri"]
    bucket, _, result_key = result_uri.removeprefix("s3://").partition("/")
    assert bucket == s3_bucket and result_key.startswith(f"facefleet/results/{job_id}/")
    manifest_key = events[-1]["payload"]["manifest_uri"].removeprefix(f"s3://{s3_bucket}/")
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key=manifest_key)["Body"].read())
    assert manifest["job_id"] == job_id
    assert s3.head_object(Bucket=s3_bucket, Key=result_key)["ContentLength"] > 0
