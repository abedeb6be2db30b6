"""Signing, secrets, schedule, names and the submit-side checks, without a broker.

Signatures are checked with `standardwebhooks` (the spec authors' reference library), an
implementation independent of facefleet.webhooks.sign.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from facefleet.producer.errors import InvalidJobError
from facefleet.producer.sdk import build_request
from facefleet.settings import (
    WEBHOOK_RETRY_SCHEDULE,
    SettingsError,
    WebhookSettings,
    parse_duration_s,
    parse_webhook_secrets,
)
from facefleet.webhooks import (
    DEFAULT_EVENTS,
    KeyedLanes,
    WebhookQueues,
    main_queue_arguments,
    retry_queue_arguments,
    schedule_ms,
    sign,
    signed_headers,
    target_of,
)
from facefleet.wire import (
    EVENT_TYPES,
    BrokerFeatures,
    EventPayload,
    JobEvent,
    check_webhook_url,
    webhook_failed_queue,
    webhook_id,
    webhook_retry_queue,
)
from tests.webhooks.conftest import new_secret

REPO = Path(__file__).resolve().parents[2]


def event(seq: int = 2, type_: str = "started") -> JobEvent:
    return JobEvent(
        job_id="80ef5939-a6f7-5976-af8f-c92f8331218a",
        seq=seq,
        type=type_,  # type: ignore[arg-type]
        ts=datetime(2026, 12, 5, 12, 0, tzinfo=UTC),
        payload=EventPayload(worker="w1"),
    )


def test_signature_verifies_with_the_reference_library() -> None:
    secret = new_secret()
    body = event().encode()
    msg_id = webhook_id(event().job_id, 2)
    headers = signed_headers(parse_webhook_secrets(secret), msg_id, body, int(time.time()))
    assert Webhook(secret).verify(body, headers) == event().model_dump(
        mode="json", exclude_none=True
    )
    assert headers["webhook-id"] == "80ef5939-a6f7-5976-af8f-c92f8331218a.2"
    assert headers["content-type"] == "application/json"
    # A changed body, id or timestamp, or another secret, fails.
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, {**headers, "webhook-id": msg_id + "0"})
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    stale = signed_headers(parse_webhook_secrets(secret), msg_id, body, int(time.time()) - 600)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(body, stale)


def test_signature_matches_the_spec_formula() -> None:
    key = b"k" * 32
    want = base64.b64encode(hmac.new(key, b"id1.1700000000.{}", hashlib.sha256).digest())
    assert sign(key, "id1", 1700000000, b"{}") == "v1," + want.decode()


def test_rotation_signs_with_every_secret() -> None:
    old, new = new_secret(), new_secret(48)
    keys = parse_webhook_secrets(f"{old} ,{new}")
    body = b'{"a":1}'
    headers = signed_headers(keys, "j.1", body, int(time.time()))
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(body, headers)  # a receiver on either secret accepts it
    Webhook(new).verify(body, headers)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "required"),
        ("abc", "does not start with whsec_"),
        ("whsec_!!!notbase64", "not base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "decodes to 5 bytes"),
        (new_secret() + " whsec_" + base64.b64encode(b"x" * 65).decode(), "secret #2"),
    ],
)
def test_bad_secrets_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_webhook_secrets(text)


def test_settings_name_the_secret_and_never_echo_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEFLEET_WEBHOOK_SECRET", "whsec_c2VjcmV0")
    with pytest.raises(SettingsError) as info:
        WebhookSettings.load()
    assert "FACEFLEET_WEBHOOK_SECRET" in info.value.message
    assert "c2VjcmV0" not in info.value.message
    monkeypatch.delenv("FACEFLEET_WEBHOOK_SECRET")
    with pytest.raises(SettingsError, match="FACEFLEET_WEBHOOK_SECRET: Field required"):
        WebhookSettings.load()


def test_the_process_stops_on_a_bad_secret_naming_the_variable(tmp_path: Path) -> None:
    for secret in ("not-a-secret", "whsec_" + base64.b64encode(b"tiny").decode()):
        done = subprocess.run(
            [sys.executable, "-m", "facefleet.cli", "webhooks"],
            env={
                "PATH": "/usr/bin:/bin",
                "FACEFLEET_WEBHOOK_SECRET": secret,
                "FACEFLEET_DATA_ROOT": str(tmp_path),
            },
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert done.returncode == 2, done.stderr
        assert "FACEFLEET_WEBHOOK_SECRET" in done.stderr
        assert secret not in done.stderr


def test_bad_allow_list_stops_the_process(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "facefleet.cli", "webhooks"],
        env={
            "PATH": "/usr/bin:/bin",
            "FACEFLEET_WEBHOOK_SECRET": new_secret(),
            "FACEFLEET_FETCH_ALLOW": "10.0.0.0/33",
            "FACEFLEET_DATA_ROOT": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 2 and "FACEFLEET_FETCH_ALLOW" in done.stderr


def test_schedule_default_spans_more_than_a_day(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEFLEET_WEBHOOK_SECRET", new_secret())
    settings = WebhookSettings.load()
    delays = settings.webhook_retry_schedule
    assert sum(delays) >= 24 * 3600
    assert delays == tuple(parse_duration_s(d) for d in WEBHOOK_RETRY_SCHEDULE.split(","))
    monkeypatch.setenv("FACEFLEET_WEBHOOK_RETRY_SCHEDULE", "250ms, 1.5s,0.2")
    assert schedule_ms(WebhookSettings.load()) == (250, 1500, 200)
    for bad in ("", "5x", "0s", "30d"):
        monkeypatch.setenv("FACEFLEET_WEBHOOK_RETRY_SCHEDULE", bad)
        with pytest.raises(SettingsError, match="FACEFLEET_WEBHOOK_RETRY_SCHEDULE"):
            WebhookSettings.load()


def test_queue_names_follow_the_delay_not_the_step() -> None:
    assert webhook_retry_queue(5000) == "facefleet.webhooks.retry.5s"
    assert webhook_retry_queue(120_000) == "facefleet.webhooks.retry.2m"
    assert webhook_retry_queue(36_000_000) == "facefleet.webhooks.retry.10h"
    assert webhook_retry_queue(1500, "q") == "q.retry.1500ms"
    assert webhook_failed_queue() == "facefleet.webhooks.failed"
    with pytest.raises(ValueError):
        webhook_retry_queue(0)


def test_queue_arguments_follow_the_broker() -> None:
    q = WebhookQueues("facefleet.webhooks")
    new = BrokerFeatures("RabbitMQ", (3, 13, 1))
    old = BrokerFeatures("RabbitMQ", (3, 9, 0))
    delay = retry_queue_arguments(q, 5000, new)
    assert delay == {
        "x-queue-type": "quorum",
        "x-message-ttl": 5000,
        "x-dead-letter-exchange": "facefleet.webhooks",
        "x-dead-letter-routing-key": "facefleet.webhooks",
        "x-overflow": "reject-publish",
        "x-dead-letter-strategy": "at-least-once",
    }
    assert retry_queue_arguments(q, 5000, old)["x-queue-type"] == "classic"
    main = main_queue_arguments(q, new)
    assert main["x-dead-letter-routing-key"] == "facefleet.webhooks.failed"
    assert "x-max-length" not in main  # a full queue would nack the workers' events


def test_targets_and_default_filter() -> None:
    assert target_of(EventPayload(tier="t")) is None
    default = target_of(EventPayload(webhook_url="https://example.com/h"))
    assert default is not None and default.events == DEFAULT_EVENTS
    assert set(EVENT_TYPES) - DEFAULT_EVENTS == {"progress"}
    only = target_of(EventPayload(webhook_url="https://x.org", webhook_events=("completed",)))
    assert only is not None and only.wants("completed") and not only.wants("started")


def test_lanes_keep_order_per_key_and_run_keys_in_parallel() -> None:
    import threading

    lanes = KeyedLanes(4)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    gate = threading.Event()
    done = threading.Semaphore(0)

    def task(key: str, n: int) -> None:
        if key == "a" and n == 0:
            gate.wait(5)  # a's first task blocks a only
        seen[key].append(n)
        done.release()

    for n in range(5):
        lanes.submit("a", lambda n=n: task("a", n))
        lanes.submit("b", lambda n=n: task("b", n))
    for _ in range(5):
        assert done.acquire(timeout=5)
    assert seen["b"] == [0, 1, 2, 3, 4] and seen["a"] == []
    gate.set()
    for _ in range(5):
        assert done.acquire(timeout=5)
    assert seen["a"] == [0, 1, 2, 3, 4]
    lanes.shutdown()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "example.com/hook",
        "https:///nohost",
        "https://a.com/h#frag",
        "https://a.com/ h",
        "https://a.com:99999/",
        "https://a.com/" + "x" * 2100,
    ],
)
def test_webhook_url_checks(url: str) -> None:
    with pytest.raises(ValueError):
        check_webhook_url(url)


def test_build_request_carries_and_checks_the_webhook(tmp_path: Path) -> None:
    from facefleet.media import open_media_store

    media = open_media_store("", data_root=tmp_path)
    src = tmp_path / "a.jpg"
    src.write_bytes(b"x")
    job = build_request(
        media,
        "standard",
        str(src),
        str(src),
        webhook_url="https://hooks.example.com/ff?token=1",
        webhook_events=["completed", "failed"],
    )
    assert job.webhook_url == "https://hooks.example.com/ff?token=1"
    assert job.webhook_events == ("completed", "failed")
    with pytest.raises(InvalidJobError, match="https"):
        build_request(media, "standard", str(src), str(src), webhook_url="ftp://x.org/")
    with pytest.raises(InvalidJobError, match="without a webhook_url"):
        build_request(media, "standard", str(src), str(src), webhook_events=["completed"])
    with pytest.raises(InvalidJobError, match="webhook_events"):
        build_request(
            media,
            "standard",
            str(src),
            str(src),
            webhook_url="https://x.org/",
            webhook_events=["nope"],  # type: ignore[list-item]
        )
