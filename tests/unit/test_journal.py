"""The per-job journal: gapless seq across writers, outbox republish, nothing after the end.

Publishing goes to a fake (a list); the real broker path is covered in tests/spine.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from facefleet.journal import JobClaim, JobJournal
from facefleet.storage import Storage
from facefleet.wire import EventPayload, JobEvent


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(tmp_path)


def test_two_writers_share_one_gapless_sequence(storage: Storage) -> None:
    job = str(uuid.uuid4())
    published: list[JobEvent] = []
    a, b = JobJournal(storage, job, fsync=False), JobJournal(storage, job, fsync=False)

    def write(j: JobJournal) -> None:
        for _ in range(50):
            j.append("progress", EventPayload(fraction=0.1), published.append)

    threads = [threading.Thread(target=write, args=(j,)) for j in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # seq 1 is the producer's `queued`, recorded by the first writer
    assert [e.seq for e in a.events()] == list(range(1, 102))
    assert [e.seq for e in published] == list(range(1, 102))
    assert [e.type for e in a.events()] == ["queued"] + ["progress"] * 100


def test_an_event_whose_publish_failed_is_republished_by_the_next_writer(storage: Storage) -> None:
    job = str(uuid.uuid4())
    journal = JobJournal(storage, job, fsync=False)

    def broken(_: JobEvent) -> None:
        raise ConnectionError("broker gone")

    with pytest.raises(ConnectionError):
        journal.append("started", None, broken)
    published: list[JobEvent] = []
    JobJournal(storage, job).append("completed", None, published.append)
    assert [(e.seq, e.type) for e in published] == [(1, "queued"), (2, "started"), (3, "completed")]


def test_a_confirmed_event_is_not_republished_by_the_next_writer(storage: Storage) -> None:
    """The watermark line records what the broker confirmed, so the outbox skips it."""
    job = str(uuid.uuid4())
    first: list[JobEvent] = []
    JobJournal(storage, job, fsync=False).append("queued", None, first.append)
    later: list[JobEvent] = []
    JobJournal(storage, job, fsync=False).append("started", None, later.append)
    assert [e.seq for e in first] == [1]
    assert [e.seq for e in later] == [2]
    lines = JobJournal(storage, job).path.read_bytes().splitlines()
    assert lines[-1] == b'{"published":2}'


def test_a_batch_writes_under_held_locks_then_syncs_once_then_publishes(storage: Storage) -> None:
    """The batch lane's order: write every job's event, one sync, publish in order, settle."""
    jobs = sorted(str(uuid.uuid4()) for _ in range(5))
    journals = [JobJournal(storage, job) for job in jobs]
    published: list[JobEvent] = []
    for journal in journals:
        journal.lock()
        assert journal.write("started", None, published.append) is not None
    assert published == []  # nothing leaves before the sync
    storage.sync()
    for journal in journals:
        journal.publish_written(published.append)
        journal.settle(published.append)
        journal.unlock()
    assert [(e.job_id, e.seq, e.type) for e in published] == [
        (j, seq, kind) for j in jobs for seq, kind in ((1, "queued"), (2, "started"))
    ]
    again: list[JobEvent] = []
    JobJournal(storage, jobs[0], fsync=False).append("completed", None, again.append)
    assert [(e.seq, e.type) for e in again] == [(3, "completed")]


def test_writing_needs_the_job_lock(storage: Storage) -> None:
    with pytest.raises(AssertionError, match="job lock"):
        JobJournal(storage, str(uuid.uuid4())).write("started", None, lambda e: None)


def test_nothing_is_appended_after_a_terminal_event(storage: Storage) -> None:
    job = str(uuid.uuid4())
    journal = JobJournal(storage, job, fsync=False)
    sink: list[JobEvent] = []
    journal.append("completed", None, sink.append)
    assert journal.append("completed", None, sink.append) is None
    assert journal.append("failed", None, sink.append) is None
    assert [e.type for e in journal.events()] == ["queued", "completed"]
    assert journal.terminal() is not None


def test_the_first_writer_records_the_producers_queued_event(storage: Storage) -> None:
    """Producers never write the journal: the first writer records the very `queued` event the
    producer published (same seq, time and payload) before its own, and publishes it again."""
    from facefleet.wire import JobRequest, queued_event, utcnow

    request = JobRequest(
        job_id=str(uuid.uuid4()),
        idempotency_key="k",
        tier="standard",
        created_at=utcnow(),
        source_uri="file:///a.jpg",
        target_uri="file:///b.jpg",
        output_uri_prefix="file:///out/",
    )
    published: list[JobEvent] = []
    journal = JobJournal(storage, request.job_id, fsync=False, queued=queued_event(request))
    journal.append("started", None, published.append)
    assert published[0] == queued_event(request)
    assert [(e.seq, e.type) for e in published] == [(1, "queued"), (2, "started")]
    # a journal that has events already gets no second `queued`
    journal.append("completed", None, published.append)
    assert [e.type for e in journal.events()] == ["queued", "started", "completed"]


def test_a_live_claim_is_respected_and_a_released_one_is_taken_over(storage: Storage) -> None:
    job = str(uuid.uuid4())
    first = JobClaim(storage, job)
    second = JobClaim(storage, job)
    assert first.try_acquire()
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    first.release()  # a late release by the old holder must not free w2's claim
    assert not JobClaim(storage, job).try_acquire()
    second.release()


def test_the_claim_of_a_killed_holder_is_free_at_once(storage: Storage) -> None:
    """kill -9: the kernel drops the dead process's lock, no lease has to run out first."""
    job = str(uuid.uuid4())
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from facefleet.journal import JobClaim\n"
        "from facefleet.storage import Storage\n"
        "assert JobClaim(Storage(Path(sys.argv[1])), sys.argv[2]).try_acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(storage.root), job], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        waiter = JobClaim(storage, job)
        assert not waiter.try_acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert waiter.try_acquire()
    finally:
        holder.kill()
        holder.wait(10)


def test_recording_a_submission_never_waits_for_a_running_job(storage: Storage) -> None:
    """The gateway records a submitted job's `queued`; a worker that already took the job holds
    its lock through the whole run. The record is skipped (the worker recorded it) at once."""
    import time

    from facefleet.journal import FileJobStore
    from facefleet.wire import JobRequest, utcnow

    request = JobRequest(
        job_id=str(uuid.uuid4()),
        idempotency_key="k",
        tier="standard",
        created_at=utcnow(),
        source_uri="file:///a.jpg",
        target_uri="file:///b.jpg",
        output_uri_prefix="file:///out/",
    )
    worker = JobJournal(storage, request.job_id, fsync=False)
    worker.lock()
    try:
        t0 = time.monotonic()
        assert FileJobStore(storage).record_submitted(request) is False
        assert time.monotonic() - t0 < 1.0
    finally:
        worker.unlock()
    assert FileJobStore(storage).record_submitted(request) is True
    assert [e.type for e in JobJournal(storage, request.job_id).events()] == ["queued"]
