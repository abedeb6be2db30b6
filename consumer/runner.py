"""What happens to one delivery: decode, claim, process, commit the result, emit the events.

The worker (consumer/worker.py) owns the connection and the life cycle; the runner owns the job:
it never touches AMQP except through the confirming publisher, so it runs on job threads.

    delivery ─ decode ──(bad)──▶ dead letter with reason, `dead_lettered` if a job id is readable
                 │
                 ├─ journal already ended ─▶ ack (a redelivery never completes twice)
                 ├─ claim (wait while another live worker holds the job)
                 ├─ result already committed ─▶ `completed`, ack (crash after commit)
                 ├─ cancelled / deadline passed / wrong processor ─▶ terminal event, ack
                 └─ `started`, run the processor; transient errors retry with backoff, then
                    dead-letter; permanent ones fail; success commits the result, `completed`, ack

Giving a job back on purpose (SIGTERM drain, shutdown, claim still busy, a retry that would
outlast the consumer timeout) is "give_back": the worker publishes a fresh confirmed copy to the
jobs exchange and acks the original only after the confirm (falling back to nack-requeue). Up to
RabbitMQ 4.2 every requeue counts towards x-delivery-limit (anchors.md B7), so requeueing on
purpose would spend the limit that exists to stop crash loops. Attempts are counted from the
journal's `retrying` events for the same reason, not from x-delivery-count.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika

from consumer.delivery import Action, Delivery
from consumer.errors import (
    JobCancelled,
    JobError,
    PermanentJobError,
    ShutdownRequested,
    TransientJobError,
    classify,
)
from consumer.metrics import WorkerMetrics
from consumer.processors.base import Processor, ProcessorOutput
from facefleet.amqp import ThreadedPublisher
from facefleet.journal import JobClaim, JobJournal
from facefleet.settings import WorkerSettings
from facefleet.storage import Storage, StorageError
from facefleet.wire import (
    CONTENT_TYPE,
    DEAD_EXCHANGE,
    HEADER_DEAD_CODE,
    HEADER_DEAD_REASON,
    JOBS_EXCHANGE,
    CancelRequest,
    DecodeError,
    ErrorCode,
    EventPayload,
    EventType,
    JobEvent,
    JobRequest,
    TierSpec,
    utcnow,
)

log = logging.getLogger(__name__)

BROKER_HEADERS = ("x-delivery-count", "x-death", "x-first-death-", "x-last-death-")
"""Headers (or prefixes) the broker sets on a delivery; a given-back copy starts without them."""


def retry_in_process(tier: TierSpec, held_s: float, delay_s: float) -> bool:
    """May the next attempt run on this delivery? Only if the backoff plus one more full-length
    attempt still ends inside the tier's hold budget (its consumer timeout less a minute);
    otherwise the job is given back, so no delivery is held into the consumer timeout."""
    return held_s + delay_s + tier.max_job_s <= tier.hold_budget_s()


CLAIM_POLL_S = 0.25
"""How often a delivery waiting for another worker's claim tries again (a non-blocking flock)."""


def claim_wait_s(tier: TierSpec) -> float:
    """Longest wait for another worker's claim on a job: whatever of the hold budget one
    full-length attempt after the wait leaves."""
    return max(0.0, tier.hold_budget_s() - tier.max_job_s)


def fresh_properties(props: pika.BasicProperties) -> pika.BasicProperties:
    """The properties of a given-back copy: the job's own, without the broker's headers."""
    headers = {
        k: v
        for k, v in (props.headers or {}).items()
        if not any(k == h or (h.endswith("-") and k.startswith(h)) for h in BROKER_HEADERS)
    }
    return pika.BasicProperties(
        content_type=props.content_type or CONTENT_TYPE,
        delivery_mode=props.delivery_mode or pika.DeliveryMode.Persistent,
        message_id=props.message_id,
        timestamp=props.timestamp,
        headers=headers,
    )


