"""Per-job event journal: the single authority on a job's event sequence numbers.

Why a journal: events come from several processes over a job's life (the producer's `queued`,
one or more workers' `started`/`progress`/terminal event after crashes and redeliveries). Each
event is appended to jobs/<id>/events.jsonl under the job's flock, *then* published with a
confirm, so that seq is gapless and strictly increasing across processes, the stream sees events
in seq order, and an event whose publish failed is republished by the next writer (an outbox).
Watchers may therefore see a seq twice (after a crash between confirm and watermark) but never a
gap; they drop duplicates by seq.

The journal also answers "has this job already finished?" so a redelivered job never gets a
second terminal event.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from facefleet.storage import Storage
from facefleet.wire import EventPayload, EventType, JobEvent, utcnow

Publish = Callable[[JobEvent], "Future[None] | None"]
"""Publishes one event; returns None once confirmed, or a Future that resolves on the confirm."""


class JobJournal:
    def __init__(self, storage: Storage, job_id: str, *, fsync: bool = True) -> None:
        self.storage = storage
        self.job_id = job_id
        self.dir = storage.job_dir(job_id)
        self.path = self.dir / "events.jsonl"
        self.watermark_path = self.dir / "published"
        self.fsync = fsync
        self._inflight: dict[int, Future[None] | None] = {}
        self._cache: list[JobEvent] = []
        self._cache_size = -1

    def events(self) -> list[JobEvent]:
        """All events so far (re-read only when the file changed size)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size != self._cache_size:
            with open(self.path, "rb") as fh:
                lines = fh.read().splitlines()
            # Our own lines: validate as JSON in one pass (pydantic-core), no schema dispatch.
            self._cache = [JobEvent.model_validate_json(line) for line in lines if line.strip()]
            self._cache_size = size
        return list(self._cache)

    def terminal(self) -> JobEvent | None:
        for event in reversed(self.events()):
            if event.terminal:
                return event
        return None

    def _watermark(self) -> int:
        try:
            return int(self.watermark_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def append(
        self,
        event_type: EventType,
        payload: EventPayload | None,
        publish: Publish,
        *,
        locked: bool = False,
        wait: bool = True,
    ) -> JobEvent | None:
        """Append one event and publish it; None if the job already ended (nothing is written).

        wait=False returns once the event is durable in the journal and handed to the publisher
        (progress events: a GPU step never stalls on a broker round trip); the next waiting
        append, and every terminal event, first makes sure all earlier events were confirmed.
        Call with locked=True only from inside `storage.job_lock(job_id)`.
        """
        if not locked:
            with self.storage.job_lock(self.job_id):
                return self.append(event_type, payload, publish, locked=True, wait=wait)
        events = self.events()
        self._flush_outbox(events, publish)
        if any(e.terminal for e in events):
            return None
        event = JobEvent(
            job_id=self.job_id,
            seq=(events[-1].seq + 1) if events else 1,
            type=event_type,
            ts=utcnow(),
            payload=payload or EventPayload(),
        )
        line = event.encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            if self.fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        # Under the lock the cache was just refreshed to the file; extend it instead of re-reading.
        self._cache = [*events, event]
        self._cache_size = max(self._cache_size, 0) + len(line)
        self._inflight[event.seq] = publish(event)
        if wait or event.terminal:
            self._settle([*events, event], publish)
        return event

    def _settle(self, events: list[JobEvent], publish: Publish) -> None:
        """Wait for every in-flight publish; republish failures; advance the watermark."""
        by_seq = {e.seq: e for e in events}
        for seq in sorted(self._inflight):
            fut = self._inflight.pop(seq)
            if fut is None:
                continue
            try:
                fut.result(timeout=60)
            except Exception:
                again = publish(by_seq[seq])
                if again is not None:
                    again.result(timeout=60)
        if events:
            self.watermark_path.write_text(str(events[-1].seq))

    def _flush_outbox(self, events: list[JobEvent], publish: Publish) -> None:
        """Republish events a crashed or failed writer left unconfirmed (not ours in flight)."""
        mark = self._watermark()
        pending = [e for e in events if e.seq > mark and e.seq not in self._inflight]
        if not pending:
            return
        for event in pending:
            self._inflight[event.seq] = publish(event)
        self._settle(events, publish)


class JobClaim:
    """Who runs a job: an exclusive flock on jobs/<id>/claim, held from claim to ack.

    Two deliveries of one job (a duplicate submit, a redelivery while the first worker still
    runs it) never run at once: the second fails to take the lock and waits, then finds the job
    finished and is acked without a second run. Why a held lock rather than a renewed lease
    file: the kernel drops it the moment the holder's process dies (kill -9, OOM kill), so a
    redelivered job is taken over at once instead of a lease period later, and nothing has to
    renew it. The data root needs working cross-node flock anyway (`Storage.job_lock`).
    The file is never unlinked: a waiter could otherwise lock an inode nobody else sees.
    """

    def __init__(self, storage: Storage, job_id: str, worker: str) -> None:
        self.storage = storage
        self.job_id = job_id
        self.path = storage.job_dir(job_id) / "claim"
        self.worker = worker
        self._fd: int | None = None

    def holder(self) -> dict[str, Any] | None:
        """Who took the claim last (for people: it stays after the holder is gone)."""
        try:
            data: dict[str, Any] = json.loads(self.path.read_bytes() or b"null")
        except (FileNotFoundError, ValueError):
            return None
        return data

    def try_acquire(self) -> bool:
        """Take the claim unless another live holder has it; never blocks."""
        if self._fd is not None:
            return True
        fd = self.storage.open_job_file(self.job_id, self.path.name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        # Who holds it, for people; no fsync: the lock, not this record, is the claim.
        record = json.dumps({"worker": self.worker, "pid": os.getpid(), "at": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
