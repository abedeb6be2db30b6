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

The batch lane (`handle_batch`, `--batch N`) takes the same steps for many short jobs at once,
with one filesystem sync per step for the whole batch instead of an fsync per file and event.

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
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from consumer.inputs import Inputs, Scratch, fetch_policy
from consumer.metrics import WorkerMetrics
from consumer.processors.base import Processor, ProcessorOutput
from facefleet.amqp import ThreadedPublisher
from facefleet.jobstore import (
    Claim,
    JobLog,
    JobStore,
    attempts_since_replay,
    gpu_seconds_of,
    last_replay_seq,
    replay_generation,
    store_outage,
)
from facefleet.journal import FileJobStore
from facefleet.media import FileMediaStore, MediaStore, Staged
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
    queued_event,
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


@dataclass
class Produced:
    """A processor's finished work dir and the manifest to commit with it."""

    work_dir: Path
    manifest: dict[str, Any]


@dataclass
class Batched:
    """One job of a batch, from its claim to its outcome."""

    index: int
    delivery: Delivery
    job: JobRequest
    journal: JobLog
    claim: Claim
    ref: ResultRef
    attempt: int = 1
    staged: Staged | None = None
    t0: float = 0.0
    produced: Produced | None = None
    action: Action | None = None
    retry: TransientJobError | None = None


@dataclass(frozen=True)
class ResultRef:
    """Where a job's result goes: <prefix>/<job_id>/ in the media store (checked to lie there)."""

    prefix: str
    job_id: str


