"""JobRunner bookkeeping that needs no broker. The publisher is a fake (it records, never sends);
the storage is real files in a temp dir."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import pytest

from facefleet.consumer.delivery import Delivery
from facefleet.consumer.giveback import give_back
from facefleet.consumer.metrics import WorkerMetrics
from facefleet.consumer.processors.base import JobContext, ProcessorOutput
from facefleet.consumer.processors.noop import NoopProcessor
from facefleet.consumer.processors.sleep import SleepProcessor
from facefleet.consumer.retry import claim_wait_s, retry_in_process
from facefleet.consumer.runner import JobRunner
from facefleet.journal import JobClaim, JobJournal
from facefleet.settings import WorkerSettings
from facefleet.storage import Storage
from facefleet.wire import (
    JOBS_EXCHANGE,
    CancelRequest,
    EventPayload,
    JobRequest,
    TierSpec,
    job_id_for_key,
    utcnow,
)


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.published: list[tuple[str, str, bytes, pika.BasicProperties]] = []
        self.fail: Exception | None = None

    def publish_event(self, event: Any) -> None:
        self.sent.append(event)

    def burst(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties
    ) -> None:
        if self.fail is not None:
            raise self.fail
        self.published.append((exchange, routing_key, body, properties))


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


# --- attempts, give-backs and the hold budget ---------------------------------------------------


def make_runner(
    tmp_path: Path, *, tier: TierSpec | None = None, processor: Any = None, **settings: Any
) -> JobRunner:
    return JobRunner(
        WorkerSettings(data_root=tmp_path, retry_base_s=0.01, retry_max_s=0.01, **settings),
        tier or TierSpec("standard", max_job_s=60),
        processor or SleepProcessor(),
        Storage(tmp_path),
        WorkerMetrics(),
        FakePublisher(),  # type: ignore[arg-type]
        "test-worker",
    )


def job_delivery(
    runner: JobRunner, *, headers: dict[str, Any] | None = None, held_s: float = 0.0, **options: Any
) -> tuple[JobRequest, Delivery]:
    media = runner.storage.root / "in.txt"
    media.write_text("x")
    uri = runner.storage.uri(media)
    key = uuid.uuid4().hex
    job = JobRequest(
        job_id=job_id_for_key(key),
        idempotency_key=key,
        tier=runner.tier.name,
        created_at=utcnow(),
        source_uri=uri,
        target_uri=uri,
        output_uri_prefix=runner.storage.default_output_prefix(),
        options=options,
    )
    props = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,
        message_id=job.job_id,
        headers={"x-facefleet-job-id": job.job_id, **(headers or {})},
    )
    delivery = Delivery(1, job.encode(), props, redelivered=bool(headers))
    delivery.received_at -= held_s
    return job, delivery


def events_of(runner: JobRunner, job: JobRequest) -> list[Any]:
    return JobJournal(runner.storage, job.job_id).events()


def test_attempts_count_retrying_events_not_the_brokers_delivery_count(tmp_path: Path) -> None:
    """Seven requeues (drains) in x-delivery-count are no failed attempts; two `retrying` events
    in the journal are, so with max_attempts 3 this delivery is the last attempt."""
    runner = make_runner(tmp_path, max_attempts=3)
    job, delivery = job_delivery(runner, headers={"x-delivery-count": 7}, fail="transient")
    journal = JobJournal(runner.storage, job.job_id)
    for n in (1, 2):
        journal.append("retrying", EventPayload(attempt=n), lambda e: None)
    assert runner.handle(delivery) == "ack"
    events = events_of(runner, job)
    assert [e.type for e in events] == [
        "queued",
        "retrying",
        "retrying",
        "started",
        "dead_lettered",
    ]
    assert events[3].payload.attempt == 3
    assert "gave up after 3 attempts" in (events[-1].payload.message or "")


def test_a_requeued_delivery_without_failures_starts_at_attempt_one(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, processor=NoopProcessor())
    job, delivery = job_delivery(runner, headers={"x-delivery-count": 7})
    assert runner.handle(delivery) == "ack"
    events = events_of(runner, job)
    assert [e.type for e in events] == ["queued", "started", "completed"]
    assert events[1].payload.attempt == 1


def test_give_back_republishes_a_fresh_copy_then_acks(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    job, delivery = job_delivery(
        runner,
        headers={
            "x-delivery-count": 3,
            "x-death": [{"reason": "rejected"}],
            "x-first-death-queue": "q",
        },
    )
    assert give_back(runner.publisher, runner.tier.name, delivery, runner.metrics) == "ack"
    publisher: FakePublisher = runner.publisher  # type: ignore[assignment]
    [(exchange, key, body, props)] = publisher.published
    assert (exchange, key, body) == (JOBS_EXCHANGE, "standard", delivery.body)
    assert props.headers == {"x-facefleet-job-id": job.job_id}  # broker headers dropped
    assert (props.message_id, props.delivery_mode) == (job.job_id, 2)


def test_give_back_falls_back_to_requeue_when_the_copy_is_not_confirmed(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    _, delivery = job_delivery(runner)
    runner.publisher.fail = TimeoutError("no confirm")  # type: ignore[attr-defined]
    assert give_back(runner.publisher, runner.tier.name, delivery, runner.metrics) == "requeue"


def test_a_job_claimed_elsewhere_is_given_back_when_draining(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    job, delivery = job_delivery(runner)
    other = make_runner(tmp_path)
    assert JobClaim(other.storage, job.job_id).try_acquire()
    drain = threading.Timer(0.3, runner.draining.set)  # SIGTERM while it waits for the claim
    drain.start()
    t0 = time.monotonic()
    try:
        assert runner.handle(delivery) == "give_back"
    finally:
        drain.cancel()
    assert time.monotonic() - t0 < claim_wait_s(runner.tier)  # the drain ended the wait


def test_a_job_claimed_elsewhere_is_given_back_once_the_claim_wait_is_spent(
    tmp_path: Path,
) -> None:
    runner = make_runner(tmp_path)
    job, delivery = job_delivery(runner, held_s=claim_wait_s(runner.tier) + 1)
    assert JobClaim(runner.storage, job.job_id).try_acquire()
    assert runner.handle(delivery) == "give_back"
    assert events_of(runner, job) == []


def test_a_retry_that_would_outlast_the_consumer_timeout_gives_the_job_back(
    tmp_path: Path,
) -> None:
    """Held 250 s of a 60 s tier's 300 s budget: the next full-length attempt would not fit."""
    runner = make_runner(tmp_path, max_attempts=5)
    job, delivery = job_delivery(runner, held_s=250, fail="transient")
    assert runner.tier.hold_budget_s() == 300
    assert runner.handle(delivery) == "give_back"
    assert [e.type for e in events_of(runner, job)] == ["queued", "started", "retrying"]


