"""The CLI as users run it: subprocesses against the real broker and a real worker."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import Env

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
    env.cli(*env.submit_args(photo, photo, "sleep_s=0.1"), "--wait")
    status, text = worker.get("/metrics")
    assert status == 200
    assert f'facefleet_jobs_total{{outcome="completed",tier="{env.tier}"}} 1.0' in text
    assert "facefleet_queue_wait_seconds_bucket" in text


def test_unreachable_broker_is_a_clear_error(env: Env, photo: str) -> None:
    env.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2F"
    proc = env.cli(*env.submit_args(photo, photo))
    assert proc.returncode == 4
    assert "cannot reach the broker" in proc.stderr
