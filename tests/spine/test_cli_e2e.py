"""The CLI as users run it: subprocesses against the real broker and a real worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from facefleet.amqp import connect, features
from facefleet.broker import Broker
from facefleet.management import ManagementUnavailable, default_management_url, read_queues
from tests.conftest import Env, free_port

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.fixture
def photo(env: Env) -> str:
    path = env.data_root / "in.bin"
    path.write_bytes(b"payload")
    return str(path)


@pytest.mark.parametrize(
    ("options", "exit_code", "last_type"),
    [
        pytest.param(["sleep_s=0.3"], 0, "completed", id="completed-exits-0"),
        pytest.param(["fail=permanent"], 1, "failed", id="failed-exits-1"),
    ],
)
def test_submit_wait_json_prints_one_object_then_event_lines(
    env: Env, photo: str, options: list[str], exit_code: int, last_type: str
) -> None:
    assert env.cli("topology", "apply").returncode == 0
    env.start_worker()
    proc = env.cli(*env.submit_args(photo, photo, *options), "--wait", "--json")
    assert proc.returncode == exit_code, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert "job_id" in lines[0]
    events = lines[1:]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "queued" and events[-1]["type"] == last_type


def test_watch_replays_a_finished_job_and_cancel_exits_3(env: Env, photo: str) -> None:
    env.cli("topology", "apply")
    env.start_worker()
    sub = env.cli(*env.submit_args(photo, photo, "sleep_s=30"), "--json")
    job_id = json.loads(sub.stdout)["job_id"]
    watcher = subprocess.Popen(
        [sys.executable, "-m", "facefleet.cli", "watch", job_id],
        env=env.vars(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2)
    assert env.cli("cancel", job_id).returncode == 0
    _, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 3, err
    assert "cancelled" in err and "started" in err  # the human progress output goes to stderr
    replay = env.cli("watch", job_id, "--json")
    assert replay.returncode == 3
    assert json.loads(replay.stdout.splitlines()[-1])["type"] == "cancelled"


def test_status_lists_the_tier_with_its_consumer(env: Env) -> None:
    env.cli("topology", "apply")
    env.start_worker()
    proc = env.cli("status", "--json")
    rows = {r["tier"]: r for r in json.loads(proc.stdout)}
    assert rows[env.tier]["consumers"] == 1


def test_worker_health_readiness_and_metrics(env: Env, photo: str) -> None:
    env.cli("topology", "apply")
    worker = env.start_worker()
    assert worker.get("/healthz")[0] == 200
    assert worker.get("/readyz") == (200, "ready\n")
    assert "facefleet_worker_busy_jobs 0.0" in worker.get("/metrics")[1]
    sub = env.cli(*env.submit_args(photo, photo, "sleep_s=3"), "--json")
    job_id = json.loads(sub.stdout)["job_id"]
    deadline = time.monotonic() + 20
    while "facefleet_worker_busy_jobs 1.0" not in worker.get("/metrics")[1]:
        assert time.monotonic() < deadline, "busy gauge never showed the running job"
        time.sleep(0.1)
    assert env.cli("watch", job_id, "--json").returncode == 0
    status, text = worker.get("/metrics")
    assert status == 200
    assert f'facefleet_jobs_total{{outcome="completed",tier="{env.tier}"}} 1.0' in text
    assert "facefleet_queue_wait_seconds_bucket" in text
    assert "facefleet_worker_busy_jobs 0.0" in text


def test_unreachable_broker_is_a_clear_error(env: Env, photo: str) -> None:
    env.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2F"
    proc = env.cli(*env.submit_args(photo, photo))
    assert proc.returncode == 4
    assert "cannot reach the broker" in proc.stderr


def test_status_counts_the_running_job_as_unacked(env: Env, photo: str, broker: Broker) -> None:
    """AMQP reports ready messages only; the running job shows up through the management API."""
    mgmt = broker.management_url or default_management_url(env.amqp_url)
    try:
        read_queues(env.amqp_url, mgmt)
    except ManagementUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI enables the management plugin (.ci/run); it is unreachable: {exc}")
        pytest.skip(str(exc))
    env.cli("topology", "apply")
    env.start_worker()
    sub = env.cli(*env.submit_args(photo, photo, "sleep_s=60"), "--json")
    job_id = json.loads(sub.stdout)["job_id"]
    row: dict[str, object] = {}
    deadline = time.monotonic() + 40  # the management API refreshes its stats every 5 s
    while time.monotonic() < deadline:
        proc = env.cli("status", "--json", FACEFLEET_MANAGEMENT_URL=mgmt)
        assert proc.returncode == 0, proc.stderr
        row = {r["tier"]: r for r in json.loads(proc.stdout)}[env.tier]
        if row["unacked"] == 1:
            break
        time.sleep(1)
    assert row == {"tier": env.tier, "ready": 0, "unacked": 1, "consumers": 1}
    assert "unknown" not in proc.stderr
    env.cli("cancel", job_id)


def test_status_says_how_to_enable_the_management_plugin(env: Env) -> None:
    env.cli("topology", "apply")
    proc = env.cli("status", FACEFLEET_MANAGEMENT_URL=f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 0
    assert "rabbitmq-plugins enable rabbitmq_management" in proc.stderr
    assert "FACEFLEET_MANAGEMENT_URL" in proc.stderr
    assert "n/a" in proc.stdout


def test_old_brokers_get_the_exact_consumer_timeout_line(make_env: Callable[..., Env]) -> None:
    """A 2000 s tier needs a 2300 s ack timeout, above the 30 min default: before 3.12 (no
    per-queue x-consumer-timeout) topology apply prints the rabbitmq.conf line and the worker
    warns at start; from 3.12 the queue carries it and neither says so."""
    env = make_env(max_job_s=2000)
    conn = connect(env.amqp_url, "test-consumer-timeout")
    try:
        per_queue = features(conn).queue_consumer_timeout
    finally:
        conn.close()
    proc = env.cli("topology", "apply")
    assert proc.returncode == 0, proc.stderr
    worker = env.start_worker()
    log = worker.log.read_text()
    if per_queue:
        assert "per-queue x-consumer-timeout set" in proc.stdout
        assert "older than 3.12" not in log
    else:
        assert proc.stdout.splitlines()[-1].strip() == "consumer_timeout = 2300000"
        assert "older than 3.12" in log and "`consumer_timeout = 2300000`" in log
