"""`facefleet worker`: consume one tier's queue and run a processor, at least once, done once.

Threads (pika connections are not thread-safe, and GPU work must never block heartbeats):

    main thread      consumer connection: deliveries, heartbeats, acks (via add_callback_threadsafe)
    job threads      one per concurrency slot: decode, claim, process, commit result, emit events
    publisher        ThreadedPublisher: events and dead letters, with confirms
    lease renewer    touches the claims of running jobs
    health server    /healthz, /readyz, /metrics

Life cycle (WorkerState): STARTING -> READY -> DRAINING -> STOPPED. SIGTERM moves to DRAINING:
the consumer is cancelled (no new jobs), running jobs get drain_timeout_s to finish, whatever is
still running then stops at its next checkpoint and is requeued for another worker, and the
process exits 0. This is what makes KEDA scale-in safe.

Ack discipline (at-least-once, completed once): a job is acked only after its result directory
was renamed into place (fsynced) and `completed` is in the journal and the stream; a crash before
that means redelivery, and the redelivered copy finds the journal's terminal event (or the
committed result) and is acked without running again.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic

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
from facefleet.amqp import ThreadedPublisher, connect, declare_topology
from facefleet.journal import JobClaim, JobJournal
from facefleet.settings import WorkerSettings
from facefleet.storage import Storage, StorageError
from facefleet.wire import (
    CANCEL_BINDING,
    CONTENT_TYPE,
    CONTROL_EXCHANGE,
    DEAD_EXCHANGE,
    HEADER_DEAD_CODE,
    HEADER_DEAD_REASON,
    CancelRequest,
    DecodeError,
    ErrorCode,
    EventPayload,
    EventType,
    JobEvent,
    JobRequest,
    dead_notify_queue,
    job_queue,
    utcnow,
)

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


_ALLOWED = {
    WorkerState.STARTING: {WorkerState.READY, WorkerState.DRAINING, WorkerState.STOPPED},
    WorkerState.READY: {WorkerState.DRAINING, WorkerState.STOPPED},
    WorkerState.DRAINING: {WorkerState.STOPPED},
    WorkerState.STOPPED: set(),
}


_DELIVERY_KEYS = itertools.count(1)


@dataclass
class Delivery:
    tag: int
    body: bytes
    properties: pika.BasicProperties
    redelivered: bool
    received_at: float = field(default_factory=time.monotonic)
    key: int = field(default_factory=lambda: next(_DELIVERY_KEYS))
    """Unique in this process: delivery tags restart at 1 on every new channel (reconnect)."""

    @property
    def delivery_count(self) -> int:
        """Earlier failed deliveries, from the quorum queue's x-delivery-count header."""
        headers = self.properties.headers or {}
        try:
            return int(headers.get("x-delivery-count", 0) or 0)
        except (TypeError, ValueError):
            return 0


