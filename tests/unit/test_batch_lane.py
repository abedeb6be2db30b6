"""The batch lane (`JobRunner.handle_batch`): every delivery of a batch gets the outcome it
would get one by one. The publisher is a fake (records, never sends); files are real."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pika
import pytest

from facefleet.consumer.delivery import Delivery
from facefleet.consumer.processors.noop import NoopProcessor
from facefleet.consumer.processors.sleep import SleepProcessor
from facefleet.consumer.runner import JobRunner
from facefleet.journal import JobClaim, JobJournal
from facefleet.wire import DEAD_EXCHANGE, EventPayload, JobRequest, utcnow
from tests.unit.test_runner import FakePublisher, job_delivery, make_runner


def types(runner: JobRunner, job_id: str) -> list[str]:
    return [e.type for e in JobJournal(runner.storage, job_id).events()]


def delivery_of(job: JobRequest, tag: int) -> Delivery:
    props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
    return Delivery(tag, job.encode(), props, redelivered=False)


@dataclass
class Case:
    """One delivery of the mixed batch: how to set it up, and what must come of it."""

    setup: Callable[[JobRunner, JobRequest], Delivery]
    action: str
    events: list[str]
    code: str | None = None


def plain(runner: JobRunner, job: JobRequest) -> Delivery:
    return delivery_of(job, 1)


def already_completed(runner: JobRunner, job: JobRequest) -> Delivery:
    JobJournal(runner.storage, job.job_id).append("completed", None, lambda e: None)
    return delivery_of(job, 1)


def cancelled_before_start(runner: JobRunner, job: JobRequest) -> Delivery:
    runner.storage.request_cancel(job.job_id, "changed my mind")
    return delivery_of(job, 1)


def deadline_passed(runner: JobRunner, job: JobRequest) -> Delivery:
    return delivery_of(job.model_copy(update={"deadline": utcnow() - timedelta(seconds=1)}), 1)


def wrong_processor(runner: JobRunner, job: JobRequest) -> Delivery:
    return delivery_of(job.model_copy(update={"processor": "sleep"}), 1)


def media_missing(runner: JobRunner, job: JobRequest) -> Delivery:
    gone = runner.storage.uri(runner.storage.root) + "/nothing-here.jpg"
    return delivery_of(job.model_copy(update={"source_uri": gone}), 1)


def result_committed_before_a_crash(runner: JobRunner, job: JobRequest) -> Delivery:
    JobJournal(runner.storage, job.job_id).append("started", None, lambda e: None)
    return result_without_started(runner, job)


def result_without_started(runner: JobRunner, job: JobRequest) -> Delivery:
    result = runner.storage.result_dir(job.output_uri_prefix, job.job_id)
    result.mkdir(parents=True)
    (result / "result.json").write_text("{}")
    (result / "manifest.json").write_text(json.dumps({"result_file": "result.json"}))
    return delivery_of(job, 1)


def results_outside_the_data_root(runner: JobRunner, job: JobRequest) -> Delivery:
    return delivery_of(job.model_copy(update={"output_uri_prefix": "file:///etc/"}), 1)


def malformed(runner: JobRunner, job: JobRequest) -> Delivery:
    body = json.dumps({"schema": 999, "job_id": job.job_id}).encode()
    return Delivery(1, body, pika.BasicProperties(), redelivered=False)


CASES = {
    "fresh job": Case(plain, "ack", ["started", "completed"]),
    "another fresh job": Case(plain, "ack", ["started", "completed"]),
    "redelivery of a finished job": Case(already_completed, "ack", ["completed"]),
    "cancelled while queued": Case(cancelled_before_start, "ack", ["cancelled"]),
    "deadline passed": Case(deadline_passed, "ack", ["failed"], "deadline_exceeded"),
    "wants another processor": Case(wrong_processor, "ack", ["failed"], "invalid_request"),
    "source media missing": Case(media_missing, "ack", ["started", "failed"], "media_not_found"),
    "result committed, then a crash": Case(
        result_committed_before_a_crash, "ack", ["started", "completed"]
    ),
    "a result but no started (journal not synced)": Case(
        result_without_started, "ack", ["started", "completed"]
    ),
    "results outside the data root": Case(
        results_outside_the_data_root, "ack", ["failed"], "media_outside_data_root"
    ),
    "unknown schema version": Case(malformed, "ack", ["dead_lettered"], "unsupported_schema"),
}


def test_every_delivery_of_a_mixed_batch_gets_its_own_outcome(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, processor=NoopProcessor())
    jobs, deliveries = [], []
    for i, case in enumerate(CASES.values()):
        job, _ = job_delivery(runner)
        delivery = case.setup(runner, job)
        delivery.tag = i + 1
        jobs.append(job)
        deliveries.append(delivery)
    actions = runner.handle_batch(deliveries)
    for (name, case), job, action in zip(CASES.items(), jobs, actions, strict=True):
        events = JobJournal(runner.storage, job.job_id).events()
        assert action == case.action, name
        assert [e.type for e in events] == ["queued", *case.events], name
        assert [e.seq for e in events] == list(range(1, len(events) + 1)), name
        if case.code is not None:
            assert events[-1].payload.code == case.code, name
    publisher = runner.publisher
    assert isinstance(publisher, FakePublisher)
    assert [x[0] for x in publisher.published] == [DEAD_EXCHANGE]  # the malformed one
    assert runner.claims == {}
    for job in jobs:  # every claim and job lock was let go
        claim = JobClaim(runner.storage, job.job_id)
        assert claim.try_acquire()
        claim.release()


def test_the_same_job_twice_in_one_batch_runs_once(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, processor=NoopProcessor())
    job, _ = job_delivery(runner)
    actions = runner.handle_batch([delivery_of(job, 1), delivery_of(job, 2)])
    assert actions == ["ack", "ack"]
    assert types(runner, job.job_id) == ["queued", "started", "completed"]


def test_a_job_claimed_elsewhere_leaves_the_batch_and_is_given_back_when_draining(
    tmp_path: Path,
) -> None:
    runner = make_runner(tmp_path, processor=NoopProcessor())
    busy, _ = job_delivery(runner)
    other, _ = job_delivery(runner)
    elsewhere = JobClaim(runner.storage, busy.job_id)
    assert elsewhere.try_acquire()
    drain = threading.Timer(0.3, runner.draining.set)  # SIGTERM while the busy one waits
    drain.start()
    try:
        actions = runner.handle_batch([delivery_of(busy, 1), delivery_of(other, 2)])
    finally:
        drain.cancel()
        elsewhere.release()
    assert actions == ["give_back", "ack"]
    assert types(runner, busy.job_id) == []
    assert types(runner, other.job_id) == ["queued", "started", "completed"]


def test_a_batch_taken_while_draining_is_given_back_whole_without_starting(
    tmp_path: Path,
) -> None:
    """Deliveries that reach a slot after SIGTERM (a pipelined worker prefetches more than it
    runs) go back at once: nothing claimed, nothing started."""
    runner = make_runner(tmp_path, processor=NoopProcessor())
    jobs = [job_delivery(runner)[0] for _ in range(2)]
    runner.draining.set()
    actions = runner.handle_batch([delivery_of(job, i) for i, job in enumerate(jobs, 1)])
    assert actions == ["give_back", "give_back"]
    for job in jobs:
        assert types(runner, job.job_id) == []


def test_a_transient_failure_in_a_batch_retries_then_dead_letters_alone(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, processor=SleepProcessor(), max_attempts=2)
    flaky, _ = job_delivery(runner, fail="transient", sleep_s=0.01, steps=1)
    fine, _ = job_delivery(runner, sleep_s=0.01, steps=1)
    actions = runner.handle_batch([delivery_of(flaky, 1), delivery_of(fine, 2)])
    assert actions == ["ack", "ack"]
    flaky_types = [t for t in types(runner, flaky.job_id) if t != "progress"]
    assert flaky_types == ["queued", "started", "retrying", "dead_lettered"]
    assert [t for t in types(runner, fine.job_id) if t != "progress"] == [
        "queued",
        "started",
        "completed",
    ]


def test_progress_inside_a_batch_follows_started_in_seq_order(tmp_path: Path) -> None:
    """The processor's progress events go out while the batch holds the job locks."""
    runner = make_runner(tmp_path, processor=SleepProcessor(), progress_interval_s=0.0)
    jobs = [job_delivery(runner, sleep_s=0.03, steps=3)[0] for _ in range(3)]
    runner.handle_batch([delivery_of(j, i + 1) for i, j in enumerate(jobs)])
    publisher = runner.publisher
    assert isinstance(publisher, FakePublisher)
    for job in jobs:
        sent = [e for e in publisher.sent if e.job_id == job.job_id]
        assert [e.seq for e in sent] == sorted(e.seq for e in sent)
        # seq 1 is the producer's `queued`, recorded (and published again) by the first writer
        assert [e.type for e in sent[:2]] == ["queued", "started"]
        assert sent[-1].type == "completed"
        assert any(e.type == "progress" for e in sent)