class RunContext:
    """The JobContext a processor sees: progress with rate limiting, cancellation checkpoints."""

    def __init__(
        self,
        runner: JobRunner,
        job: JobRequest,
        journal: JobJournal,
        source_path: Path,
        target_path: Path,
        output_dir: Path,
    ) -> None:
        self.runner = runner
        self.job = job
        self.journal = journal
        self.source_path = source_path
        self.target_path = target_path
        self.output_dir = output_dir
        self._last_progress = 0.0
        self._last_stage: str | None = None

    def progress(
        self,
        fraction: float,
        stage: str,
        *,
        eta_s: float | None = None,
        frames_done: int | None = None,
        frames_total: int | None = None,
    ) -> None:
        self.checkpoint()
        now = time.monotonic()
        # Every stage change is reported; within a stage, at most one event per interval.
        if (
            stage == self._last_stage
            and fraction < 1.0
            and now - self._last_progress < self.runner.settings.progress_interval_s
        ):
            return
        self._last_progress = now
        self._last_stage = stage
        self.runner.emit(
            self.journal,
            "progress",
            EventPayload(
                fraction=max(0.0, min(1.0, fraction)),
                stage=stage,
                eta_s=None if eta_s is None else round(eta_s, 2),
                frames_done=frames_done,
                frames_total=frames_total,
            ),
            wait=False,
        )

    def checkpoint(self) -> None:
        reason = self.runner.cancel_reason(self.job.job_id)
        if reason is not None:
            raise JobCancelled(reason or "cancelled")
        if self.runner.stop_jobs.is_set():
            raise ShutdownRequested("worker is shutting down")


