"""Media and results under one data root, with durable, atomic writes.

Layout under FACEFLEET_DATA_ROOT (a shared volume in Kubernetes):

    uploads/<sha256[:16]>/<name>      media copied in by `facefleet submit` / the gateway
    jobs/<job_id>.jsonl               the job's event journal (facefleet.journal); a lock on its
                                      byte 0 is the job lock, on byte 1 the worker's claim
    jobs/<job_id>.cancel              cancellation marker
    results/<job_id>/                 the result files + manifest.json, renamed into place whole

jobs/ is one flat directory, no directory per job: creating a directory costs as much as a
file, and a job's first write is on every submission's path.

file:// URIs (and plain paths) must resolve inside the root after following symlinks; anything
else is refused, so a job can never read /etc/passwd or write outside its volume.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from facefleet.wire import ErrorCode

JOURNAL = "jsonl"
CANCEL = "cancel"
JOB_LOCK_BYTE = 0
CLAIM_BYTE = 1

_FLOCK = struct.Struct("hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid


def lock_byte(fd: int, byte: int, *, wait: bool) -> bool:
    """Take an exclusive open-file-description (OFD) lock on one byte of a file.

    Why OFD byte locks: one journal file carries both the job lock and the claim, so neither
    needs a file of its own (file creation is the dearest thing a job does here). OFD locks
    belong to the descriptor, not the process: two threads of one worker exclude each other,
    the kernel drops them when the holder dies (kill -9), and over NFS they travel as ordinary
    POSIX byte-range locks. False if another descriptor holds it (only when wait=False).
    """
    arg = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, arg)
    except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: held elsewhere
        return False
    return True


def unlock_byte(fd: int, byte: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, byte, 1, 0))


class StorageError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


def fsync_path(path: Path | str, *, directory: bool = False) -> None:
    """fsync a file (or, with directory=True, a directory's entries) by path."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_path(path, directory=True)


def write_synced(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Create, write and (unless the caller syncs the whole batch later) fsync a file through
    one descriptor (no buffered-file overhead)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
"""The C library already loaded in this process (find_library would run ldconfig at import)."""


def sync_filesystem(path: Path) -> None:
    """Make every write made so far on path's filesystem durable, in one call (syncfs(2)).

    Why: the batch lane and batched submission make many files durable at once (journal lines,
    result files, renames). On this project's test VM one syncfs cost about two fdatasync calls,
    and one replaces ~5 fsyncs per job of a batch. It flushes the whole
    filesystem, which on a data-root volume is FaceFleet's own writes. Without syncfs (not
    Linux) it falls back to sync(2).
    """
    syncfs = getattr(_libc, "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write a file so that after return it survives a crash: temp file, fsync, rename, fsync dir."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Storage:
    """The data root. Thread-safe: it keeps no state besides the root path and a memo of
    resolved output prefixes."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self._root = str(self.root)
        self._jobs = os.path.join(self._root, "jobs")
        self._prefixes: dict[str, Path] = {}
        """Resolved output URI prefixes (result_dir)."""

    # --- URIs --------------------------------------------------------------------------------

    def resolve(self, uri: str) -> Path:
        """Local path of a file:// URI or path, refused unless it lies inside the data root."""
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            raw = unquote(parsed.path) if parsed.scheme == "file" else uri
            if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
                raise StorageError(
                    "media_outside_data_root", f"{uri}: remote file hosts are not allowed"
                )
        else:
            raise StorageError(
                "invalid_request", f"{uri}: unsupported URI scheme {parsed.scheme!r} (use file://)"
            )
        # Strings, not pathlib: this runs for every job's media and result directory.
        resolved = os.path.realpath(os.path.join(self._root, raw))
        if resolved != self._root and not resolved.startswith(self._root + os.sep):
            raise StorageError(
                "media_outside_data_root",
                f"{uri} resolves to {resolved}, outside the data root {self.root}",
            )
        return Path(resolved)

    def uri(self, path: Path) -> str:
        return path.resolve().as_uri()

    def import_file(self, source: Path) -> str:
        """Copy a local file into uploads/ (content-addressed) and return its URI."""
        if not source.is_file():
            raise StorageError("media_not_found", f"{source}: no such file")
        digest = hashlib.sha256()
        with open(source, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        dest_dir = self.root / "uploads" / digest.hexdigest()[:16]
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / source.name
        if not dest.exists():
            tmp = dest_dir / f".{source.name}.{uuid.uuid4().hex[:8]}.tmp"
            shutil.copyfile(source, tmp)
            os.replace(tmp, dest)
        return self.uri(dest)

    def default_output_prefix(self) -> str:
        results = self.root / "results"
        results.mkdir(parents=True, exist_ok=True)
        return results.as_uri() + "/"

    # --- jobs --------------------------------------------------------------------------------

    def _job_file(self, job_id: str, kind: str) -> str:
        uuid.UUID(job_id)  # never let a job id become a path traversal
        return os.path.join(self._jobs, f"{job_id}.{kind}")

    def job_path(self, job_id: str, kind: str) -> Path:
        """jobs/<job_id>.<kind> (not created: readers of a job nobody wrote must not make one)."""
        return Path(self._job_file(job_id, kind))

    def result_dir(self, output_uri_prefix: str, job_id: str) -> Path:
        """Deterministic result directory of a job: <prefix>/<job_id>/.

        The prefix's resolution is remembered (most jobs share one prefix; resolving it walks
        every path component). A path is followed again at every use anyway, so remembering
        the checked string adds no window a fresh check would close."""
        uuid.UUID(job_id)
        base = self._prefixes.get(output_uri_prefix)
        if base is None:
            base = self.resolve(output_uri_prefix.rstrip("/") or "/")
            if len(self._prefixes) >= 256:
                self._prefixes.clear()
            self._prefixes[output_uri_prefix] = base
        return base / job_id

    def request_cancel(self, job_id: str, reason: str) -> None:
        """Record a cancel durably; the first reason wins (a hard link of a synced temp file:
        linking fails if the marker exists, so two recorders never overwrite each other)."""
        path = self.job_path(job_id, CANCEL)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        write_synced(tmp, reason.encode())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        else:
            fsync_dir(path.parent)
        finally:
            os.unlink(tmp)

    def cancel_reason(self, job_id: str) -> str | None:
        """The cancel marker's reason, or None (asked at every step of every job: no pathlib)."""
        try:
            fd = os.open(self._job_file(job_id, CANCEL), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.read(fd, 65536).decode(errors="replace") or "cancelled"
        finally:
            os.close(fd)

    def sync(self) -> None:
        """Everything written under the data root so far is durable once this returns."""
        sync_filesystem(self.root)

    def open_job_file(self, job_id: str, kind: str, flags: int = 0) -> int:
        """A descriptor (read/write, created if missing, plus flags) on jobs/<job_id>.<kind>."""
        path = self._job_file(job_id, kind)
        flags |= os.O_RDWR | os.O_CREAT
        try:
            return os.open(path, flags, 0o644)
        except FileNotFoundError:  # the data root's first job
            os.makedirs(self._jobs, exist_ok=True)
            return os.open(path, flags, 0o644)

    def lock_job(self, job_id: str) -> int:
        """Take the job lock (across processes and threads) and return its descriptor, open for
        appending to the journal. Whoever holds several job locks at once takes them in job-id
        order, so two batches can never wait on each other."""
        fd = self.open_job_file(job_id, JOURNAL, os.O_APPEND)
        try:
            lock_byte(fd, JOB_LOCK_BYTE, wait=True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # --- results -----------------------------------------------------------------------------

    def new_work_dir(self, result_dir: Path) -> Path:
        work = result_dir.parent / f".tmp-{result_dir.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.mkdir(work)
        except FileNotFoundError:  # the prefix's first result
            result_dir.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(work)
        return work

    def commit_result(self, work_dir: Path, result_dir: Path, manifest: dict[str, Any]) -> bool:
        """Make a finished work dir the job's result, atomically and durably.

        Returns False if another delivery of the same job committed first (its result wins and
        this one is discarded), which is how a redelivered job avoids a second completion.
        """
        self.stage_result(work_dir, manifest)
        placed = self.place_result(work_dir, result_dir)
        if placed:
            fsync_dir(result_dir.parent)
        return placed

    def stage_result(self, work_dir: Path, manifest: dict[str, Any], *, sync: bool = True) -> None:
        """Write the manifest into the work dir; with sync, fsync it, the results and the dir
        (without: the caller syncs a whole batch with `sync()` before placing any of it)."""
        # No indent: json's C encoder (indent forces the pure-Python one, per job).
        manifest_text = json.dumps(manifest, sort_keys=True)
        write_synced(work_dir / "manifest.json", manifest_text.encode(), sync=sync)
        if not sync:
            return
        for item in os.scandir(work_dir):
            if item.is_file() and item.name != "manifest.json":
                fsync_path(item.path)
        fsync_dir(work_dir)

    def place_result(self, work_dir: Path, result_dir: Path) -> bool:
        """Rename a durable work dir into place (not yet durable itself: fsync the parent or
        `sync()`); False if another delivery's result is there already."""
        try:
            os.rename(work_dir, result_dir)
        except OSError:
            if (result_dir / "manifest.json").exists():
                shutil.rmtree(work_dir, ignore_errors=True)
                return False
            raise
        return True

    def read_manifest(self, result_dir: Path) -> dict[str, Any] | None:
        """The committed manifest, or None (asked for every job before it runs: no pathlib)."""
        try:
            fd = os.open(os.path.join(result_dir, "manifest.json"), os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as fh:
            data: dict[str, Any] = json.loads(fh.read())
        return data