class _Context:
    """The JobContext a processor sees: progress with rate limiting, cancellation checkpoints."""

    def __init__(
        self,
        worker: Worker,
        job: JobRequest,
        journal: JobJournal,
        source_path: Path,
        target_path: Path,
        output_dir: Path,
    ) -> None:
        self.worker = worker
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
            and now - self._last_progress < self.worker.settings.progress_interval_s
        ):
            return
        self._last_progress = now
        self._last_stage = stage
        self.worker.emit(
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
        if self.worker.cancel_reason(self.job.job_id) is not None:
            raise JobCancelled(self.worker.cancel_reason(self.job.job_id) or "cancelled")
        if self.worker.stop_jobs.is_set():
            raise ShutdownRequested("worker is shutting down")


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        processor: Processor,
        *,
        storage: Storage | None = None,
        metrics: WorkerMetrics | None = None,
        on_busy: Callable[[bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self.tier = settings.tier_spec(settings.tier)
        self.processor = processor
        self.storage = storage or Storage(settings.data_root)
        self.metrics = metrics or WorkerMetrics()
        self.on_busy = on_busy
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self.state = WorkerState.STARTING
        self._state_lock = threading.Lock()
        self.stop_jobs = threading.Event()
        """Set when the drain deadline passed: running jobs stop at their next checkpoint."""
        self._draining = threading.Event()
        self._executor = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="job")
        self._inflight: dict[int, str] = {}
        self._inflight_lock = threading.Lock()
        self._cancelled: dict[str, str] = {}
        self._claims: dict[str, JobClaim] = {}
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._consumer_tag: str | None = None
        self.publisher = ThreadedPublisher(settings.amqp_url, f"facefleet-worker-{self.name}")
        self.last_tick = time.monotonic()
        self.last_activity = time.monotonic()
        self.handled = 0

    # --- state ---------------------------------------------------------------------------------

    def _set_state(self, new: WorkerState) -> None:
        with self._state_lock:
            if new == self.state:
                return
            if new not in _ALLOWED[self.state]:
                raise RuntimeError(f"worker cannot go from {self.state.value} to {new.value}")
            log.info("worker %s: %s -> %s", self.name, self.state.value, new.value)
            self.state = new
            self.metrics.ready.set(1 if new == WorkerState.READY else 0)

    def request_shutdown(self, *_args: object) -> None:
        """SIGTERM/SIGINT handler: begin draining (safe to call more than once)."""
        self._draining.set()

    # --- main loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Warm up, consume until drained, return the exit code."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_shutdown)
            signal.signal(signal.SIGINT, self.request_shutdown)
        self.processor.warm_up()
        self.publisher.start()
        renewer = threading.Thread(target=self._renew_leases, name="lease-renewer", daemon=True)
        renewer.start()
        backoff = 1.0
        while not self._draining.is_set():
            try:
                self._consume()
                backoff = 1.0
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
                if self._draining.is_set():
                    break
                log.warning("broker connection lost (%s); reconnecting in %.0f s", exc, backoff)
                self._draining.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        self._drain()
        self._set_state(WorkerState.STOPPED)
        self.publisher.close()
        return 0

    def _consume(self) -> None:
        conn = connect(self.settings.amqp_url, f"facefleet-worker-{self.name}")
        self._connection = conn
        declare_topology(conn, self.settings.tiers())
        ch = conn.channel()
        self._channel = ch
        ch.basic_qos(prefetch_count=self.settings.concurrency)
        self._consumer_tag = ch.basic_consume(job_queue(self.tier.name), self._on_job)
        # Broker-side dead letters (delivery limit after crashes) get their event here.
        notify = conn.channel()
        notify.basic_qos(prefetch_count=10)
        notify.basic_consume(dead_notify_queue(self.tier.name), self._on_dead_letter)
        control = conn.channel()
        ctl = control.queue_declare("", exclusive=True, auto_delete=True)
        control.queue_bind(ctl.method.queue, CONTROL_EXCHANGE, CANCEL_BINDING)
        control.basic_consume(ctl.method.queue, self._on_control, auto_ack=True)
        if self.state == WorkerState.STARTING:
            self._set_state(WorkerState.READY)
        log.info("worker %s consuming %s", self.name, job_queue(self.tier.name))
        while not self._draining.is_set():
            conn.process_data_events(time_limit=0.25)
            self.last_tick = time.monotonic()
            self._check_exit_conditions()

    def _check_exit_conditions(self) -> None:
        """ScaledJob mode: leave after max_jobs deliveries, or when idle for idle_exit_s."""
        s = self.settings
        if s.max_jobs is not None and self.handled >= s.max_jobs:
            log.info("handled %d job(s) (FACEFLEET_MAX_JOBS); exiting", self.handled)
            self._draining.set()
        elif (
            s.idle_exit_s is not None
            and self._inflight_count() == 0
            and time.monotonic() - self.last_activity > s.idle_exit_s
        ):
            log.info("idle for %.0f s (FACEFLEET_IDLE_EXIT_S); exiting", s.idle_exit_s)
            self._draining.set()

    def _drain(self) -> None:
        self._set_state(WorkerState.DRAINING)
        conn, ch = self._connection, self._channel
        if ch is not None and ch.is_open and self._consumer_tag is not None:
            with contextlib.suppress(pika.exceptions.AMQPError):
                ch.basic_cancel(self._consumer_tag)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        stopped_at: float | None = None
        while self._inflight_count() > 0:
            now = time.monotonic()
            if now >= deadline and stopped_at is None:
                log.warning("drain deadline reached; requeueing %d job(s)", self._inflight_count())
                self.stop_jobs.set()
                stopped_at = now
            if stopped_at is not None and now - stopped_at > 10:
                break  # stuck inside a step: closing the channel requeues it
            self._pump(conn, 0.2)
        self._pump(conn, 0.2)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if conn is not None and conn.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                conn.close()

    def _pump(self, conn: pika.BlockingConnection | None, seconds: float) -> None:
        try:
            if conn is not None and conn.is_open:
                conn.process_data_events(time_limit=seconds)
            else:
                time.sleep(seconds)
        except pika.exceptions.AMQPError:
            time.sleep(seconds)
        self.last_tick = time.monotonic()

    def _inflight_count(self) -> int:
        with self._inflight_lock:
            return len(self._inflight)

    # --- broker callbacks (main thread) ------------------------------------------------------

    def _on_job(
        self,
        ch: BlockingChannel,
        method: Basic.Deliver,
        props: pika.BasicProperties,
        body: bytes,
    ) -> None:
        delivery = Delivery(method.delivery_tag, body, props, bool(method.redelivered))
        self.last_activity = time.monotonic()
        with self._inflight_lock:
            self._inflight[delivery.key] = ""
        if self.on_busy is not None:
            self.on_busy(True)
        self._executor.submit(self._handle_safely, ch, delivery)

    def _on_control(
        self, _ch: BlockingChannel, _m: Basic.Deliver, _p: pika.BasicProperties, body: bytes
    ) -> None:
        try:
            req = CancelRequest.decode(body)
        except DecodeError as exc:
            log.warning("ignoring malformed control message: %s", exc.reason)
            return
        self._cancelled[req.job_id] = req.reason
        try:
            if self.storage.cancel_reason(req.job_id) is None:
                self.storage.request_cancel(req.job_id, req.reason)
        except (OSError, ValueError) as exc:
            log.warning("could not persist cancel of %s: %s", req.job_id, exc)

    def _on_dead_letter(
        self, ch: BlockingChannel, method: Basic.Deliver, props: pika.BasicProperties, body: bytes
    ) -> None:
        headers: dict[str, Any] = props.headers or {}
        if HEADER_DEAD_REASON not in headers:
            # Dead-lettered by the broker, not by us: the delivery limit was hit (workers kept
            # dying on it) or the message was rejected by a foreign consumer.
            reason = _first_death_reason(headers)
            try:
                job = JobRequest.decode(body)
            except DecodeError:
                job = None
            if job is not None:
                code: ErrorCode = (
                    "delivery_limit" if reason == "delivery_limit" else "internal_error"
                )
                message = (
                    f"dead-lettered by the broker ({reason}): the job's deliveries failed "
                    f"{self.tier.delivery_limit} times, e.g. the worker crashed on it"
                )
                self._executor_free(
                    lambda: self.emit(
                        JobJournal(self.storage, job.job_id, fsync=self.settings.journal_fsync),
                        "dead_lettered",
                        EventPayload(code=code, message=message, retryable=False),
                    ),
                    ch,
                    method.delivery_tag,
                )
                return
        ch.basic_ack(method.delivery_tag)

    def _executor_free(self, fn: Callable[[], Any], ch: BlockingChannel, tag: int) -> None:
        """Run a small publishing task off the I/O thread, then ack on it."""

        def task() -> None:
            try:
                fn()
                self._threadsafe(lambda: ch.basic_ack(tag))
            except Exception as exc:
                log.error("dead-letter notification failed: %s", exc)
                self._threadsafe(lambda: ch.basic_nack(tag, requeue=True))

        threading.Thread(target=task, daemon=True).start()

    # --- job threads ---------------------------------------------------------------------------

    def _threadsafe(self, fn: Callable[[], None]) -> None:
        conn = self._connection
        if conn is None or not conn.is_open:
            log.warning("connection gone; the broker will redeliver instead")
            return

        def guarded() -> None:
            try:
                fn()
            except pika.exceptions.AMQPError as exc:
                log.warning("ack/nack failed (%s); the broker will redeliver", exc)

        try:
            conn.add_callback_threadsafe(guarded)
        except pika.exceptions.AMQPError as exc:
            log.warning("could not schedule ack/nack: %s", exc)

    def _finish(self, ch: BlockingChannel, delivery: Delivery, action: str) -> None:
        if action == "ack":
            self._threadsafe(lambda: ch.basic_ack(delivery.tag))
        elif action == "requeue":
            self._threadsafe(lambda: ch.basic_nack(delivery.tag, requeue=True))
        with self._inflight_lock:
            self._inflight.pop(delivery.key, None)
            idle = not self._inflight
            self.handled += 1
            self.last_activity = time.monotonic()
        if idle and self.on_busy is not None:
            self.on_busy(False)

    def _handle_safely(self, ch: BlockingChannel, delivery: Delivery) -> None:
        action = "requeue"
        try:
            action = self._handle(delivery)
        except Exception:
            log.exception("unexpected error handling a delivery; requeueing it")
            time.sleep(1.0)
        finally:
            self._finish(ch, delivery, action)

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
        return self._cancelled.get(job_id) or self.storage.cancel_reason(job_id)

    def _handle(self, delivery: Delivery) -> str:
        """Process one delivery; returns 'ack' or 'requeue'."""
        try:
            job = JobRequest.decode(delivery.body)
        except DecodeError as exc:
            self._dead_letter_malformed(delivery, exc)
            return "ack"
        with self._inflight_lock:
            self._inflight[delivery.key] = job.job_id
        journal = JobJournal(self.storage, job.job_id, fsync=self.settings.journal_fsync)
        tier = self.tier.name
        done = journal.terminal()
        if done is not None:
            log.info("job %s already ended (%s); acking duplicate delivery", job.job_id, done.type)
            self.metrics.duplicates.labels(tier).inc()
            return "ack"
        claim = JobClaim(self.storage, job.job_id, self.name, lease_s=self.settings.lease_s)
        if not self._wait_for_claim(claim):
            return "requeue"
        self._claims[job.job_id] = claim
        try:
            return self._run_claimed(job, journal, delivery)
        finally:
            self._claims.pop(job.job_id, None)
            claim.release()

    def _wait_for_claim(self, claim: JobClaim) -> bool:
        """Another live worker runs this job (a duplicate submit/delivery): wait for it."""
        while True:
            with self.storage.job_lock(claim.job_id):
                if claim.try_acquire():
                    return True
            if self._draining.is_set():
                return False
            time.sleep(min(1.0, self.settings.lease_s / 5))

    def _run_claimed(self, job: JobRequest, journal: JobJournal, delivery: Delivery) -> str:
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

        attempt = delivery.delivery_count + 1
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
            if self._draining.wait(delay):
                return "requeue"
            attempt += 1

    def _attempt(
        self, job: JobRequest, journal: JobJournal, result_dir: Path
    ) -> str | TransientJobError:
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
            ctx = _Context(self, job, journal, source, target, work_dir)
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
            log.info("job %s interrupted by shutdown; requeueing", job.job_id)
            self.metrics.jobs.labels(tier, "requeued").inc()
            return "requeue"
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
                import shutil

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

    def _fail(self, journal: JobJournal, err: JobError) -> str:
        self.emit(
            journal, "failed", EventPayload(code=err.code, message=err.message, retryable=False)
        )
        self.metrics.jobs.labels(self.tier.name, "failed").inc()
        return "ack"

    def _dead_letter_job(
        self, job: JobRequest, journal: JobJournal, err: JobError, attempts: int
    ) -> str:
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

    def _renew_leases(self) -> None:
        while self.state != WorkerState.STOPPED:
            for claim in list(self._claims.values()):
                try:
                    claim.renew()
                except OSError as exc:
                    log.warning("lease renewal failed for %s: %s", claim.job_id, exc)
            time.sleep(max(0.2, self.settings.lease_s / 3))


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
    import json
    import uuid

    try:
        raw = json.loads(body)
        value = raw.get("job_id") if isinstance(raw, dict) else None
        return str(uuid.UUID(str(value))) if value else None
    except (ValueError, TypeError, AttributeError):
        return None
