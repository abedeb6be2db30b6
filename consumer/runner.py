"""What happens to deliveries: decode, claim, process, commit the results, emit the events.

The worker (consumer/worker.py) owns the connection, the life cycle and the shutdown flags; the
runner owns the jobs: it never touches AMQP except through the confirming publisher, so it runs
on job threads. There is one path: `handle_batch` takes a slot's deliveries (up to `--batch N`;
`handle` is a batch of one), and every job takes the same steps whatever the batch size:

    delivery ─ decode ──(bad)──▶ dead letter with reason, `dead_lettered` if a job id is readable
                 │
                 ├─ the worker drains (SIGTERM, FACEFLEET_MAX_JOBS) ─▶ give back, not started
                 ├─ claim; a job claimed elsewhere waits until the rest of the batch is done
                 │  (its log already ended ─▶ ack; draining, or waited too long ─▶ give back)
                 │  ── job locks, in job-id order ──
                 ├─ log already ended ─▶ ack (a redelivery never completes twice)
                 ├─ result already committed ─▶ `completed`, ack (crash after commit)
                 ├─ result prefix refused / cancelled / deadline passed / wrong processor
                 │  ─▶ terminal event, ack
                 └─ `started` written for the batch ─ sync ─ published (watchers see the start at
                    once, not after a GPU job of minutes); the processors, one after the other
                    (progress events as they go), each result staged ─ sync ─ results placed ─
                    sync ─ `completed` written ─ sync ─ published, every confirm awaited; locks
                    let go; ack.
                    Permanent errors ─▶ `failed` with a code. Transient ones ─▶ `retrying`,
                    backoff, the next attempt through the same steps (consumer/retry.py), or the
                    job is given back, or dead-lettered after max attempts (consumer/deadletter.py)

Group commit: each of the four sync points is one `JobStore.sync(logs)` or one media sync for
the whole batch (file: one syncfs; postgres: one transaction) instead of an fsync per file and
event, so a batch costs a constant number of syncs however many jobs it has; events are
published pipelined. A job's lock is held from its start to its commit (its progress events are
written under it); a job that fails, is cancelled or will be retried lets go at once, and no
lock is held through a backoff.

A store outage (the job store's driver errors, `store_outage`) gives back every job of the
batch that has no outcome yet and tells the worker, which pauses until the store answers.
Giving a job back (consumer/giveback.py) is done by the worker once the runner says so.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from opentelemetry.trace import Span

from facefleet import tracing
from facefleet.amqp import ThreadedPublisher
from facefleet.consumer.deadletter import DeadLetters
from facefleet.consumer.delivery import Action, Delivery
from facefleet.consumer.errors import (
    JobCancelled,
    JobError,
    PermanentJobError,
    ShutdownRequested,
    TransientJobError,
    classify,
)
from facefleet.consumer.inputs import Inputs, Scratch, fetch_policy
from facefleet.consumer.metrics import WorkerMetrics
from facefleet.consumer.processors.base import Processor, ProcessorOutput
from facefleet.consumer.retry import RetryPolicy, attempts_so_far
from facefleet.jobstore import Claim, JobLog, JobStore, gpu_seconds_of, store_outage
from facefleet.journal import FileJobStore
from facefleet.logs import bind_stage, job_context
from facefleet.media import FileMediaStore, MediaStore, Staged
from facefleet.settings import WorkerSettings
from facefleet.storage import Storage, StorageError
from facefleet.wire import (
    CancelRequest,
    DecodeError,
    EventPayload,
    EventType,
    JobEvent,
    JobRequest,
    TierSpec,
    queued_event,
    utcnow,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def in_job_context(
    method: Callable[Concatenate[JobRunner, JobRun, P], R],
) -> Callable[Concatenate[JobRunner, JobRun, P], R]:
    """Every line logged while `method` handles one job (by any module, in this thread) carries
    the job's id, tier, attempt and this worker's name (facefleet.logs), and the job's `process`
    span is current: step spans, log lines' trace ids and published events hang off it."""

    @functools.wraps(method)
    def wrapper(self: JobRunner, run: JobRun, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with (
            job_context(
                job_id=run.job_id, tier=self.tier.name, attempt=run.attempt, worker=self.name
            ),
            tracing.use(run.span),
        ):
            return method(self, run, *args, **kwargs)

    return wrapper


@dataclass
class Produced:
    """A processor's finished work dir and the manifest to commit with it."""

    work_dir: Path
    manifest: dict[str, Any]


@dataclass(frozen=True)
class ResultRef:
    """Where a job's result goes: <prefix>/<job_id>/ in the media store (checked to lie there)."""

    prefix: str
    job_id: str


@dataclass
class JobRun:
    """One delivery's job in a batch, from its claim to its outcome."""

    delivery: Delivery
    job: JobRequest
    journal: JobLog
    claim: Claim
    ref: ResultRef | StorageError
    """Where its result goes, or why its output prefix is refused (the job then fails)."""
    attempt: int = 1
    t0: float = 0.0
    """When this attempt's processor started (the duration metric)."""
    staged: Staged | None = None
    manifest: dict[str, Any] | None = None
    action: Action | None = None
    """The outcome, once known."""
    retry: TransientJobError | None = None
    """This attempt failed with a transient error: retry, give back or dead-letter."""
    released: bool = False
    """Its claim was let go."""
    span: Span | None = None
    """Its CONSUMER `process` span (facefleet/tracing.py), from decode to the delivery's
    outcome; a child of the producer's `send` span when the message carried its context."""

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def result(self) -> ResultRef:
        assert isinstance(self.ref, ResultRef), "only jobs with a usable result prefix run"
        return self.ref

    def discard_staged(self) -> None:
        """Drop a staged result that will not be placed (its work dir)."""
        staged, self.staged = self.staged, None
        if staged is not None:
            shutil.rmtree(staged.work_dir, ignore_errors=True)


def completed_payload(media: MediaStore, ref: ResultRef, manifest: dict[str, Any]) -> EventPayload:
    result_file = str(manifest.get("result_file", ""))
    timings = {k: float(v) for k, v in dict(manifest.get("timings_s", {})).items()}
    return EventPayload(
        result_uri=media.result_uri(ref.prefix, ref.job_id, result_file),
        manifest_uri=media.result_uri(ref.prefix, ref.job_id, "manifest.json"),
        timings_s=timings,
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
        self._started = time.monotonic()
        self._last_progress = float("-inf")
        self._last_stage: str | None = None
        self._stage_span: Span | None = None
        self._store_asked = self._started
        """When the store was last asked for a cancel (the batch's start step asked just now)."""

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
        changed = stage != self._last_stage
        if changed:
            bind_stage(stage)
            # One span per stage, a child of the runner's `process` step.
            self.end_stage()
            self._stage_span = tracing.start_step(stage, attributes={"facefleet.stage": stage})
            self._last_stage = stage
        interval = self.runner.settings.progress_interval_s
        # A job reports progress only once it has run for one interval: a photo that takes a
        # tenth of a second would otherwise spend more CPU on its seven stage events (a journal
        # append and a publish each) than on its pixels, and `started` and `completed` (with
        # the stage timings) tell its watcher all there is. After that every stage change is
        # reported, and within a stage at most one event per interval.
        if now - self._started < interval:
            return
        if not changed and fraction < 1.0 and now - self._last_progress < interval:
            return
        self._last_progress = now
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

    def end_stage(self) -> None:
        """The current stage's span ends (at the next stage, or when the processor returns)."""
        span, self._stage_span = self._stage_span, None
        tracing.end(span)

    def checkpoint(self) -> None:
        job_id = self.job.job_id
        reason = self.runner.cancelled.get(job_id)  # heard on the control exchange
        now = time.monotonic()
        if reason is None and now - self._store_asked >= self.runner.settings.cancel_poll_s:
            self._store_asked = now
            reason = self.runner.cancel_reason(job_id)
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
        draining: threading.Event | None = None,
        stop_jobs: threading.Event | None = None,
        on_store_outage: Callable[[BaseException], None] | None = None,
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
        self.draining = draining if draining is not None else threading.Event()
        """The worker's: set on SIGTERM; no claim waits, backoff sleeps end, the job is given
        back. (A runner without a worker, in tests, has one of its own.)"""
        self.stop_jobs = stop_jobs if stop_jobs is not None else threading.Event()
        """The worker's: set when the drain deadline passed; running jobs stop at their next
        checkpoint and are given back."""
        self.on_store_outage = on_store_outage
        """Told when the job store stopped answering (the worker pauses consuming)."""
        self.retries = RetryPolicy(settings, tier)
        self.dead_letters = DeadLetters(
            tier,
            name,
            publisher,
            metrics,
            self.store,
            journal=self._journal,
            emit=self.emit,
            fsync=settings.journal_fsync,
        )
        self.cancelled: dict[str, str] = {}
        """Cancels received over AMQP for jobs running here (the durable marker covers the rest)."""
        self.claims: dict[str, Claim] = {}

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

    # --- events and usage ------------------------------------------------------------------------

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
        return self.cancelled.get(job_id) or self.store.cancel_reasons([job_id]).get(job_id)

    # --- the one path ----------------------------------------------------------------------------

    def handle(self, delivery: Delivery, on_job: Callable[[str], None] | None = None) -> Action:
        """One delivery: a batch of one (see `handle_batch`). Returns 'ack', 'give_back' or
        'requeue'; on_job is told the job id as soon as the body is decoded."""
        if on_job is None:
            return self.handle_batch([delivery])[0]
        tell = on_job

        def told(_delivery: Delivery, job_id: str) -> None:
            tell(job_id)

        return self.handle_batch([delivery], told)[0]

    def handle_batch(
        self,
        deliveries: Sequence[Delivery],
        on_job: Callable[[Delivery, str], None] | None = None,
    ) -> list[Action]:
        """Run deliveries (a slot's batch; one with `--batch 1`) through the steps of the module
        docstring; returns what to do with each: 'ack', 'give_back' (a fresh copy, then ack:
        the delivery limit is not spent) or 'requeue' (an unexpected error).

        on_job is told each delivery's job id as soon as its body is decoded (the worker's
        bookkeeping). Deliveries whose claim another delivery holds run after the others, each
        once its claim is free (or are given back), so they never hold up the batch. If the job
        store stops answering, every job without an outcome yet is given back and the worker is
        told, to pause until the store answers.
        """
        actions: list[Action | None] = [None] * len(deliveries)
        runs: list[tuple[int, JobRun]] = []
        for i, delivery in enumerate(deliveries):
            try:
                run = self._open(delivery, on_job)
            except Exception as exc:
                actions[i] = self._unexpected(exc)
                continue
            if run is None:
                actions[i] = "ack"  # malformed: dead-lettered with its reason
            else:
                runs.append((i, run))
        ready: list[JobRun] = []
        waiting: list[JobRun] = []
        if self.draining.is_set():
            # Prefetched (a pipelined worker holds more than it runs) and not started yet:
            # back at once, not after the jobs ahead of it.
            for i, _ in runs:
                actions[i] = "give_back"
            runs = []
        try:
            acquired = self.store.acquire([run.claim for _, run in runs])
        except Exception as exc:
            action = self._unexpected(exc)
            for i, run in runs:
                actions[i] = action
                tracing.end(run.span, **{"facefleet.outcome": action})
            return [action or "requeue" for action in actions]
        for (_, run), ok in zip(runs, acquired, strict=True):
            (ready if ok else waiting).append(run)
        self._run(ready)
        for run in waiting:
            self._run_when_claimed(run)
        for i, run in runs:
            if actions[i] is None:
                actions[i] = run.action
            # Ends with the batch: the delivery is held (and acked) until then.
            tracing.end(
                run.span,
                **{"facefleet.outcome": actions[i] or "requeue", "facefleet.attempt": run.attempt},
            )
        return [action or "requeue" for action in actions]

    def _open(
        self, delivery: Delivery, on_job: Callable[[Delivery, str], None] | None
    ) -> JobRun | None:
        """Decode a delivery into its job (None: malformed, dead-lettered)."""
        try:
            job = JobRequest.decode(delivery.body)
        except DecodeError as exc:
            self.dead_letters.dead_letter_malformed(delivery, exc)
            return None
        if on_job is not None:
            on_job(delivery, job.job_id)
        span = tracing.start_process(
            delivery.properties.headers,
            job.job_id,
            self.tier.name,
            worker=self.name,
            queue_wait_s=max(0.0, (utcnow() - job.created_at).total_seconds()),
            redelivered=delivery.redelivered,
        )
        try:
            ref: ResultRef | StorageError
            try:
                ref = self._result_ref(job)
            except StorageError as exc:  # e.g. an output prefix outside the media store
                ref = exc
            return JobRun(
                delivery, job, self._journal(job), self.store.claim(job.job_id), ref, span=span
            )
        except BaseException:
            tracing.end(span, **{"facefleet.outcome": "requeue"})
            raise

    def _unexpected(self, exc: Exception) -> Action:
        """What an exception outside any job's own failure handling means for the deliveries it
        hit: the job store gone away gives them back (and pauses the worker); anything else
        requeues them."""
        if store_outage(exc):
            self._store_outage(exc)
            return "give_back"
        log.error("unexpected error handling a delivery; requeueing it", exc_info=exc)
        return "requeue"

    def _store_outage(self, exc: BaseException) -> None:
        log.warning("job store unavailable (%s: %s); giving jobs back", type(exc).__name__, exc)
        if self.on_store_outage is not None:
            self.on_store_outage(exc)

    @in_job_context
    def _run_when_claimed(self, run: JobRun) -> None:
        """A job another delivery holds the claim of (another worker runs it, or it came twice
        in this batch): done already ─▶ ack; else wait for the claim (bounded, see
        RetryPolicy.wait_for_claim) and run it as a batch of one, or give it back."""
        try:
            done = run.journal.terminal()
            if done is not None:
                log.info(
                    "job %s already ended (%s); acking duplicate delivery", run.job_id, done.type
                )
                self.metrics.duplicates.labels(self.tier.name).inc()
                run.action = "ack"
                return
            if not self.retries.wait_for_claim(run.claim, run.delivery, self.draining):
                run.action = "give_back"
                return
        except Exception as exc:
            run.action = self._unexpected(exc)
            return
        self._run([run])

    def _run(self, batch: list[JobRun]) -> None:
        """Claimed jobs, from start to outcome: the start step, one attempt each, their retries.
        Sets every job's action; lets go of every claim."""
        if not batch:
            return
        for run in batch:
            self.claims[run.job_id] = run.claim
        self.metrics.busy.inc(len(batch))
        try:
            running = self._start(batch)
            self._attempt(running)
            # Done: not held while others back off and retry.
            self._release([run for run in batch if run.action is not None])
            for run in running:
                self._retry(run)
                self._release([run])
        except Exception as exc:
            action = self._unexpected(exc)
            for run in batch:
                if run.action is None:
                    run.discard_staged()
                    run.action = action
        finally:
            try:
                self.store.unlock([run.journal for run in batch])
            finally:
                self._release(batch)

    def _release(self, runs: Sequence[JobRun]) -> None:
        """Claimed jobs done here (acked, given back or failed): forget them, let go (once)."""
        done = [run for run in runs if not run.released]
        if not done:
            return
        for run in done:
            run.released = True
            self.metrics.busy.dec()
            self.claims.pop(run.job_id, None)
            self.cancelled.pop(run.job_id, None)
        self.store.release([run.claim for run in done])

    # --- the steps ---------------------------------------------------------------------------

    def _start(self, batch: list[JobRun]) -> list[JobRun]:
        """Take the job locks; whatever ends a job before it runs (see `_precheck`); `started`
        written for the rest, ONE sync, published. Returns the jobs to run, still locked (the
        others are let go)."""
        publish = self.publisher.publish_event
        ordered = sorted(batch, key=lambda r: r.job_id)
        self.store.lock([r.journal for r in ordered], [r.claim for r in ordered])
        try:
            running: list[JobRun] = []
            cancels = self.store.cancel_reasons([r.job_id for r in ordered])
            for run in ordered:
                run.action = self._precheck(
                    run, self.cancelled.get(run.job_id) or cancels.get(run.job_id)
                )
                if run.action is None:
                    run.attempt, started = self._started(run.job, run.journal)
                    run.journal.write("started", started, publish)
                    running.append(run)
            self._sync([r.journal for r in running], results=False)
            with self.publisher.burst():
                for run in running:
                    with tracing.use(run.span), tracing.step("publish events"):
                        run.journal.publish_written(publish)
        except BaseException:
            self.store.unlock([r.journal for r in ordered])
            raise
        self.store.unlock([r.journal for r in ordered if r.action is not None])
        return running

    @in_job_context
    def _precheck(self, run: JobRun, cancel: str | None) -> Action | None:
        """What to do instead of running a claimed job, or None to run it (under its lock);
        `cancel`: the job's cancel reason, if any (read for the whole batch at once)."""
        tier = self.tier.name
        job, journal = run.job, run.journal
        if journal.terminal() is not None:
            self.metrics.duplicates.labels(tier).inc()
            return "ack"
        if isinstance(run.ref, StorageError):
            return self._fail(journal, PermanentJobError(run.ref.code, run.ref.message))
        ref = run.ref
        # A result exists only if some delivery started the job (`started` is durable first).
        started = any(e.type == "started" for e in journal.events())
        manifest = self.media.read_manifest(ref.prefix, ref.job_id) if started else None
        if manifest is not None:
            # Crashed after committing the result but before `completed`: finish the bookkeeping.
            self._emit_completed(journal, ref, manifest)
            return "ack"
        if cancel is not None:
            self.emit(journal, "cancelled", EventPayload(code=None, message=cancel))
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
        attempt = attempts_so_far(journal) + 1
        wait_s = max(0.0, (utcnow() - job.created_at).total_seconds())
        self.metrics.queue_wait.labels(self.tier.name).observe(wait_s)
        return attempt, EventPayload(
            worker=self.name, attempt=attempt, queue_wait_s=round(wait_s, 3)
        )

    def _attempt(self, runs: list[JobRun]) -> None:
        """One attempt of each job: the processors one after the other, each result staged,
        then one commit for all (`_commit`). Sets each job's action, or its retry; a job whose
        attempt ends without a result lets go of its lock at once."""
        staged: list[JobRun] = []
        for run in runs:
            run.t0 = time.monotonic()
            out = self._produce(run)
            if isinstance(out, Produced):
                ref = run.result
                try:
                    with tracing.use(run.span), tracing.step("stage result"):
                        run.staged = self.media.stage_result(
                            out.work_dir, ref.prefix, ref.job_id, out.manifest, sync=False
                        )
                    run.manifest = out.manifest
                    staged.append(run)
                    continue
                except Exception as exc:
                    shutil.rmtree(out.work_dir, ignore_errors=True)
                    out = self._classified(run, exc)
            self._outcome(run, out)
            run.journal.unlock()
        self._commit(staged)

    @in_job_context
    def _outcome(self, run: JobRun, out: Action | TransientJobError) -> None:
        """An attempt that did not complete the job: its duration, then its action or retry."""
        self.metrics.duration.labels(self.tier.name).observe(time.monotonic() - run.t0)
        if isinstance(out, TransientJobError):
            run.retry = out
        else:
            run.action = out

    def _commit(self, staged: list[JobRun]) -> None:
        """Staged results: sync; under the job locks (taken for a retry's attempt, held since
        `_start` otherwise) placed (renamed into place / manifest created), sync; `completed`
        written, sync, published, every confirm awaited; the locks let go."""
        if not staged:
            return
        tier = self.tier.name
        publish = self.publisher.publish_event
        # One `commit` span per job, over the batch's shared commit (its syncs are shared).
        spans = [tracing.start_step("commit", run.span) for run in staged]
        self._sync([], results=True)  # every staged result is durable before any is placed
        ordered = sorted(staged, key=lambda r: r.job_id)
        placed: list[JobRun] = []
        self.store.lock([r.journal for r in ordered], [r.claim for r in ordered])
        try:
            for run in ordered:
                assert run.staged is not None
                try:
                    ok = self.media.place_result(run.staged)
                except Exception as exc:
                    run.discard_staged()
                    self._outcome(run, self._classified(run, exc))
                    continue
                run.staged = None
                if ok:
                    placed.append(run)
                else:
                    run.action = self._lost_commit(run)
                    self.metrics.duration.labels(tier).observe(time.monotonic() - run.t0)
            if placed:
                self._sync([], results=True)  # results in place before `completed` says so
            for run in placed:
                assert run.manifest is not None
                payload = completed_payload(self.media, run.result, run.manifest)
                run.journal.write("completed", payload, publish)
            self._sync([r.journal for r in placed], results=False)
            with self.publisher.burst():
                for run in placed:
                    with tracing.use(run.span), tracing.step("publish events"):
                        run.journal.publish_written(publish)
            self.store.settle([r.journal for r in placed], publish)
        finally:
            self.store.unlock([r.journal for r in ordered])
            for span in spans:
                tracing.end(span)
        for run in placed:
            self.metrics.duration.labels(tier).observe(time.monotonic() - run.t0)
            self.metrics.jobs.labels(tier, "completed").inc()
            assert run.manifest is not None
            timings = run.manifest.get("timings_s", {})
            for stage, seconds in timings.items():
                self.metrics.stage_duration.labels(tier, stage).observe(float(seconds))
            self._count_usage(run.job.api_key_id, "completed", timings.get("total"))
            run.action = "ack"

    @in_job_context
    def _retry(self, run: JobRun) -> None:
        """A transient failure: `retrying`, back off, and run the next attempt through the same
        steps while the retry policy lets it run on this delivery; else give the job back, or
        dead-letter it once its attempts are spent."""
        tier = self.tier.name
        while run.retry is not None and run.action is None:
            err, run.retry = run.retry, None
            if self.retries.exhausted(run.attempt):
                run.action = self.dead_letters.dead_letter_job(
                    run.job, run.journal, err, run.attempt
                )
                return
            delay = self.retries.backoff_s(err, run.attempt)
            self.emit(
                run.journal,
                "retrying",
                EventPayload(
                    attempt=run.attempt,
                    delay_s=round(delay, 2),
                    code=err.code,
                    message=err.message,
                    retryable=True,
                ),
            )
            self.metrics.jobs.labels(tier, "retried").inc()
            held = time.monotonic() - run.delivery.received_at
            if not self.retries.in_process(held, delay):
                # One more attempt on this delivery could outlast the consumer timeout: wait out
                # the backoff if that still fits, then give the job back as a fresh delivery.
                log.info(
                    "job %s: attempt %d would not fit the %.0f s hold budget; giving it back",
                    run.job_id,
                    run.attempt + 1,
                    self.tier.hold_budget_s(),
                )
                wait = self.retries.wait_before_give_back_s(held, delay)
                if wait > 0:
                    self.draining.wait(wait)
                run.action = "give_back"
                return
            if self.draining.wait(delay):
                run.action = "give_back"
                return
            run.attempt += 1
            self._attempt([run])

    @in_job_context
    def _lost_commit(self, run: JobRun) -> Action:
        """Another delivery's result is in place: ours is dropped. If the journal has not
        ended (that delivery crashed after its commit), its result completes the job."""
        log.info("job %s: another delivery committed first; not completing twice", run.job_id)
        self.metrics.duplicates.labels(self.tier.name).inc()
        ref = run.result
        manifest = self.media.read_manifest(ref.prefix, ref.job_id)
        if manifest is not None and run.journal.terminal() is None:
            self._emit_completed(run.journal, ref, manifest)
        return "ack"

    @in_job_context
    def _produce(self, run: JobRun) -> Produced | Action | TransientJobError:
        """Run the processor into a fresh work dir; the result is not committed yet."""
        tier = self.tier.name
        job, journal, ref = run.job, run.journal, run.result
        work_dir: Path | None = None
        scratch = Scratch(self.settings.scratch_dir, job.job_id)
        try:
            with tracing.step("fetch inputs"):
                source = self.inputs.localize(job.source_uri, "source", scratch)
                target = self.inputs.localize(job.target_uri, "target", scratch)
            try:
                work_dir = self.media.new_work_dir(ref.prefix, ref.job_id)
            except StorageError as exc:
                raise TransientJobError(exc.code, exc.message) from exc
            ctx = RunContext(self, job, journal, source, target, work_dir)
            started = time.monotonic()
            with tracing.step("process", **{"facefleet.processor": self.processor.name}):
                try:
                    output: ProcessorOutput = self.processor.run(ctx)
                finally:
                    ctx.end_stage()
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
            return self._classified(run, exc)
        finally:
            scratch.cleanup()
            if work_dir is not None:
                shutil.rmtree(work_dir, ignore_errors=True)

    @in_job_context
    def _classified(self, run: JobRun, exc: Exception) -> Action | TransientJobError:
        """A job's exception, mapped to what happens next: `failed` now, or a retry. The job
        store being down is no failure of the job: it propagates to `_run`, which gives the
        batch's unfinished jobs back."""
        if store_outage(exc):
            raise exc
        err = classify(exc)
        if isinstance(err, PermanentJobError):
            return self._fail(run.journal, err)
        if isinstance(err, TransientJobError):
            log.warning("job %s transient error: %s", run.job_id, err)
            return err
        if isinstance(err, JobError):
            return self._fail(run.journal, PermanentJobError(err.code, err.message))
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

    # --- sync points -------------------------------------------------------------------------

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
        """One sync point: the logs' written events (file: one syncfs; postgres: one
        transaction) and, with results, what the media store staged or placed."""
        if logs:
            self.store.sync(logs)  # always: on postgres this is where the events are stored
        if not (results and self.settings.journal_fsync) or self._results_sync is None:
            return
        if logs and self._results_with_logs:
            return  # the logs' syncfs covered the results' volume
        self._results_sync()

    # --- dead letters and cancels --------------------------------------------------------------

    def broker_dead_letter(self, headers: dict[str, Any], body: bytes) -> Callable[[], None] | None:
        """See DeadLetters.broker_dead_letter (consumer/deadletter.py)."""
        return self.dead_letters.broker_dead_letter(headers, body)

    def note_cancel(self, req: CancelRequest) -> bool:
        """A cancel request from the control exchange: make it durable for whichever worker
        takes the job, and remember it here only while this worker runs that job (every worker
        sees every cancel, so remembering all of them would grow without bound). False if it
        could not be recorded (the pending copy then stays on the broker)."""
        if req.job_id in self.claims:
            self.cancelled[req.job_id] = req.reason
        try:
            if req.job_id not in self.store.cancel_reasons([req.job_id]):
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