@pytest.mark.parametrize("fsync", [True, False], ids=["synced", "unsynced"])
def test_a_batch_leaves_results_where_one_by_one_would(tmp_path: Path, fsync: bool) -> None:
    runner = make_runner(tmp_path, processor=NoopProcessor(), journal_fsync=fsync)
    job, _ = job_delivery(runner)
    runner.handle_batch([delivery_of(job, 1)])
    result = runner.storage.result_dir(job.output_uri_prefix, job.job_id)
    manifest: dict[str, Any] = json.loads((result / "manifest.json").read_text())
    assert manifest["job_id"] == job.job_id
    assert (result / manifest["result_file"]).is_file()
    done = JobJournal(runner.storage, job.job_id).events()[-1]
    assert done.payload == EventPayload(
        result_uri=(result / "result.json").as_uri(),
        manifest_uri=(result / "manifest.json").as_uri(),
        timings_s=done.payload.timings_s,
    )
    assert not list(result.parent.glob(".tmp-*"))
    assert uuid.UUID(job.job_id)


@pytest.mark.parametrize(
    "name", ["plain", "with space", "ünïcode", "percent%20sign", "hash#and?query"]
)
def test_completed_uris_are_what_pathlib_would_give(tmp_path: Path, name: str) -> None:
    from facefleet.consumer.runner import ResultRef, completed_payload
    from facefleet.media import FileMediaStore

    job_id = str(uuid.uuid4())
    result = tmp_path / name / job_id
    ref = ResultRef((tmp_path / name).as_uri() + "/", job_id)
    payload = completed_payload(FileMediaStore(tmp_path), ref, {"result_file": f"{name}.png"})
    assert payload.result_uri == (result / f"{name}.png").as_uri()
    assert payload.manifest_uri == (result / "manifest.json").as_uri()