@pytest.mark.parametrize(
    ("max_job_s", "held_s", "delay_s", "here"),
    [
        pytest.param(600, 5, 1, True, id="quick-failure-retries-here"),
        pytest.param(600, 240, 0, True, id="exactly-fills-the-budget"),
        pytest.param(600, 240, 1, False, id="one-second-over-the-budget"),
        pytest.param(600, 600, 2, False, id="after-a-full-length-attempt-give-back"),
        pytest.param(60, 10, 60, True, id="short-tier-long-backoff-fits"),
        pytest.param(60, 200, 60, False, id="short-tier-backoff-pushes-past"),
        pytest.param(3600, 0, 0, True, id="batch-first-attempt"),
        pytest.param(3600, 3600, 1, False, id="batch-after-a-full-attempt"),
    ],
)
def test_retry_in_process_only_within_the_hold_budget(
    max_job_s: int, held_s: float, delay_s: float, here: bool
) -> None:
    """Budget = consumer timeout (max_job_s + 300 s) - 60 s; a retry needs backoff + one more
    full-length attempt to fit after what the delivery was already held."""
    tier = TierSpec("t", max_job_s=max_job_s)
    assert tier.hold_budget_s() == max_job_s + 240
    assert retry_in_process(tier, held_s, delay_s) is here