class JobRunner:
    def __init__(
        self,
        settings: WorkerSettings,
        tier: TierSpec,
        processor: Processor,
        storage: Storage,
        metrics: WorkerMetrics,
        publisher: ThreadedPublisher,
        name: str,
    ) -> None:
        self.settings = settings
        self.tier = tier
        self.processor = processor
        self.storage = storage
        self.metrics = metrics
        self.publisher = publisher
        self.name = name
        self.draining = threading.Event()
        """Set on SIGTERM: no new claims, backoff sleeps end and the job is given back."""
        self.stop_jobs = threading.Event()
        """Set when the drain deadline passed: running jobs stop at their next checkpoint."""
        self.cancelled: dict[str, str] = {}
        """Cancels received over AMQP for jobs running here (the durable marker covers the rest)."""
        self.claims: dict[str, JobClaim] = {}

    def emit(
        self,
        journal: JobJournal,
        event_type: EventType,
        payload: EventPayload,
        *,
        wait: bool = True,
    ) -> JobEvent | None:
        return journal.append(event_type, payload, self.publisher.publish_event, wait=wait)

    def cancel_reason(self, job_id: str) -> str | None:
        return self.cancelled.get(job_id) or self.storage.cancel_reason(job_id)

    def handle(self, delivery: Delivery, on_job: Callable[[str], None] | None = None) -> Action:
        """Process one delivery; returns what to do with it: 'ack' or 'give_back'.

        on_job is told the job id as soon as the body is decoded (the worker's bookkeeping).
        """
        try:
            job = JobRequest.decode(delivery.body)
        except DecodeError as exc:
            self._dead_letter_malformed(delivery, exc)
            return "ack"
        if on_job is not None:
            on_job(job.job_id)
        journal = JobJournal(self.storage, job.job_id, fsync=self.settings.journal_fsync)
        tier = self.tier.name
        done = journal.terminal()
        if done is not None:
            log.info("job %s already ended (%s); acking duplicate delivery", job.job_id, done.type)
            self.metrics.duplicates.labels(tier).inc()
            return "ack"
        claim = JobClaim(self.storage, job.job_id, self.name)
        if not self._wait_for_claim(claim, delivery):
            return "give_back"
        self.claims[job.job_id] = claim
        self.metrics.busy.inc()
        try:
            return self._run_claimed(job, journal, delivery)
        finally:
            self.metrics.busy.dec()
            self.claims.pop(job.job_id, None)
            self.cancelled.pop(job.job_id, None)
            claim.release()

    def _wait_for_claim(self, claim: JobClaim, delivery: Delivery) -> bool:
        """Another live worker runs this job (a duplicate submit/delivery): wait for it, while
        not draining and while a full-length run after the wait still fits the hold budget."""
        limit = claim_wait_s(self.tier)
        while True:
            if claim.try_acquire():
                return True
            if self.draining.is_set():
                return False
            if time.monotonic() - delivery.received_at > limit:
                log.info(
                    "job %s: still claimed elsewhere after %.0f s; giving it back",
                    claim.job_id,
                    limit,
                )
                return False
            time.sleep(CLAIM_POLL_S)

    def attempts_so_far(self, journal: JobJournal) -> int:
        """Failed attempts of a job: its `retrying` events (on any worker, any delivery)."""
        return sum(1 for e in journal.events() if e.type == "retrying")

    def give_back(self, delivery: Delivery) -> Action:
        """Return a job on purpose without spending its delivery limit: publish a fresh copy
        (same body and properties) with confirm, then the original is acked; if the copy is not
        confirmed, nack-requeue the original instead (that one counts towards the limit)."""
        try:
            self.publisher.publish(
                JOBS_EXCHANGE, self.tier.name, delivery.body, fresh_properties(delivery.properties)
            )
        except Exception as exc:
            log.warning(
                "could not republish a given-back job (%s: %s); requeueing the delivery instead",
                type(exc).__name__,
                exc,
            )
            return "requeue"
        self.metrics.jobs.labels(self.tier.name, "given_back").inc()
        return "ack"

    def _run_claimed(self, job: JobRequest, journal: JobJournal, delivery: Delivery) -> Action:
        tier = self.tier.name
        if journal.terminal() is not None:
            self.metrics.duplicates.labels(tier).inc()
            return "ack"
        result_dir = self.storage.result_dir(job.output_uri_prefix, job.job_id)
        manifest = self.storage.read_manifest(result_dir)
        if manifest is not None:
            # Crashed after committing the result but before `completed`: finish the bookkeeping.
            self._emit_completed(journal, result_dir, manifest)
            return "ack"
        reason = self.cancel_reason(job.job_id)
        if reason is not None:
            self.emit(journal, "cancelled", EventPayload(code=None, message=reason))
            self.metrics.jobs.labels(tier, "cancelled").inc()
            return "ack"
        if job.deadline is not None and job.deadline < utcnow():
            return self._fail(
                journal,
                PermanentJobError(
                    "deadline_exceeded",
                    f"deadline {job.deadline.isoformat()} passed before the job started",
                ),
            )
        if job.processor is not None and job.processor != self.processor.name:
            return self._fail(
                journal,
                PermanentJobError(
                    "invalid_request",
                    f"job wants processor {job.processor!r}, this tier runs {self.processor.name!r}",
                ),
            )

        attempt = self.attempts_so_far(journal) + 1
        wait_s = max(0.0, (utcnow() - job.created_at).total_seconds())
        self.metrics.queue_wait.labels(tier).observe(wait_s)
        self.emit(
            journal,
            "started",
            EventPayload(worker=self.name, attempt=attempt, queue_wait_s=round(wait_s, 3)),
            wait=False,
        )
        while True:
            t0 = time.monotonic()
            outcome = self._attempt(job, journal, result_dir)
            self.metrics.duration.labels(tier).observe(time.monotonic() - t0)
            if isinstance(outcome, str):
                return outcome
            err = outcome
            if attempt >= self.settings.max_attempts:
                return self._dead_letter_job(job, journal, err, attempt)
            delay = min(
                self.settings.retry_max_s,
                err.delay_s
                if err.delay_s is not None
                else self.settings.retry_base_s * 2 ** (attempt - 1),
            ) * random.uniform(0.8, 1.2)
            self.emit(
                journal,
                "retrying",
                EventPayload(
                    attempt=attempt,
                    delay_s=round(delay, 2),
                    code=err.code,
                    message=err.message,
                    retryable=True,
                ),
            )
            self.metrics.jobs.labels(tier, "retried").inc()
            held = time.monotonic() - delivery.received_at
            if not retry_in_process(self.tier, held, delay):
                # One more attempt on this delivery could outlast the consumer timeout: wait out
                # the backoff if that still fits, then give the job back as a fresh delivery.
                log.info(
                    "job %s: attempt %d would not fit the %.0f s hold budget; giving it back",
                    job.job_id,
                    attempt + 1,
                    self.tier.hold_budget_s(),
                )
                if held + delay <= self.tier.hold_budget_s():
                    self.draining.wait(delay)
                return "give_back"
            if self.draining.wait(delay):
                return "give_back"
            attempt += 1

    def _attempt(
        self, job: JobRequest, journal: JobJournal, result_dir: Path
    ) -> Action | TransientJobError:
        tier = self.tier.name
        work_dir: Path | None = None
        try:
            try:
                source = self.storage.resolve(job.source_uri)
                target = self.storage.resolve(job.target_uri)
            except StorageError as exc:
                raise PermanentJobError(exc.code, exc.message) from exc
            for label, path in (("source", source), ("target", target)):
                if not path.is_file():
                    raise PermanentJobError("media_not_found", f"{label} {path} does not exist")
            work_dir = self.storage.new_work_dir(result_dir)
            ctx = RunContext(self, job, journal, source, target, work_dir)
            started = time.monotonic()
            output: ProcessorOutput = self.processor.run(ctx)
            ctx.checkpoint()
            manifest = {
                "job_id": job.job_id,
                "tier": job.tier,
                "processor": self.processor.name,
                "worker": self.name,
                "result_file": output.result_file,
                "source_uri": job.source_uri,
                "target_uri": job.target_uri,
                "options": job.options,
                "timings_s": {**output.timings_s, "total": round(time.monotonic() - started, 4)},
                "details": output.details,
                "completed_at": datetime.now(UTC).isoformat(),
            }
            committed = self.storage.commit_result(work_dir, result_dir, manifest)
            work_dir = None
            if not committed:
                log.info(
                    "job %s: another delivery committed first; not completing twice", job.job_id
                )
                self.metrics.duplicates.labels(tier).inc()
                return "ack"
            self._emit_completed(journal, result_dir, manifest)
            return "ack"
        except JobCancelled as exc:
            self.emit(journal, "cancelled", EventPayload(message=exc.reason))
            self.metrics.jobs.labels(tier, "cancelled").inc()
            return "ack"
        except ShutdownRequested:
            log.info("job %s interrupted by shutdown; giving it back", job.job_id)
            self.metrics.jobs.labels(tier, "requeued").inc()
            return "give_back"
        except Exception as exc:  # mapped at this boundary
            err = classify(exc)
            if isinstance(err, PermanentJobError):
                return self._fail(journal, err)
            if isinstance(err, TransientJobError):
                log.warning("job %s transient error: %s", job.job_id, err)
                return err
            if isinstance(err, JobError):
                return self._fail(journal, PermanentJobError(err.code, err.message))
            raise
        finally:
            if work_dir is not None:
                shutil.rmtree(work_dir, ignore_errors=True)

    def _emit_completed(
        self, journal: JobJournal, result_dir: Path, manifest: dict[str, Any]
    ) -> None:
        result_file = str(manifest.get("result_file", ""))
        timings = {k: float(v) for k, v in dict(manifest.get("timings_s", {})).items()}
        self.emit(
            journal,
            "completed",
            EventPayload(
                result_uri=(result_dir / result_file).as_uri(),
                manifest_uri=(result_dir / "manifest.json").as_uri(),
                timings_s=timings,
            ),
        )
        self.metrics.jobs.labels(self.tier.name, "completed").inc()

    def _fail(self, journal: JobJournal, err: JobError) -> Action:
        self.emit(
            journal, "failed", EventPayload(code=err.code, message=err.message, retryable=False)
        )
        self.metrics.jobs.labels(self.tier.name, "failed").inc()
        return "ack"

    def _dead_letter_job(
        self, job: JobRequest, journal: JobJournal, err: JobError, attempts: int
    ) -> Action:
        message = f"gave up after {attempts} attempts: {err.message}"
        self._publish_dead(job.encode(), err.code, message, job.job_id)
        self.emit(
            journal, "dead_lettered", EventPayload(code=err.code, message=message, retryable=False)
        )
        self.metrics.jobs.labels(self.tier.name, "dead_lettered").inc()
        return "ack"

    def _dead_letter_malformed(self, delivery: Delivery, exc: DecodeError) -> None:
        """Park an unreadable message with its reason; emit an event if a job id is readable."""
        job_id = _loose_job_id(delivery.body)
        self._publish_dead(delivery.body, exc.code, exc.reason, job_id)
        self.metrics.jobs.labels(self.tier.name, "malformed").inc()
        log.warning("dead-lettered malformed message (job %s): %s", job_id, exc.reason)
        if job_id is not None:
            journal = JobJournal(self.storage, job_id, fsync=self.settings.journal_fsync)
            self.emit(
                journal,
                "dead_lettered",
                EventPayload(code=exc.code, message=exc.reason, retryable=False),
            )

    def _publish_dead(self, body: bytes, code: str, reason: str, job_id: str | None) -> None:
        self.publisher.publish(
            DEAD_EXCHANGE,
            self.tier.name,
            body,
            pika.BasicProperties(
                content_type=CONTENT_TYPE,
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=job_id,
                headers={
                    HEADER_DEAD_REASON: reason[:1000],
                    HEADER_DEAD_CODE: code,
                    "x-facefleet-tier": self.tier.name,
                    "x-facefleet-worker": self.name,
                },
            ),
        )

    def broker_dead_letter(self, headers: dict[str, Any], body: bytes) -> Callable[[], None] | None:
        """For a dead letter the broker made itself (delivery limit: workers kept dying on the
        job), the task that emits the job's `dead_lettered` event; None when there is nothing to
        tell (our own dead letters already emitted theirs, foreign messages have no job)."""
        if HEADER_DEAD_REASON in headers:
            return None
        reason = _first_death_reason(headers)
        try:
            job = JobRequest.decode(body)
        except DecodeError:
            return None
        code: ErrorCode = "delivery_limit" if reason == "delivery_limit" else "internal_error"
        message = (
            f"dead-lettered by the broker ({reason}): the job's deliveries failed "
            f"{self.tier.delivery_limit} times, e.g. the worker crashed on it"
        )
        journal = JobJournal(self.storage, job.job_id, fsync=self.settings.journal_fsync)
        payload = EventPayload(code=code, message=message, retryable=False)

        def task() -> None:
            self.emit(journal, "dead_lettered", payload)

        return task

    def note_cancel(self, req: CancelRequest) -> None:
        """A cancel request from the control exchange: make it durable for whichever worker
        takes the job, and remember it here only while this worker runs that job (every worker
        sees every cancel, so remembering all of them would grow without bound)."""
        if req.job_id in self.claims:
            self.cancelled[req.job_id] = req.reason
        try:
            if self.storage.cancel_reason(req.job_id) is None:
                self.storage.request_cancel(req.job_id, req.reason)
        except (OSError, ValueError) as exc:
            log.warning("could not persist cancel of %s: %s", req.job_id, exc)


def _first_death_reason(headers: dict[str, Any]) -> str:
    reason = headers.get("x-first-death-reason")
    if reason is None:
        deaths = headers.get("x-death") or []
        if deaths and isinstance(deaths[0], dict):
            reason = deaths[0].get("reason")
    if isinstance(reason, bytes):
        reason = reason.decode()
    return str(reason or "unknown")


def _loose_job_id(body: bytes) -> str | None:
    try:
        raw = json.loads(body)
        value = raw.get("job_id") if isinstance(raw, dict) else None
        return str(uuid.UUID(str(value))) if value else None
    except (ValueError, TypeError, AttributeError):
        return None
