"""Data-root confinement and atomic result commits (real files in a temp dir)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from facefleet.storage import Storage, StorageError


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    root = tmp_path / "root"
    (root / "media").mkdir(parents=True)
    (root / "media" / "a.jpg").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("no")
    os.symlink(tmp_path / "secret.txt", root / "media" / "escape.jpg")
    return Storage(root)


@pytest.mark.parametrize(
    ("uri", "code"),
    [
        pytest.param("file:///etc/passwd", "media_outside_data_root", id="absolute-outside"),
        pytest.param("media/../../secret.txt", "media_outside_data_root", id="dotdot-escape"),
        pytest.param("media/escape.jpg", "media_outside_data_root", id="symlink-escape"),
        pytest.param("file://otherhost/media/a.jpg", "media_outside_data_root", id="remote-host"),
        pytest.param("http://example.com/a.jpg", "invalid_request", id="unsupported-scheme"),
    ],
)
def test_uris_outside_the_data_root_are_refused(storage: Storage, uri: str, code: str) -> None:
    with pytest.raises(StorageError) as info:
        storage.resolve(uri)
    assert info.value.code == code


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param("media/a.jpg", id="relative-path"),
        pytest.param("{root}/media/a.jpg", id="absolute-path"),
        pytest.param("file://{root}/media/a.jpg", id="file-uri"),
    ],
)
def test_uris_inside_the_data_root_resolve(storage: Storage, uri: str) -> None:
    assert storage.resolve(uri.format(root=storage.root)) == storage.root / "media" / "a.jpg"


def test_import_copies_outside_files_in_by_content(storage: Storage, tmp_path: Path) -> None:
    outside = tmp_path / "photo.jpg"
    outside.write_bytes(b"pixels")
    uri = storage.import_file(outside)
    assert storage.resolve(uri).read_bytes() == b"pixels"
    assert storage.import_file(outside) == uri


def test_second_commit_of_a_result_loses_and_leaves_the_first(storage: Storage) -> None:
    job = str(uuid.uuid4())
    result = storage.result_dir(storage.default_output_prefix(), job)
    first, second = storage.new_work_dir(result), storage.new_work_dir(result)
    (first / "out.txt").write_text("first")
    (second / "out.txt").write_text("second")
    assert storage.commit_result(first, result, {"n": 1}) is True
    assert storage.commit_result(second, result, {"n": 2}) is False
    assert (result / "out.txt").read_text() == "first"
    assert storage.read_manifest(result) == {"n": 1}
    assert not second.exists()


def test_job_ids_cannot_become_paths(storage: Storage) -> None:
    with pytest.raises(ValueError):
        storage.job_path("../../etc", "jsonl")
    with pytest.raises(ValueError):
        storage.open_job_file("../../etc/passwd", "jsonl")


def test_reading_a_job_nobody_wrote_creates_nothing(storage: Storage) -> None:
    """Readers (the gateway's history, a status check, a duplicate delivery's terminal check)
    must not leave a file behind for a job id they were merely asked about."""
    from facefleet.journal import JobJournal

    job = str(uuid.uuid4())
    assert JobJournal(storage, job).events() == []
    assert JobJournal(storage, job).terminal() is None
    assert storage.cancel_reason(job) is None
    assert not (storage.root / "jobs").exists()


def test_the_first_writer_creates_the_jobs_directory(storage: Storage) -> None:
    job = str(uuid.uuid4())
    os.close(storage.lock_job(job))
    assert storage.job_path(job, "jsonl").is_file()
    os.close(storage.lock_job(str(uuid.uuid4())))  # the directory exists now: plain open


def test_a_line_caught_mid_append_is_not_read_until_it_is_whole(storage: Storage) -> None:
    from facefleet.journal import JobJournal

    job = str(uuid.uuid4())
    JobJournal(storage, job, fsync=False).append("queued", None, lambda e: None)
    with open(storage.job_path(job, "jsonl"), "ab") as fh:
        fh.write(b'{"schema":1,"job_id":"')
    assert [e.type for e in JobJournal(storage, job).events()] == ["queued"]
