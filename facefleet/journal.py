"""Per-job event journal: the single authority on a job's event sequence numbers.

Why a journal: events come from several processes over a job's life (the producer's `queued`,
one or more workers' `started`/`progress`/terminal event after crashes and redeliveries). Each
event is appended to jobs/<id>.jsonl under the job lock and made durable, *then*
published with a confirm, so that seq is gapless and strictly increasing across processes, the
stream sees events in seq order, and an event whose publish failed is republished by the next
writer (an outbox). Watchers may therefore see a seq twice (after a crash between confirm and
watermark) but never a gap; they drop duplicates by seq.

The journal also answers "has this job already finished?" so a redelivered job never gets a
second terminal event.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import datetime

from facefleet.jobstore import (
    ACTIVE_STATES,
    Claim,
    JobPage,
    JobState,
    JobSummary,
    OneByOne,
    Usage,
    ended,
    may_write,
    page_of,
    replay_log,
    summarize,
    usage_of,
)
from facefleet.storage import (
    CLAIM_BYTE,
    JOB_LOCK_BYTE,
    JOURNAL,
    Storage,
    lock_byte,
    unlock_byte,
)
from facefleet.wire import EventPayload, EventType, JobEvent, JobRequest, queued_event, utcnow

Publish = Callable[[JobEvent], "Future[None] | None"]
"""Publishes one event; returns None once confirmed, or a Future that resolves on the confirm."""


class JobJournal:
    """One job's journal file, jobs/<id>.jsonl: event lines, plus `{"published": N}` lines (the
    watermark: every event up to seq N was confirmed by the broker). A lock on the file's byte 0
    is the job lock.

    Writers either call `append` (lock, write, sync, publish: one event, as a job's steps go)
    or, in a batch, hold the lock (`lock()`), `write` events, make the whole batch durable with
    one `storage.sync()`, then `publish_written` and `settle`, and `unlock()`.
    """

    def __init__(
        self,
        storage: Storage,
        job_id: str,
        *,
        fsync: bool = True,
        queued: JobEvent | None = None,
    ) -> None:
        self.storage = storage
        self.job_id = job_id
        self.queued = queued
        """The job's `queued` event as its producer published it (wire.queued_event): producers
        never write the journal, so the first writer records it before its own event."""
        self.path = storage.job_path(job_id, JOURNAL)
        self.fsync = fsync
        self._fd: int | None = None
        """The journal, open for appending while this object holds the job lock."""
        self._borrowed = False
        """_fd is a JobClaim's descriptor (unlock releases the lock, the claim closes it)."""
        self._inflight: dict[int, Future[None] | None] = {}
        self._written: list[JobEvent] = []
        """Events this object wrote that are not yet handed to the publisher."""
        self._cache: list[JobEvent] = []
        self._cache_size = -1
        self._mark = 0
        self._current = False
        """The cache is the file: re-read under this lock (nobody else writes while it is held)."""

    # --- reading --------------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Re-read the file if its size changed (through the held descriptor when locked).

        Only whole lines count: a reader without the lock may catch a line mid-append."""
        if self._current:
            return
        fd = self._fd
        try:
            if fd is None:
                fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            self._cache, self._cache_size, self._mark = [], -1, 0
            return
        try:
            size = os.fstat(fd).st_size
            if size == self._cache_size:
                return
            data = os.pread(fd, size, 0)
        finally:
            if fd is not self._fd:
                os.close(fd)
        data = data[: data.rfind(b"\n") + 1]
        events, mark = [], 0
        for line in data.splitlines():
            if line.startswith(_MARK_PREFIX):
                mark = max(mark, int(json.loads(line)["published"]))
            elif line.strip():
                # Our own lines: validate as JSON in one pass (pydantic-core), no schema dispatch.
                events.append(JobEvent.model_validate_json(line))
        self._cache, self._cache_size, self._mark = events, len(data), mark
        self._current = self._fd is not None

    def events(self) -> list[JobEvent]:
        """All events so far (re-read only when the file changed size)."""
        self._refresh()
        return list(self._cache)

    def terminal(self) -> JobEvent | None:
        """The event that ended the job; None while open (a `replayed` reopens a dead letter)."""
        return ended(self.events())

    # --- the job lock ---------------------------------------------------------------------------

    def lock(self, claim: Claim | None = None) -> None:
        """Take the job lock (blocking); several at once only in job-id order. With the job's
        held claim, on the claim's descriptor: one open of the journal serves both."""
        if self._fd is not None:
            return
        if isinstance(claim, JobClaim) and claim.fd is not None:
            lock_byte(claim.fd, JOB_LOCK_BYTE, wait=True)
            self._fd, self._borrowed = claim.fd, True
        else:
            self._fd, self._borrowed = self.storage.lock_job(self.job_id), False

    def try_lock(self) -> bool:
        """Take the job lock if nobody holds it; never waits."""
        if self._fd is not None:
            return True
        fd = self.storage.open_job_file(self.job_id, JOURNAL, os.O_APPEND)
        if not lock_byte(fd, JOB_LOCK_BYTE, wait=False):
            os.close(fd)
            return False
        self._fd, self._borrowed = fd, False
        return True

    def unlock(self) -> None:
        fd, self._fd = self._fd, None
        self._current = False
        if fd is None:
            return
        if self._borrowed:
            unlock_byte(fd, JOB_LOCK_BYTE)  # the claim on the same descriptor stays
        else:
            os.close(fd)  # closing the description drops its lock

    # --- writing --------------------------------------------------------------------------------

    def append(
        self,
        event_type: EventType,
        payload: EventPayload | None,
        publish: Publish,
        *,
        wait: bool = True,
    ) -> JobEvent | None:
        """Append one event and publish it; None if the job already ended (nothing is written).

        wait=False returns once the event is durable in the journal and handed to the publisher
        (progress events: a GPU step never stalls on a broker round trip); the next waiting
        append, and every terminal event, first makes sure all earlier events were confirmed.
        Takes the job lock for the call unless this object holds it already.
        """
        if self._fd is None:
            self.lock()
            try:
                return self.append(event_type, payload, publish, wait=wait)
            finally:
                self.unlock()
        event = self.write(event_type, payload, publish)
        if event is None:
            return None
        if self.fsync:
            assert self._fd is not None
            os.fdatasync(self._fd)
        self.publish_written(publish)
        if wait or event.terminal:
            self.settle(publish)
        return event

    def write(
        self, event_type: EventType, payload: EventPayload | None, publish: Publish
    ) -> JobEvent | None:
        """Under the held lock: append the job's next event, not yet synced nor published (the
        caller syncs, then `publish_written`). None if the job already ended (`replayed`: unless
        jobstore.may_write allows it). Events an earlier writer left unconfirmed are
        republished first, so the stream keeps seq order."""
        assert self._fd is not None, "write() needs the job lock"
        events = self.events()
        self._flush_outbox(events, publish)
        if not may_write(events, event_type):
            return None
        if not events and event_type != "queued":
            # seq 1 is the producer's `queued`, already in the stream: record it (and publish it
            # again, first: watchers drop the duplicate, and the stream keeps seq order).
            self._add(
                self.queued or JobEvent(job_id=self.job_id, seq=1, type="queued", ts=utcnow())
            )
        return self._add(
            JobEvent(
                job_id=self.job_id,
                seq=(self._cache[-1].seq + 1) if self._cache else 1,
                type=event_type,
                ts=utcnow(),
                payload=payload or EventPayload(),
            )
        )

    def _add(self, event: JobEvent) -> JobEvent:
        assert self._fd is not None
        line = event.encode() + b"\n"
        os.write(self._fd, line)
        # Under the lock the cache was just refreshed to the file; extend it instead of re-reading.
        self._cache.append(event)
        self._cache_size = max(self._cache_size, 0) + len(line)
        self._written.append(event)
        return event

    def replay(self, replayed_by: str, publish: Publish) -> JobEvent:
        """Open a dead-lettered job again (see jobstore.JobLog.replay)."""
        return replay_log(self, replayed_by, publish)

    def publish_written(self, publish: Publish) -> None:
        """Hand every event `write` made to the publisher, in seq order (once they are durable)."""
        written, self._written = self._written, []
        for event in written:
            self._inflight[event.seq] = publish(event)

    def settle(self, publish: Publish) -> None:
        """Wait for every in-flight publish; republish failures; record the watermark."""
        if not self._inflight:
            return
        by_seq = {e.seq: e for e in self._cache}
        top = 0
        for seq in sorted(self._inflight):
            fut = self._inflight.pop(seq)
            top = seq
            if fut is None:
                continue
            try:
                fut.result(timeout=60)
            except Exception:
                again = publish(by_seq[seq])
                if again is not None:
                    again.result(timeout=60)
        self._write_mark(top)

    def _write_mark(self, seq: int) -> None:
        """A hint, not synced: if it is lost, the next writer republishes (watchers drop the
        duplicate seq)."""
        if seq <= self._mark:
            return
        assert self._fd is not None, "the watermark is written under the job lock"
        line = json.dumps({"published": seq}, separators=(",", ":")).encode() + b"\n"
        os.write(self._fd, line)
        self._cache_size = max(self._cache_size, 0) + len(line)
        self._mark = seq

    def record_confirmed(self, event: JobEvent) -> bool:
        """Under the held lock: record seq 1, an event someone else already published with a
        confirm (the gateway's copy of its producer's `queued`), if the journal is empty: the
        line made durable, then the watermark. False (nothing written) if it is not empty."""
        assert self._fd is not None, "record_confirmed() needs the job lock"
        if event.seq != 1:
            raise ValueError("only a job's first event can be recorded this way")
        if self.events():
            return False
        self._add(event)
        self._written.pop()  # published already: nothing for publish_written to send
        if self.fsync:
            os.fdatasync(self._fd)
        self._write_mark(event.seq)
        return True

    def _flush_outbox(self, events: list[JobEvent], publish: Publish) -> None:
        """Republish events a crashed or failed writer left unconfirmed (not ours in flight)."""
        written = {e.seq for e in self._written}
        pending = [
            e
            for e in events
            if e.seq > self._mark and e.seq not in self._inflight and e.seq not in written
        ]
        if not pending:
            return
        for event in pending:
            self._inflight[event.seq] = publish(event)
        self.settle(publish)


_MARK_PREFIX = b'{"published":'


class JobClaim:
    """Who runs a job: a lock on byte 1 of the job's journal, held from claim to ack.

    Two deliveries of one job (a duplicate submit, a redelivery while the first worker still
    runs it) never run at once: the second fails to take the lock and waits, then finds the job
    finished and is acked without a second run. Why a held lock rather than a renewed lease
    file: the kernel drops it the moment the holder's process dies (kill -9, OOM kill), so a
    redelivered job is taken over at once instead of a lease period later, and nothing has to
    renew it. Why a byte of the journal rather than a file of its own: no file to create per
    job. The data root needs working cross-node POSIX locks anyway (`Storage.lock_job`); who
    runs the job is in its `started` event.
    """

    def __init__(self, storage: Storage, job_id: str) -> None:
        self.storage = storage
        self.job_id = job_id
        self._fd: int | None = None

    @property
    def fd(self) -> int | None:
        """The journal, open for appending, while the claim is held."""
        return self._fd

    def try_acquire(self) -> bool:
        """Take the claim unless another live holder has it; never blocks."""
        if self._fd is not None:
            return True
        fd = self.storage.open_job_file(self.job_id, JOURNAL, os.O_APPEND)
        if not lock_byte(fd, CLAIM_BYTE, wait=False):
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the description drops its lock


class FileJobStore(OneByOne):
    """Job state in journals under a data root (the embedded default): JobJournal logs,
    JobClaim claims (OFD byte locks the kernel drops when the holder dies), cancel marker files,
    one syncfs per batch step. Queries scan the journals: fine on one machine."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.url = storage.root.as_uri()

    def log(self, job_id: str, *, queued: JobEvent | None = None, fsync: bool = True) -> JobJournal:
        return JobJournal(self.storage, job_id, fsync=fsync, queued=queued)

    def claim(self, job_id: str) -> JobClaim:
        return JobClaim(self.storage, job_id)

    def sync(self, logs: Sequence[object]) -> None:
        """Every line written so far (all logs, and anything else on the volume) is durable:
        one syncfs, skipped when every log given was opened with fsync=False (benchmarks)."""
        if logs and not any(getattr(log, "fsync", True) for log in logs):
            return
        self.storage.sync()

    def cancel_reasons(self, job_ids: Sequence[str]) -> dict[str, str]:
        reasons = {job_id: self.storage.cancel_reason(job_id) for job_id in job_ids}
        return {job_id: reason for job_id, reason in reasons.items() if reason is not None}

    def request_cancel(self, job_id: str, reason: str) -> None:
        self.storage.request_cancel(job_id, reason)

    def list_jobs(
        self,
        *,
        state: JobState | None = None,
        tier: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
        api_key_id: str | None = None,
    ) -> JobPage:
        return page_of(
            self._summaries(),
            state=state,
            tier=tier,
            since=since,
            limit=limit,
            cursor=cursor,
            api_key_id=api_key_id,
        )

    def _summaries(self) -> list[JobSummary]:
        """Every job's row, from a scan of the journals (one machine: fine)."""
        rows = []
        jobs_dir = self.storage.root / "jobs"
        try:
            names = os.listdir(jobs_dir)
        except FileNotFoundError:
            names = []
        suffix = "." + JOURNAL
        for name in names:
            if not name.endswith(suffix):
                continue
            job_id = name[: -len(suffix)]
            events = JobJournal(self.storage, job_id).events()
            if events:
                rows.append(summarize(job_id, events))
        return rows

    def get_job(self, job_id: str) -> JobSummary | None:
        events = JobJournal(self.storage, job_id).events()
        return summarize(job_id, events) if events else None

    # --- per API key: the gateway's listing, usage and limits ------------------------------------

    def record_submitted(self, job: JobRequest) -> bool:
        """The job's `queued` event (its producer published it and the broker confirmed it)
        as seq 1, under the job lock, if the journal is empty; made durable, then the
        watermark says it is published, so the next writer does not publish it again (if the
        watermark line is lost, it republishes it once: watchers drop the duplicate seq)."""
        journal = JobJournal(self.storage, job.job_id)
        if not journal.try_lock():
            # A writer holds the job (a worker runs it: it holds the lock through the job and
            # recorded `queued` first). Waiting would block the submit until the job ends.
            return False
        try:
            return journal.record_confirmed(queued_event(job))
        finally:
            journal.unlock()

    def usage(self, api_key_id: str, *, since: datetime | None = None) -> Usage:
        return usage_of(self._summaries(), api_key_id, since)

    def active_count(self, api_key_id: str) -> int:
        return sum(
            1 for r in self._summaries() if r.api_key_id == api_key_id and r.state in ACTIVE_STATES
        )

    def close(self) -> None:
        pass
