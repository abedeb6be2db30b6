"""JobRunner bookkeeping that needs no broker. The publisher is a fake (it records, never sends);
the storage is real files in a temp dir."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from consumer.metrics import WorkerMetrics
from consumer.processors.noop import NoopProcessor
from consumer.runner import JobRunner
from facefleet.settings import WorkerSettings
from facefleet.storage import Storage
from facefleet.wire import CancelRequest, TierSpec, utcnow


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def publish_event(self, event: Any) -> None:
        self.sent.append(event)


@pytest.fixture
def runner(tmp_path: Path) -> JobRunner:
    settings = WorkerSettings(data_root=tmp_path)
    return JobRunner(
        settings,
        TierSpec("standard"),
        NoopProcessor(),
        Storage(tmp_path),
        WorkerMetrics(),
        FakePublisher(),  # type: ignore[arg-type]
        "test-worker",
    )


def cancel(job_id: str) -> CancelRequest:
    return CancelRequest(job_id=job_id, reason="changed my mind", requested_at=utcnow())


def test_cancel_for_a_job_elsewhere_is_made_durable_not_kept_in_memory(runner: JobRunner) -> None:
    job = str(uuid.uuid4())
    runner.note_cancel(cancel(job))
    assert runner.cancelled == {}
    assert runner.cancel_reason(job) == "changed my mind"  # from the durable marker


def test_cancel_for_a_running_job_is_also_kept_in_memory(runner: JobRunner) -> None:
    job = str(uuid.uuid4())
    runner.claims[job] = object()  # type: ignore[assignment]
    runner.note_cancel(cancel(job))
    assert runner.cancelled == {job: "changed my mind"}