@pytest.mark.parametrize(
    ("max_job_s", "wait_s"),
    [
        pytest.param(60, 240, id="short-tier"),
        pytest.param(3600, 240, id="batch-tier"),
    ],
)
def test_claim_wait_leaves_room_for_one_full_attempt(max_job_s: int, wait_s: float) -> None:
    tier = TierSpec("t", max_job_s=max_job_s)
    assert claim_wait_s(tier) == wait_s
    assert claim_wait_s(tier) + tier.max_job_s < tier.consumer_timeout_ms() / 1000


class GaugeProbe:
    """Reads the busy gauge from inside a running job."""

    name = "probe"

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self.seen: list[float] = []

    def warm_up(self) -> None:
        return None

    def run(self, ctx: JobContext) -> ProcessorOutput:
        self.seen.append(self.metrics.registry.get_sample_value("facefleet_worker_busy_jobs") or 0)
        (ctx.output_dir / "r.txt").write_text("ok")
        return ProcessorOutput("r.txt")


def test_busy_gauge_counts_the_running_job(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    probe = GaugeProbe(runner.metrics)
    runner.processor = probe
    _, delivery = job_delivery(runner)
    assert runner.handle(delivery) == "ack"
    assert probe.seen == [1.0]
    assert runner.metrics.registry.get_sample_value("facefleet_worker_busy_jobs") == 0


def test_results_outside_the_data_root_fail_the_job_instead_of_looping(tmp_path: Path) -> None:
    """Bad input, not a crash: before, the StorageError escaped and the delivery was requeued
    until the broker's delivery limit dead-lettered it without a word."""
    runner = make_runner(tmp_path, processor=NoopProcessor())
    job, _ = job_delivery(runner)
    bad = job.model_copy(update={"output_uri_prefix": "file:///etc/"})
    delivery = Delivery(1, bad.encode(), pika.BasicProperties(), redelivered=False)
    assert runner.handle(delivery) == "ack"
    queued, event = events_of(runner, job)
    assert queued.type == "queued"
    assert (event.type, event.payload.code) == ("failed", "media_outside_data_root")
    assert "outside the data root" in (event.payload.message or "")


def test_a_submission_with_results_outside_the_data_root_is_refused(tmp_path: Path) -> None:
    from facefleet.media import FileMediaStore
    from facefleet.producer.errors import InvalidJobError
    from facefleet.producer.sdk import build_request

    store = FileMediaStore(tmp_path)
    media = tmp_path / "in.txt"
    media.write_text("x")
    with pytest.raises(InvalidJobError, match="outside the data root"):
        build_request(store, "standard", str(media), str(media), output_uri_prefix="/etc/")


class StagedProbe:
    """A processor that reports two stages, as the faceswap pipeline does in timings_s."""

    name = "staged"

    def warm_up(self) -> None:
        return None

    def run(self, ctx: JobContext) -> ProcessorOutput:
        (ctx.output_dir / "r.txt").write_text("ok")
        return ProcessorOutput("r.txt", timings_s={"decode": 0.02, "swap": 0.7})


def test_stage_durations_of_a_completed_job_are_observed(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, processor=StagedProbe())
    _, delivery = job_delivery(runner)
    assert runner.handle(delivery) == "ack"
    reg = runner.metrics.registry
    name = "facefleet_stage_duration_seconds"
    for stage, seconds in (("decode", 0.02), ("swap", 0.7)):
        labels = {"tier": "standard", "stage": stage}
        assert reg.get_sample_value(f"{name}_count", labels) == 1
        assert reg.get_sample_value(f"{name}_sum", labels) == pytest.approx(seconds)
    assert reg.get_sample_value(f"{name}_count", {"tier": "standard", "stage": "total"}) == 1


def test_a_prefetched_job_not_started_is_given_back_at_once_when_draining(tmp_path: Path) -> None:
    """A pipelined worker holds more deliveries than it runs; on SIGTERM the ones that have not
    started go back at once: no claim taken, no `started`, nothing run."""
    runner = make_runner(tmp_path, processor=NoopProcessor())
    job, delivery = job_delivery(runner)
    runner.draining.set()
    assert runner.handle(delivery) == "give_back"
    assert [e.type for e in events_of(runner, job)] == []
    assert JobClaim(runner.storage, job.job_id).try_acquire()  # no claim was left behind


class CheckpointLoop:
    """A processor that only reaches checkpoints until the job is cancelled (or 10 s pass)."""

    name = "checkpoints"

    def __init__(self) -> None:
        self.checkpoints = 0

    def warm_up(self) -> None:
        return None

    def run(self, ctx: JobContext) -> ProcessorOutput:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ctx.checkpoint()
            self.checkpoints += 1
            time.sleep(0.001)
        raise AssertionError("never cancelled")


def test_a_cancel_only_the_store_knows_reaches_a_running_job_by_the_poll(tmp_path: Path) -> None:
    """A cancel the control exchange never brought (recorded in the store alone) still ends a
    running job, within FACEFLEET_CANCEL_POLL_S; and the store is asked on that period, not at
    every checkpoint."""
    processor = CheckpointLoop()
    runner = make_runner(tmp_path, processor=processor, cancel_poll_s=0.2)
    asked: list[float] = []
    real = runner.store.cancel_reasons

    def counting(job_ids: Any) -> dict[str, str]:
        asked.append(time.monotonic())
        return real(job_ids)

    runner.store.cancel_reasons = counting  # type: ignore[method-assign]
    job, delivery = job_delivery(runner)
    threading.Timer(0.5, runner.store.request_cancel, (job.job_id, "store only")).start()
    t0 = time.monotonic()
    assert runner.handle(delivery) == "ack"
    assert time.monotonic() - t0 < 5
    events = events_of(runner, job)
    assert events[-1].type == "cancelled" and events[-1].payload.message == "store only"
    assert processor.checkpoints > 10 * len(asked)  # polled, not asked per checkpoint


# --- which progress a job reports ----------------------------------------------------------------


class ScriptedStages:
    """Reports the stages of its script, sleeping each one's seconds after reporting it."""

    name = "scripted"

    def __init__(self, script: list[tuple[str, float]]) -> None:
        self.script = script

    def warm_up(self) -> None:
        return None

    def run(self, ctx: JobContext) -> ProcessorOutput:
        for stage, seconds in self.script:
            ctx.progress(0.5, stage)
            time.sleep(seconds)
        (ctx.output_dir / "r.txt").write_text("ok")
        return ProcessorOutput("r.txt")


@pytest.mark.parametrize(
    ("interval_s", "script", "reported"),
    [
        pytest.param(
            0.3,
            [("decode", 0.0), ("detect", 0.0), ("swap", 0.0), ("encode", 0.0)],
            [],
            id="a-job-shorter-than-the-interval-reports-no-progress",
        ),
        pytest.param(
            0.3,
            [("decode", 0.0), ("detect", 0.4), ("swap", 0.0), ("encode", 0.0)],
            ["swap", "encode"],
            id="after-the-first-interval-every-stage-change-is-reported",
        ),
        pytest.param(
            0.3,
            [("detect", 0.4), ("detect", 0.0), ("detect", 0.4), ("detect", 0.0)],
            ["detect", "detect"],
            id="within-a-stage-at-most-one-event-per-interval",
        ),
        pytest.param(
            0.0,
            [("decode", 0.0), ("detect", 0.0), ("swap", 0.0), ("encode", 0.0)],
            ["decode", "detect", "swap", "encode"],
            id="interval-zero-reports-every-stage",
        ),
    ],
)
def test_which_progress_a_job_reports(
    tmp_path: Path, interval_s: float, script: list[tuple[str, float]], reported: list[str]
) -> None:
    runner = make_runner(tmp_path, processor=ScriptedStages(script), progress_interval_s=interval_s)
    job, delivery = job_delivery(runner)
    assert runner.handle(delivery) == "ack"
    events = events_of(runner, job)
    assert [e.payload.stage for e in events if e.type == "progress"] == reported
    assert [e.type for e in events if e.type != "progress"] == ["queued", "started", "completed"]