def completed_payload(media: MediaStore, ref: ResultRef, manifest: dict[str, Any]) -> EventPayload:
    result_file = str(manifest.get("result_file", ""))
    timings = {k: float(v) for k, v in dict(manifest.get("timings_s", {})).items()}
    return EventPayload(
        result_uri=media.result_uri(ref.prefix, ref.job_id, result_file),
        manifest_uri=media.result_uri(ref.prefix, ref.job_id, "manifest.json"),
        timings_s=timings,
    )


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
        journal: JobLog,
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
        storage: Storage | None,
        metrics: WorkerMetrics,
        publisher: ThreadedPublisher,
        name: str,
        *,
        media: MediaStore | None = None,
        store: JobStore | None = None,
    ) -> None:
        self.settings = settings
        self.tier = tier
        self.processor = processor
        self._storage = storage
        self.store: JobStore = store or FileJobStore(self.storage)
        """Job state (FACEFLEET_STORE_URL); the journals in the data root by default."""
        self.media: MediaStore = media or FileMediaStore(self.storage)
        """Inputs and results (FACEFLEET_MEDIA_URL); the data root by default."""
        self._results_with_logs = False
        self._results_sync = self._how_to_sync_results()
        self.inputs = Inputs(
            self.media, lambda: self.storage, fetch_policy(settings), settings.media_max_bytes
        )
        self.metrics = metrics
        self.publisher = publisher
        self.name = name
        self.draining = threading.Event()
        """Set on SIGTERM: no new claims, backoff sleeps end and the job is given back."""
        self.stop_jobs = threading.Event()
        """Set when the drain deadline passed: running jobs stop at their next checkpoint."""
        self.cancelled: dict[str, str] = {}
        """Cancels received over AMQP for jobs running here (the durable marker covers the rest)."""
        self.claims: dict[str, Claim] = {}
        self.on_store_outage: Callable[[BaseException], None] | None = None
        """Told when the job store stopped answering (the worker pauses consuming)."""

    @property
    def storage(self) -> Storage:
        """The workers' data root, made on first use: with a PostgreSQL job store and s3 media a
        worker may have none (a read-only root filesystem, no volume)."""
        if self._storage is None:
            self._storage = Storage(self.settings.data_root)
        return self._storage

    def _result_ref(self, job: JobRequest) -> ResultRef:
        """Where the job's result goes; StorageError if its prefix lies outside the store."""
        self.media.check_output_prefix(job.output_uri_prefix)
        return ResultRef(job.output_uri_prefix, job.job_id)

    def _journal(self, job: JobRequest) -> JobLog:
        """The job's journal; its first writer records the producer's `queued` (seq 1)."""
        return self.store.log(
            job.job_id, fsync=self.settings.journal_fsync, queued=queued_event(job)
        )

    def emit(
        self,
        journal: JobLog,
        event_type: EventType,
        payload: EventPayload,
        *,
        wait: bool = True,
    ) -> JobEvent | None:
        event = journal.append(event_type, payload, self.publisher.publish_event, wait=wait)
        if event is not None and event.terminal:
            self._count_ended(journal, event)
        return event

    def _count_ended(self, journal: JobLog, event: JobEvent) -> None:
        """Per-key usage counters for a job that just ended here (its owner from its
        `queued` event); never fails the job."""
        try:
            events = journal.events()
            key = events[0].payload.api_key_id if events else None
        except Exception as exc:
            log.debug("job %s: usage not counted (%r)", event.job_id, exc)
            return
        self._count_usage(
            key, event.type, gpu_seconds_of(event) if event.type == "completed" else None
        )

    def _count_usage(self, api_key_id: str | None, outcome: str, gpu_seconds: float | None) -> None:
        key = api_key_id or ""
        self.metrics.key_jobs.labels(self.tier.name, key, outcome).inc()
        if gpu_seconds:
            self.metrics.gpu_seconds.labels(self.tier.name, key).inc(gpu_seconds)

    def cancel_reason(self, job_id: str) -> str | None:
        return self.cancelled.get(job_id) or self.store.cancel_reason(job_id)

    def handle(self, delivery: Delivery, on_job: Callable[[str], None] | None = None) -> Action:
        """Process one delivery; returns what to do with it: 'ack' or 'give_back'.

        on_job is told the job id as soon as the body is decoded (the worker's bookkeeping).
        If the job store stops answering, the job is given back (a fresh copy, so the delivery
        limit is not spent) and the worker is told, to pause until the store answers.
        """
        try:
            return self._handle(delivery, on_job)
        except Exception as exc:
            if not store_outage(exc):
                raise
            self._store_outage(exc)
            return "give_back"

    def _store_outage(self, exc: BaseException) -> None:
        log.warning("job store unavailable (%s: %s); giving jobs back", type(exc).__name__, exc)
        if self.on_store_outage is not None:
            self.on_store_outage(exc)

    def _handle(self, delivery: Delivery, on_job: Callable[[str], None] | None) -> Action:
        try:
            job = JobRequest.decode(delivery.body)
        except DecodeError as exc:
            self._dead_letter_malformed(delivery, exc)
            return "ack"
        if on_job is not None:
            on_job(job.job_id)
        journal = self._journal(job)
        tier = self.tier.name
        done = journal.terminal()
        if done is not None:
            log.info("job %s already ended (%s); acking duplicate delivery", job.job_id, done.type)
            self.metrics.duplicates.labels(tier).inc()
            return "ack"
        claim = self.store.claim(job.job_id)
        if not self._wait_for_claim(claim, delivery):
            return "give_back"
        self.claims[job.job_id] = claim
        self.metrics.busy.inc()
        try:
            return self._run_claimed(job, journal, delivery)
        finally:
            self._release(claim)

    def handle_batch(
        self,
        deliveries: Sequence[Delivery],
        on_job: Callable[[Delivery, str], None] | None = None,
    ) -> list[Action]:
        """The batch lane (`--batch N`, for short jobs): each delivery gets the same steps and
        outcome as in `handle`, but each durability point is one `store.sync(logs)` for the whole
        batch instead of an fsync per file and event, and events are published pipelined.

        Order per batch: claims; journal locks (in job-id order, on the claims' descriptors);
        `started` written for all; the processors run one after the other and their results
        are staged; sync; `started` published; results renamed into place; sync; `completed`
        written; sync; published; all confirms awaited; locks released. A delivery off the
        common path (its claim held elsewhere, a retry after a transient error, a result
        directory it may not use) finishes through the one-by-one path after the batch.
        """
        actions: list[Action | None] = [None] * len(deliveries)
        batch: list[Batched] = []
        for i, delivery in enumerate(deliveries):
            try:
                job = JobRequest.decode(delivery.body)
            except DecodeError as exc:
                self._dead_letter_malformed(delivery, exc)
                actions[i] = "ack"
                continue
            if on_job is not None:
                on_job(delivery, job.job_id)
            try:
                ref = self._result_ref(job)
            except StorageError:
                continue  # one by one below, which fails the job with the reason
            journal = self._journal(job)
            claim = self.store.claim(job.job_id)
            try:
                acquired = claim.try_acquire()
            except Exception as exc:
                if not store_outage(exc):
                    raise
                self._store_outage(exc)
                actions[i] = "give_back"
                continue
            if not acquired:
                continue  # one by one below, after this batch let go of its claims
            # A finished job (a redelivery) is found by _precheck under the lock.
            self.claims[job.job_id] = claim
            batch.append(Batched(i, delivery, job, journal, claim, ref))
        retries: list[tuple[Batched, TransientJobError]] = []
        if batch:
            self.metrics.busy.inc(len(batch))
            outage = False
            try:
                self._run_batch(batch)
            except Exception as exc:
                if store_outage(exc):
                    outage = True
                    self._store_outage(exc)
                else:
                    log.exception(
                        "batch of %d job(s) failed; requeueing what did not finish", len(batch)
                    )
            finally:
                for b in batch:
                    b.journal.unlock()
                    if b.retry is not None and b.action is None:
                        retries.append((b, b.retry))
                    else:
                        self._release(b.claim)
            for b, err in retries:
                try:
                    b.action = self._after_attempt(
                        b.job, b.journal, b.delivery, b.ref, b.attempt, err
                    )
                except Exception as exc:
                    if not store_outage(exc):
                        raise
                    outage = True
                    self._store_outage(exc)
                finally:
                    self._release(b.claim)
            for b in batch:
                actions[b.index] = b.action or ("give_back" if outage else "requeue")
        out: list[Action] = []
        for i, action in enumerate(actions):
            if action is None:
                delivery = deliveries[i]
                cb = None if on_job is None else (lambda job_id, d=delivery: on_job(d, job_id))
                try:
                    action = self.handle(delivery, cb)
                except Exception:
                    log.exception("unexpected error handling a delivery; requeueing it")
                    action = "requeue"
            out.append(action)
        return out

    def _release(self, claim: Claim) -> None:
        """A claimed job is done here (acked, given back or failed): forget it, let go."""
        self.metrics.busy.dec()
        self.claims.pop(claim.job_id, None)
        self.cancelled.pop(claim.job_id, None)
        claim.release()

    def _how_to_sync_results(self) -> Callable[[], None] | None:
        """What makes staged or placed results durable: nothing for s3 (a finished PUT is),
        the journals' syncfs when a file:// media store shares their filesystem (`_sync` then
        skips it when the logs' sync ran anyway), else the media store's own sync."""
        if not isinstance(self.media, FileMediaStore):
            return None
        if (
            isinstance(self.store, FileJobStore)
            and os.stat(self.media.root).st_dev == os.stat(self.store.storage.root).st_dev
        ):
            self._results_with_logs = True
            return self.store.storage.sync
        return self.media.sync

    def _sync(self, logs: Sequence[JobLog], *, results: bool) -> None:
        """One sync point of the batch lane: the logs' written events (file: one syncfs;
        postgres: one transaction) and, with results, what the media store staged or placed."""
        if logs:
            self.store.sync(logs)  # always: on postgres this is where the events are stored
        if not (results and self.settings.journal_fsync) or self._results_sync is None:
            return
        if logs and self._results_with_logs:
            return  # the logs' syncfs covered the results' volume
        self._results_sync()

    def _run_batch(self, batch: list[Batched]) -> None:
        """The steps of `handle_batch` for claimed jobs; sets each one's action (or retry)."""
        tier = self.tier.name
        publish = self.publisher.publish_event
        batch.sort(key=lambda b: b.job.job_id)  # lock order: no two batches wait on each other
        for b in batch:
            b.journal.lock(b.claim)
        running: list[Batched] = []
        for b in batch:
            b.action = self._precheck(b.job, b.journal, b.ref)
            if b.action is None:
                b.attempt, started = self._started(b.job, b.journal)
                b.journal.write("started", started, publish)
                running.append(b)
        staged: list[Batched] = []
        for b in running:
            b.t0 = time.monotonic()
            out = self._produce(b.job, b.journal, b.ref)
            if isinstance(out, Produced):
                try:
                    b.staged = self.media.stage_result(
                        out.work_dir, b.ref.prefix, b.ref.job_id, out.manifest, sync=False
                    )
                    b.produced = out
                    staged.append(b)
                    continue
                except Exception as exc:
                    shutil.rmtree(out.work_dir, ignore_errors=True)
                    out = self._classified(b.journal, b.job, exc)
            self.metrics.duration.labels(tier).observe(time.monotonic() - b.t0)
            if isinstance(out, TransientJobError):
                b.retry = out
            else:
                b.action = out
        # One sync for the `started` lines and the staged results. `started` goes out only now;
        # a job that appended an event meanwhile (progress, failed) synced its journal and
        # published its `started` first, so every job's events still leave in seq order.
        self._sync([b.journal for b in running], results=True)
        with self.publisher.burst():
            for b in running:
                b.journal.publish_written(publish)
        placed: list[Batched] = []
        for b in staged:
            assert b.produced is not None
            assert b.staged is not None
            if self.media.place_result(b.staged):
                placed.append(b)
            else:
                b.action = self._lost_commit(b.job, b.journal, b.ref)
        self._sync([], results=True)
        for b in placed:
            assert b.produced is not None
            b.journal.write(
                "completed", completed_payload(self.media, b.ref, b.produced.manifest), publish
            )
        self._sync([b.journal for b in placed], results=False)
        with self.publisher.burst():
            for b in placed:
                b.journal.publish_written(publish)
        for b in batch:
            b.journal.settle(publish)
        for b in placed:
            self.metrics.duration.labels(tier).observe(time.monotonic() - b.t0)
            self.metrics.jobs.labels(tier, "completed").inc()
            assert b.produced is not None
            total = b.produced.manifest.get("timings_s", {}).get("total")
            self._count_usage(b.job.api_key_id, "completed", total)
            b.action = "ack"

    def _wait_for_claim(self, claim: Claim, delivery: Delivery) -> bool:
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

    def attempts_so_far(self, journal: JobLog) -> int:
        """Failed attempts of a job: its `retrying` events (on any worker, any delivery) since
        its last `replayed` (a replayed dead letter starts with a fresh attempt budget)."""
        return attempts_since_replay(journal.events())

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

    def _run_claimed(self, job: JobRequest, journal: JobLog, delivery: Delivery) -> Action:
        try:
            ref = self._result_ref(job)
        except StorageError as exc:  # e.g. an output prefix outside the media store: bad input
            return self._fail(journal, PermanentJobError(exc.code, exc.message))
        done = self._precheck(job, journal, ref)
        if done is not None:
            return done
        attempt, started = self._started(job, journal)
        self.emit(journal, "started", started, wait=False)
        t0 = time.monotonic()
        outcome = self._attempt(job, journal, ref)
        self.metrics.duration.labels(self.tier.name).observe(time.monotonic() - t0)
        return self._after_attempt(job, journal, delivery, ref, attempt, outcome)

    def _precheck(self, job: JobRequest, journal: JobLog, ref: ResultRef) -> Action | None:
        """What to do instead of running a claimed job, or None to run it."""
        tier = self.tier.name
        if journal.terminal() is not None:
            self.metrics.duplicates.labels(tier).inc()
            return "ack"
        # A result exists only if some delivery started the job (`started` is durable first).
        started = any(e.type == "started" for e in journal.events())
        manifest = self.media.read_manifest(ref.prefix, ref.job_id) if started else None
        if manifest is not None:
            # Crashed after committing the result but before `completed`: finish the bookkeeping.
            self._emit_completed(journal, ref, manifest)
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
        return None

    def _started(self, job: JobRequest, journal: JobLog) -> tuple[int, EventPayload]:
        """This run's attempt number and its `started` payload (records the queue wait)."""
        attempt = self.attempts_so_far(journal) + 1
        wait_s = max(0.0, (utcnow() - job.created_at).total_seconds())
        self.metrics.queue_wait.labels(self.tier.name).observe(wait_s)
        return attempt, EventPayload(
            worker=self.name, attempt=attempt, queue_wait_s=round(wait_s, 3)
        )

    def _after_attempt(
        self,
        job: JobRequest,
        journal: JobLog,
        delivery: Delivery,
        ref: ResultRef,
        attempt: int,
        outcome: Action | TransientJobError,
    ) -> Action:
        """Retry transient failures with backoff (or give the job back, or dead-letter it)."""
        tier = self.tier.name
        while True:
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
            t0 = time.monotonic()
            outcome = self._attempt(job, journal, ref)
            self.metrics.duration.labels(tier).observe(time.monotonic() - t0)

    def _attempt(
        self, job: JobRequest, journal: JobLog, ref: ResultRef
    ) -> Action | TransientJobError:
        produced = self._produce(job, journal, ref)
        if not isinstance(produced, Produced):
            return produced
        try:
            committed = self.media.commit_result(
                produced.work_dir, ref.prefix, ref.job_id, produced.manifest
            )
            if not committed:
                return self._lost_commit(job, journal, ref)
            self._emit_completed(journal, ref, produced.manifest)
            return "ack"
        except Exception as exc:
            shutil.rmtree(produced.work_dir, ignore_errors=True)
            return self._classified(journal, job, exc)

    def _lost_commit(self, job: JobRequest, journal: JobLog, ref: ResultRef) -> Action:
        """Another delivery's result is in place: ours is dropped. If the journal has not
        ended (that delivery crashed after its commit), its result completes the job."""
        log.info("job %s: another delivery committed first; not completing twice", job.job_id)
        self.metrics.duplicates.labels(self.tier.name).inc()
        manifest = self.media.read_manifest(ref.prefix, ref.job_id)
        if manifest is not None and journal.terminal() is None:
            self._emit_completed(journal, ref, manifest)
        return "ack"

    def _produce(
        self, job: JobRequest, journal: JobLog, ref: ResultRef
    ) -> Produced | Action | TransientJobError:
        """Run the processor into a fresh work dir; the result is not committed yet."""
        tier = self.tier.name
        work_dir: Path | None = None
        scratch = Scratch(self.settings.scratch_dir, job.job_id)
        try:
            source = self.inputs.localize(job.source_uri, "source", scratch)
            target = self.inputs.localize(job.target_uri, "target", scratch)
            try:
                work_dir = self.media.new_work_dir(ref.prefix, ref.job_id)
            except StorageError as exc:
                raise TransientJobError(exc.code, exc.message) from exc
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
            produced, work_dir = Produced(work_dir, manifest), None
            return produced
        except JobCancelled as exc:
            self.emit(journal, "cancelled", EventPayload(message=exc.reason))
            self.metrics.jobs.labels(tier, "cancelled").inc()
            return "ack"
        except ShutdownRequested:
            log.info("job %s interrupted by shutdown; giving it back", job.job_id)
            self.metrics.jobs.labels(tier, "requeued").inc()
            return "give_back"
        except Exception as exc:  # mapped at this boundary
            return self._classified(journal, job, exc)
        finally:
            scratch.cleanup()
            if work_dir is not None:
                shutil.rmtree(work_dir, ignore_errors=True)

    def _classified(
        self, journal: JobLog, job: JobRequest, exc: Exception
    ) -> Action | TransientJobError:
        """A job's exception, mapped to what happens next: `failed` now, or a retry. The job
        store being down is no failure of the job: it propagates to `handle`, which gives the
        job back."""
        if store_outage(exc):
            raise exc
        err = classify(exc)
        if isinstance(err, PermanentJobError):
            return self._fail(journal, err)
        if isinstance(err, TransientJobError):
            log.warning("job %s transient error: %s", job.job_id, err)
            return err
        if isinstance(err, JobError):
            return self._fail(journal, PermanentJobError(err.code, err.message))
        raise exc

    def _emit_completed(self, journal: JobLog, ref: ResultRef, manifest: dict[str, Any]) -> None:
        self.emit(journal, "completed", completed_payload(self.media, ref, manifest))
        self.metrics.jobs.labels(self.tier.name, "completed").inc()

    def _fail(self, journal: JobLog, err: JobError) -> Action:
        self.emit(
            journal, "failed", EventPayload(code=err.code, message=err.message, retryable=False)
        )
        self.metrics.jobs.labels(self.tier.name, "failed").inc()
        return "ack"

    def _dead_letter_job(
        self, job: JobRequest, journal: JobLog, err: JobError, attempts: int
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
            journal = self.store.log(job_id, fsync=self.settings.journal_fsync)
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
        journal = self._journal(job)
        payload = EventPayload(code=code, message=message, retryable=False)
        generation = replay_generation(headers)

        def task() -> None:
            journal.lock()  # the check and the event under one lock: a replay cannot slip in
            try:
                replayed = last_replay_seq(journal.events())
                if generation < replayed:
                    # A copy sent before the job's last replay (e.g. this notification came
                    # again after its `dead_lettered` was recorded): the replayed job lives on.
                    log.info(
                        "job %s: stale dead letter (replay %d < %d); ignoring it",
                        job.job_id,
                        generation,
                        replayed,
                    )
                    return
                self.emit(journal, "dead_lettered", payload)
            finally:
                journal.unlock()

        return task

    def note_cancel(self, req: CancelRequest) -> bool:
        """A cancel request from the control exchange: make it durable for whichever worker
        takes the job, and remember it here only while this worker runs that job (every worker
        sees every cancel, so remembering all of them would grow without bound). False if it
        could not be recorded (the pending copy then stays on the broker)."""
        if req.job_id in self.claims:
            self.cancelled[req.job_id] = req.reason
        try:
            if self.store.cancel_reason(req.job_id) is None:
                self.store.request_cancel(req.job_id, req.reason)
        except ValueError as exc:  # not a job id: nothing to record, ever
            log.warning("ignoring cancel of %r: %s", req.job_id, exc)
        except OSError as exc:
            log.warning("could not persist cancel of %s: %s", req.job_id, exc)
            return False
        except Exception as exc:
            if not store_outage(exc):
                raise
            self._store_outage(exc)
            return False
        return True


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
