"""Dead letters: jobs parked for people, with the reason, and their `dead_lettered` event.

Three ways a message ends up in `facefleet.jobs.dead` (key = tier):

- a job that failed `max_attempts` times with transient errors (`dead_letter_job`): the worker
  publishes the request with x-facefleet-dead-reason/-code, then emits `dead_lettered`;
- a message that cannot be decoded or has an unknown schema (`dead_letter_malformed`): parked
  with the reason; `dead_lettered` is emitted only when a job id is readable;
- the broker's own dead letter, when a job's deliveries hit x-delivery-limit (workers kept
  dying on it): a worker of the tier consumes the copy on `facefleet.jobs.dead.notify.<tier>`
  and emits the event (`broker_dead_letter`), unless the copy is older than the job's last
  replay (`x-facefleet-replay-seq`).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import pika

from facefleet.amqp import ThreadedPublisher
from facefleet.consumer.delivery import Action, Delivery
from facefleet.consumer.errors import JobError
from facefleet.consumer.metrics import WorkerMetrics
from facefleet.jobstore import JobLog, JobStore, last_replay_seq, replay_generation
from facefleet.wire import (
    CONTENT_TYPE,
    DEAD_EXCHANGE,
    HEADER_DEAD_CODE,
    HEADER_DEAD_REASON,
    DecodeError,
    ErrorCode,
    EventPayload,
    EventType,
    JobEvent,
    JobRequest,
    TierSpec,
)

log = logging.getLogger(__name__)

Emit = Callable[[JobLog, EventType, EventPayload], "JobEvent | None"]
"""Appends an event to a job's log and publishes it (the runner's `emit`: it also counts usage)."""


class DeadLetters:
    """One tier's dead-lettering, on the worker's confirming publisher."""

    def __init__(
        self,
        tier: TierSpec,
        worker: str,
        publisher: ThreadedPublisher,
        metrics: WorkerMetrics,
        store: JobStore,
        *,
        journal: Callable[[JobRequest], JobLog],
        emit: Emit,
        fsync: bool = True,
    ) -> None:
        self.tier = tier
        self.worker = worker
        self.publisher = publisher
        self.metrics = metrics
        self.store = store
        self._journal = journal
        """A job's log (its first writer records the producer's `queued`)."""
        self._emit = emit
        self._fsync = fsync

    def dead_letter_job(
        self, job: JobRequest, journal: JobLog, err: JobError, attempts: int
    ) -> Action:
        """The job failed its last attempt: park it with the reason, emit `dead_lettered`."""
        message = f"gave up after {attempts} attempts: {err.message}"
        self.publish_dead(job.encode(), err.code, message, job.job_id)
        self._emit(
            journal, "dead_lettered", EventPayload(code=err.code, message=message, retryable=False)
        )
        self.metrics.jobs.labels(self.tier.name, "dead_lettered").inc()
        return "ack"

    def dead_letter_malformed(self, delivery: Delivery, exc: DecodeError) -> None:
        """Park an unreadable message with its reason; emit an event if a job id is readable."""
        job_id = _loose_job_id(delivery.body)
        self.publish_dead(delivery.body, exc.code, exc.reason, job_id)
        self.metrics.jobs.labels(self.tier.name, "malformed").inc()
        log.warning("dead-lettered malformed message (job %s): %s", job_id, exc.reason)
        if job_id is not None:
            journal = self.store.log(job_id, fsync=self._fsync)
            self._emit(
                journal,
                "dead_lettered",
                EventPayload(code=exc.code, message=exc.reason, retryable=False),
            )

    def publish_dead(self, body: bytes, code: str, reason: str, job_id: str | None) -> None:
        """Publish to the dead-letter exchange with the reason in headers (confirmed)."""
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
                    "x-facefleet-worker": self.worker,
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
                self._emit(journal, "dead_lettered", payload)
            finally:
                journal.unlock()

        return task


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
