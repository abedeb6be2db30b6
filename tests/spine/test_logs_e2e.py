"""A worker's log as a log pipeline reads it: off a terminal, one JSON object per line, and the
lines about a job carry its id, tier, attempt and the worker's name."""

from __future__ import annotations

import json

import pytest

from facefleet.producer.sdk import JobClient
from facefleet.settings import ProducerSettings
from tests.conftest import Env
from tests.spine.test_dead import ends_in, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_a_workers_lines_are_json_and_a_jobs_lines_name_the_job(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.settings_env(monkeypatch)
    client = JobClient(ProducerSettings.load())
    client.apply_topology()
    worker = env.start_worker(FACEFLEET_MAX_ATTEMPTS="2")  # its stderr is a file: JSON
    src = env.data_root / "in.txt"
    src.write_text("the sleep processor does not read it")
    job = client.submit(env.tier, str(src), str(src), options={"fail": "transient"}).job_id
    wait_for(env, job, ends_in("dead_lettered"))
    worker.signal()
    worker.proc.wait(30)
    lines = [line for line in worker.log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line parses
    assert all({"event", "level", "logger", "timestamp"} <= set(r) for r in records)
    about = [r for r in records if r.get("job_id") == job]
    assert any("transient error" in r["event"] for r in about), records
    for record in about:
        assert record["tier"] == env.tier and record["worker"] and record["attempt"] >= 1
