"""The media store: where job inputs and results live, behind one small interface.

FACEFLEET_MEDIA_URL picks the backend:

    file:///abs/path        a POSIX data root (a shared volume), through facefleet.storage
    s3://bucket[/prefix]    any S3-compatible object store, through boto3 (endpoint from
                            AWS_ENDPOINT_URL, credentials from the standard AWS chain)

Both lay media out the same way under their root:

    uploads/<sha256>/<name>             content-addressed inputs (the same bytes are stored once)
    uploads/direct/<uuid>/<name>        direct uploads through a presigned PUT (s3 only)
    <output prefix>/<job_id>/<file>     results; <job_id>/manifest.json appears last, atomically
    submissions/<job_id>.json           the producer's idempotency record (create-once)

Why one interface with two backends: the producer, gateway and worker only ever ask "store
this", "fetch that", "commit this result", so moving media off a shared volume is a setting,
not a code path per caller. URIs of anything outside the store are refused
(media_outside_data_root) just as the data root refuses paths outside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mimetypes
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from facefleet.storage import Storage, StorageError, fsync_dir, fsync_path

log = logging.getLogger(__name__)

CHUNK = 1 << 20
"""Read/write block for streamed copies and hashing."""
MANIFEST = "manifest.json"
SETTING = "FACEFLEET_MEDIA_URL"
MiB = 1 << 20
STREAM_PART = 5 * MiB
"""Part size of put_stream's multipart uploads: S3's minimum, for the least memory."""
MAX_PRESIGN_S = 7 * 24 * 3600
"""SigV4's longest presigned-URL lifetime."""

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_DOTS = re.compile(r"\.{2,}")


@dataclass(frozen=True)
class Stored:
    """What put_stream stored: its URI, size in bytes and SHA-256 (hex)."""

    uri: str
    size: int
    sha256: str


@dataclass
class Staged:
    """A result uploaded/written but not yet committed (place_result commits it).

    location is the final result directory (file) or key prefix (s3); committed is True when
    staging found another delivery's manifest already there (place_result then returns False).
    """

    prefix: str
    job_id: str
    work_dir: Path
    manifest: bytes
    location: str
    files: tuple[str, ...] = ()
    committed: bool = False


@runtime_checkable
class MediaStore(Protocol):
    """The media store's whole surface (FileMediaStore, S3MediaStore)."""

    url: str

    def owns(self, uri: str) -> bool: ...
    def put_file(self, path: Path, name: str | None = None) -> str: ...
    def put_stream(
        self, stream: BinaryIO, name: str, *, max_bytes: int | None = None
    ) -> Stored: ...
    def download(self, uri: str, dest: Path, *, max_bytes: int | None = None) -> int: ...
    def local_path(self, uri: str) -> Path | None:
        """The object's path on this machine, None where it has none (download it); a URI the
        store does not own (`owns` is False) raises StorageError media_outside_data_root."""
        ...

    def open(self, uri: str) -> tuple[Iterator[bytes], int, str | None]: ...
    def default_output_prefix(self) -> str: ...
    def check_output_prefix(self, prefix: str) -> None: ...
    def result_uri(self, prefix: str, job_id: str, name: str) -> str: ...
    def new_work_dir(self, prefix: str, job_id: str) -> Path: ...
    def stage_result(
        self,
        work_dir: Path,
        prefix: str,
        job_id: str,
        manifest: dict[str, Any],
        *,
        sync: bool = True,
    ) -> Staged: ...
    def place_result(self, staged: Staged) -> bool: ...
    def commit_result(
        self, work_dir: Path, prefix: str, job_id: str, manifest: dict[str, Any]
    ) -> bool: ...
    def sync(self) -> None: ...
    def read_manifest(self, prefix: str, job_id: str) -> dict[str, Any] | None: ...
    def presign_get(self, uri: str, expires_s: int) -> str | None: ...
    def presign_put(self, name: str, expires_s: int) -> tuple[str, str] | None: ...
    def mark_submitted(self, job_id: str, body: bytes) -> bool: ...
    def submitted(self, job_id: str) -> bool: ...
    def submission(self, job_id: str) -> bytes | None: ...


# --- helpers shared by both backends ------------------------------------------------------------


def safe_name(name: str) -> str:
    """A safe basename for a stored file: the last path component, characters outside
    [A-Za-z0-9._-] replaced by '_', no leading dot, no '..', at most 128 characters (the
    extension kept). Why: names come from users (upload filenames) and become keys/paths."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _DOTS.sub(".", _UNSAFE.sub("_", base)).lstrip(".")
    if len(cleaned) > 128:
        stem, ext = os.path.splitext(cleaned)
        ext = ext[:16]
        cleaned = stem[: 128 - len(ext)] + ext
    return cleaned or "file"


def check_job_id(job_id: str) -> str:
    """A job id must be a UUID before it becomes a path or key (no traversal, no odd keys)."""
    try:
        uuid.UUID(job_id)
    except (ValueError, TypeError, AttributeError) as exc:
        raise StorageError("invalid_request", f"job id {job_id!r} is not a UUID") from exc
    return job_id


def _check_rel(name: str) -> str:
    """A result file name relative to the job's directory: no absolute path, no '..'."""
    parts = name.split("/")
    if not name or "\x00" in name or ".." in name or any(p in ("", ".") for p in parts):
        raise StorageError("invalid_request", f"{name!r} is not a valid result file name")
    return name


def _content_type(name: str) -> str | None:
    return mimetypes.guess_type(name)[0]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _result_files(work_dir: Path) -> list[str]:
    """Regular files under a work dir (relative POSIX paths, sorted), without the top-level
    manifest. Symlinks are skipped: a result must never carry a file from outside its dir."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(work_dir):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        rel_dir = os.path.relpath(dirpath, work_dir)
        for fname in filenames:
            full = os.path.join(dirpath, fname)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            rel = fname if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{fname}"
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True).encode()


def _too_large(what: str, max_bytes: int) -> StorageError:
    return StorageError("too_large", f"{what}: larger than the limit of {max_bytes} bytes")


class _HashingReader:
    """A non-seekable reader over a caller's stream that hashes, counts and enforces max_bytes
    while the bytes go by. read(n) fills up to n bytes (looping over short reads), so a
    multipart upload never cuts a part short in the middle of a stream (S3 refuses non-final
    parts under 5 MiB)."""

    def __init__(self, stream: BinaryIO, max_bytes: int | None, what: str) -> None:
        self._stream = stream
        self._max = max_bytes
        self._what = what
        self.digest = hashlib.sha256()
        self.size = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int = -1) -> bytes:
        if self._eof:
            return b""
        want = size if size is not None and size >= 0 else None
        parts: list[bytes] = []
        got = 0
        while want is None or got < want:
            block = self._stream.read(CHUNK if want is None else want - got)
            if not block:
                self._eof = True
                break
            parts.append(block)
            got += len(block)
            self.size += len(block)
            if self._max is not None and self.size > self._max:
                raise _too_large(self._what, self._max)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.digest.update(data)
        return data


# --- file backend -------------------------------------------------------------------------------


class FileMediaStore:
    """Media under a POSIX data root, through facefleet.storage.Storage (its path checks and
    durable writes). Thread-safe: no state beyond Storage's.

    stage_result/place_result/commit_result keep Storage's contract (OSError on a broken
    volume); the other methods raise StorageError."""

    def __init__(self, root: Path | Storage) -> None:
        self.storage = root if isinstance(root, Storage) else Storage(Path(root))
        self.root = self.storage.root
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"FileMediaStore({self.url})"

    # --- URIs --------------------------------------------------------------------------------

    def _resolve(self, uri: str) -> Path:
        scheme = urlsplit(uri).scheme
        if scheme not in ("", "file"):
            raise StorageError(
                "media_outside_data_root", f"{uri}: outside the media store {self.url}"
            )
        return self.storage.resolve(uri)

    def owns(self, uri: str) -> bool:
        """True for a file:// URI that resolves inside the root (symlinks followed)."""
        if not uri.startswith("file:"):
            return False
        try:
            self._resolve(uri)
        except StorageError:
            return False
        return True

    def local_path(self, uri: str) -> Path | None:
        """The resolved path inside the root (refused outside: media_outside_data_root)."""
        return self._resolve(uri)

    # --- media -------------------------------------------------------------------------------

    def _upload_path(self, sha: str, name: str) -> Path:
        return self.root / "uploads" / sha / name

    def _commit_upload(self, tmp: Path, dest: Path) -> None:
        """Move a durable temp file to its content address (another copy there already wins:
        same bytes) and make the name durable."""
        created = not dest.parent.is_dir()
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            tmp.unlink()
            return
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        if created:
            fsync_dir(dest.parent.parent)

    def put_file(self, path: Path, name: str | None = None) -> str:
        """Copy a local file to uploads/<sha256>/<name> unless those bytes are there already."""
        src = Path(path)
        if not src.is_file():
            raise StorageError("media_not_found", f"{src}: no such file")
        try:
            sha = _sha256_file(src)
            dest = self._upload_path(sha, safe_name(name or src.name))
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
                try:
                    shutil.copyfile(src, tmp)
                    fsync_path(tmp)
                    self._commit_upload(tmp, dest)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
        except OSError as exc:
            raise StorageError("storage_error", f"{src}: {exc}") from exc
        return dest.as_uri()

    def put_stream(self, stream: BinaryIO, name: str, *, max_bytes: int | None = None) -> Stored:
        """Stream to a temp file (hashing as it goes), then rename it to its content address."""
        uploads = self.root / "uploads"
        reader = _HashingReader(stream, max_bytes, name)
        try:
            uploads.mkdir(exist_ok=True)
            tmp = uploads / f".put-{uuid.uuid4().hex}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                try:
                    while block := reader.read(CHUNK):
                        _write_all(fd, block)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                sha = reader.digest.hexdigest()
                dest = self._upload_path(sha, safe_name(name))
                self._commit_upload(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError("storage_error", f"{name}: {exc}") from exc
        return Stored(dest.as_uri(), reader.size, sha)

    def download(self, uri: str, dest: Path, *, max_bytes: int | None = None) -> int:
        """Copy a stored file to dest (a temp name renamed at the end: never a partial dest).

        A copy, not a hard link: a caller writing to dest must not change the stored media.
        Callers that only read can use local_path() and copy nothing."""
        src = self._resolve(uri)
        dest = Path(dest)
        try:
            fd_in = os.open(src, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise StorageError("media_not_found", f"{uri}: no such file") from exc
        except OSError as exc:
            raise StorageError("storage_error", f"{uri}: {exc}") from exc
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            if not os.path.isfile(src):
                raise StorageError("media_not_found", f"{uri}: not a file")
            size = os.fstat(fd_in).st_size
            if max_bytes is not None and size > max_bytes:
                raise _too_large(uri, max_bytes)
            written = 0
            with open(tmp, "wb") as out, os.fdopen(os.dup(fd_in), "rb", buffering=0) as fin:
                buf = bytearray(CHUNK)
                view = memoryview(buf)
                while n := fin.readinto(buf):
                    written += n
                    if max_bytes is not None and written > max_bytes:
                        raise _too_large(uri, max_bytes)
                    out.write(view[:n])
            os.replace(tmp, dest)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError("storage_error", f"{uri} -> {dest}: {exc}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd_in)
        return written

    def open(self, uri: str) -> tuple[Iterator[bytes], int, str | None]:
        """A stored file as chunks (the file is closed when the iterator ends or is closed)."""
        path = self._resolve(uri)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the generator
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise StorageError("media_not_found", f"{uri}: no such file") from exc
        except OSError as exc:
            raise StorageError("storage_error", f"{uri}: {exc}") from exc
        size = os.fstat(fh.fileno()).st_size

        def chunks() -> Iterator[bytes]:
            with fh:
                while block := fh.read(CHUNK):
                    yield block

        return chunks(), size, _content_type(path.name)

    # --- results -----------------------------------------------------------------------------

    def default_output_prefix(self) -> str:
        return self.storage.default_output_prefix()

    def check_output_prefix(self, prefix: str) -> None:
        self._resolve(_dir_uri(prefix))

    def _result_dir(self, prefix: str, job_id: str) -> Path:
        check_job_id(job_id)
        if urlsplit(prefix).scheme not in ("", "file") or _dir_uri(prefix) == "/":
            # "/" and "file:///" name the filesystem root, which Storage.result_dir (stripping
            # the slash) would read as the data root itself.
            self._resolve(_dir_uri(prefix))
        return self.storage.result_dir(prefix, job_id)

    def result_uri(self, prefix: str, job_id: str, name: str) -> str:
        return (self._result_dir(prefix, job_id) / _check_rel(name)).as_uri()

    def new_work_dir(self, prefix: str, job_id: str) -> Path:
        """A fresh work dir beside the job's result dir (same filesystem: placing is a rename)."""
        return self.storage.new_work_dir(self._result_dir(prefix, job_id))

    def stage_result(
        self,
        work_dir: Path,
        prefix: str,
        job_id: str,
        manifest: dict[str, Any],
        *,
        sync: bool = True,
    ) -> Staged:
        """Write manifest.json into the work dir (fsynced with the results unless sync=False:
        the batch lane then makes a whole batch durable with one sync())."""
        result_dir = self._result_dir(prefix, job_id)
        self.storage.stage_result(work_dir, manifest, sync=sync)
        return Staged(prefix, job_id, work_dir, _manifest_bytes(manifest), str(result_dir))

    def place_result(self, staged: Staged) -> bool:
        """Rename the work dir to <prefix>/<job_id>; False if a result is there already."""
        return self.storage.place_result(staged.work_dir, Path(staged.location))

    def commit_result(
        self, work_dir: Path, prefix: str, job_id: str, manifest: dict[str, Any]
    ) -> bool:
        return self.storage.commit_result(work_dir, self._result_dir(prefix, job_id), manifest)

    def sync(self) -> None:
        self.storage.sync()

    def read_manifest(self, prefix: str, job_id: str) -> dict[str, Any] | None:
        return self.storage.read_manifest(self._result_dir(prefix, job_id))

    # --- presigning and submissions ----------------------------------------------------------

    def presign_get(self, uri: str, expires_s: int) -> str | None:
        """None: file media is served by the gateway (open()), not by a URL of its own."""
        self._resolve(uri)
        return None

    def presign_put(self, name: str, expires_s: int) -> tuple[str, str] | None:
        return None

    def _submission(self, job_id: str) -> str:
        return os.path.join(self.root, "submissions", f"{check_job_id(job_id)}.json")

    def mark_submitted(self, job_id: str, body: bytes) -> bool:
        """Create submissions/<job_id>.json once (O_CREAT|O_EXCL). Not fsynced: it is written
        after the job's confirm and only spares a retry its second publish; if a crash loses
        it, the retry publishes again and the worker finds the job done (completed once)."""
        path = self._submission(job_id)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            try:
                fd = os.open(path, flags, 0o644)
            except FileNotFoundError:  # the root's first submission
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, flags, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError("storage_error", f"{path}: {exc}") from exc
        try:
            try:
                _write_all(fd, body)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise StorageError("storage_error", f"{path}: {exc}") from exc
        return True

    def submitted(self, job_id: str) -> bool:
        return os.path.exists(self._submission(job_id))

    def submission(self, job_id: str) -> bytes | None:
        """The body mark_submitted stored (the job request), or None."""
        try:
            with open(self._submission(job_id), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError("storage_error", f"{self._submission(job_id)}: {exc}") from exc


def _dir_uri(prefix: str) -> str:
    """A directory URI/path without its trailing slash; "/" for the filesystem root."""
    stripped = prefix.rstrip("/")
    return "/" if stripped in ("", "file:", "file://localhost") else stripped


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- S3 backend ---------------------------------------------------------------------------------


@cache
def _s3_errors() -> tuple[type[Exception], ...]:
    """Exceptions the AWS SDK raises that become StorageError at this module's boundary."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import (  # type: ignore[import-untyped]
        RetriesExceededError,
        TransferNotDoneError,
    )

    return (ClientError, BotoCoreError, Boto3Error, RetriesExceededError, TransferNotDoneError)


def _error_code(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _s3_error(exc: BaseException, what: str) -> StorageError:
    """Map an SDK error: a missing object is media_not_found (permanent); everything else
    (access denied, a missing bucket, throttling, 5xx, connection errors) is storage_error,
    which the worker treats as transient."""
    code, status = _error_code(exc)
    if code in ("NoSuchKey", "NotFound", "404") or (status == 404 and code != "NoSuchBucket"):
        return StorageError("media_not_found", f"{what}: no such object")
    if code:
        message = getattr(exc, "response", {}).get("Error", {}).get("Message", "")
        return StorageError("storage_error", f"{what}: {code} {message}".rstrip())
    return StorageError("storage_error", f"{what}: {type(exc).__name__}: {exc}")


def _validate_bucket(bucket: str) -> str:
    """S3's bucket naming rules (a DNS label sequence, so virtual-host addressing works)."""
    bad = (".", "-")
    if (
        not _BUCKET.match(bucket)
        or _IPV4.match(bucket)
        or any(f"{x}{y}" in bucket for x in bad for y in bad if (x, y) != ("-", "-"))
    ):
        raise ValueError(
            f"{SETTING}: {bucket!r} is not a valid S3 bucket name (3-63 characters: lower-case "
            "letters, digits, '-' and '.', a DNS name, not an IP address)"
        )
    return bucket


def _validate_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    if prefix and (".." in prefix or any(p in ("", ".") for p in prefix.split("/"))):
        raise ValueError(f"{SETTING}: invalid key prefix {prefix!r} (no '.', '..' or '//')")
    return prefix


class S3MediaStore:
    """Media in an S3-compatible bucket, under an optional key prefix.

    One boto3 client per store, created on first use under a lock (clients are thread-safe,
    sessions are not), so the store can be shared by every thread of a process. Conditional
    creates (put_object IfNoneMatch='*') make the result manifest and the submission record
    create-once; whether the server honours them is probed once (see _create).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        conditional_writes: bool | None = None,
        max_pool_connections: int = 32,
        multipart_bytes: int = 16 * MiB,
        max_concurrency: int = 10,
    ) -> None:
        """conditional_writes: None probes the server on first use; True/False skip the probe.
        multipart_bytes: the multipart threshold and part size of file transfers (16 MiB: a
        2 GB video is 128 parts; AWS suggests 8-16 MiB parts/ranges)."""
        self.bucket = _validate_bucket(bucket)
        self.prefix = _validate_prefix(prefix)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._base = f"{self.prefix}/" if self.prefix else ""
        self._pool = max_pool_connections
        self._multipart = multipart_bytes
        self._concurrency = max_concurrency
        self._client: Any = None
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._conditional = conditional_writes
        self._transfer_cfg: Any = None
        self._stream_cfg: Any = None

    def __repr__(self) -> str:
        return f"S3MediaStore({self.url})"

    # --- SDK plumbing ------------------------------------------------------------------------

    def _s3(self) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    import boto3
                    from boto3.s3.transfer import TransferConfig
                    from botocore.config import Config

                    config = Config(
                        retries={"mode": "standard"},
                        max_pool_connections=self._pool,
                        signature_version="s3v4",
                    )
                    # A session per store: boto3's default session is shared and not
                    # thread-safe; the client it makes is.
                    self._client = boto3.session.Session().client("s3", config=config)
                    self._transfer_cfg = TransferConfig(
                        multipart_threshold=self._multipart,
                        multipart_chunksize=self._multipart,
                        max_concurrency=self._concurrency,
                        max_io_queue=16,  # 16 x 256 KiB read ahead of the disk
                        preferred_transfer_client="classic",
                    )
                    # Streams of unknown length are read part by part into memory: parts of
                    # S3's minimum size (5 MiB), one uploading while the next is read, keep a
                    # stream's memory near 20 MiB whatever its length (10,000 parts: streams
                    # up to ~48 GiB).
                    stream = TransferConfig(
                        multipart_threshold=STREAM_PART,
                        multipart_chunksize=STREAM_PART,
                        max_concurrency=2,
                        preferred_transfer_client="classic",
                    )
                    stream.max_in_memory_upload_chunks = 1
                    self._stream_cfg = stream
                client = self._client
        return client

    def transfer_config(self) -> Any:
        """The boto3 TransferConfig of file transfers (put_file, download, results)."""
        self._s3()
        return self._transfer_cfg

    def _transfers(self, *, stream: bool = False) -> Any:
        """A transfer manager for one call (as boto3's upload_file does): multipart uploads and
        ranged downloads, in parallel, with their parts retried."""
        from boto3.s3.transfer import create_transfer_manager

        client = self._s3()
        return create_transfer_manager(client, self._stream_cfg if stream else self._transfer_cfg)

    def _call(self, what: str, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except StorageError:
            raise
        except _s3_errors() as exc:
            raise _s3_error(exc, what) from exc

    # --- URIs and keys -----------------------------------------------------------------------

    def _key(self, rel: str) -> str:
        key = self._base + rel
        if ".." in key:
            raise StorageError("invalid_request", f"{key!r}: object keys never contain '..'")
        return key

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _split(self, uri: str) -> tuple[str, str] | None:
        if not uri.startswith("s3://"):
            return None
        bucket, _, key = uri[5:].partition("/")
        return bucket, key

    def _key_of(self, uri: str) -> str:
        """The object key of one of this store's URIs (verbatim: s3 URIs are not
        percent-encoded, as with the AWS CLI); any other URI: media_outside_data_root."""
        parts = self._split(uri)
        if parts is not None:
            bucket, key = parts
            if (
                bucket == self.bucket
                and key.startswith(self._base)
                and len(key) > len(self._base)
                and ".." not in key
                and not key.endswith("/")
            ):
                return key
        raise StorageError("media_outside_data_root", f"{uri}: outside the media store {self.url}")

    def owns(self, uri: str) -> bool:
        try:
            self._key_of(uri)
        except StorageError:
            return False
        return True

    def local_path(self, uri: str) -> Path | None:
        """None: an object has no local path (download() it)."""
        self._key_of(uri)
        return None

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            response: dict[str, Any] = self._s3().head_object(Bucket=self.bucket, Key=key)
        except _s3_errors() as exc:
            err = _s3_error(exc, self._uri(key))
            if err.code == "media_not_found":
                return None
            raise err from exc
        return response

    def _delete_quietly(self, key: str) -> None:
        try:
            self._s3().delete_object(Bucket=self.bucket, Key=key)
        except _s3_errors() as exc:
            log.warning("could not delete %s: %s", self._uri(key), exc)

    # --- media -------------------------------------------------------------------------------

    def put_file(self, path: Path, name: str | None = None) -> str:
        """Upload to uploads/<sha256>/<name> unless a HEAD finds those bytes there already.
        The file must not change during the call (it is read twice: hash, then upload)."""
        src = Path(path)
        if not src.is_file():
            raise StorageError("media_not_found", f"{src}: no such file")
        try:
            sha = _sha256_file(src)
        except OSError as exc:
            raise StorageError("storage_error", f"{src}: {exc}") from exc
        fname = safe_name(name or src.name)
        key = self._key(f"uploads/{sha}/{fname}")
        if self._head(key) is None:
            extra = {"ContentType": _content_type(fname) or "application/octet-stream"}
            with self._transfers() as tm:
                self._call(
                    self._uri(key),
                    lambda: tm.upload(str(src), self.bucket, key, extra_args=extra).result(),
                )
        return self._uri(key)

    def put_stream(self, stream: BinaryIO, name: str, *, max_bytes: int | None = None) -> Stored:
        """Stream to uploads/.incoming/<uuid> (hashing on the way; multipart past 5 MiB, about
        4 parts' worth of memory), then copy to the content address and delete the temp key.
        Over max_bytes: too_large, the multipart upload aborted and no temp key left."""
        fname = safe_name(name)
        tmp_key = self._key(f"uploads/.incoming/{uuid.uuid4().hex}")
        reader = _HashingReader(stream, max_bytes, name)
        extra = {"ContentType": _content_type(fname) or "application/octet-stream"}
        try:
            with self._transfers(stream=True) as tm:
                self._call(
                    self._uri(tmp_key),
                    lambda: tm.upload(reader, self.bucket, tmp_key, extra_args=extra).result(),
                )
        except BaseException:
            self._delete_quietly(tmp_key)  # a put that completed before the failure
            raise
        sha = reader.digest.hexdigest()
        key = self._key(f"uploads/{sha}/{fname}")
        try:
            if self._head(key) is None:
                self._copy(tmp_key, key, reader.size)
        finally:
            self._delete_quietly(tmp_key)
        return Stored(self._uri(key), reader.size, sha)

    def _copy(self, src_key: str, dest_key: str, size: int) -> None:
        """Server-side copy: one CopyObject up to 5 GiB (its limit), a multipart copy above."""
        source = {"Bucket": self.bucket, "Key": src_key}
        what = f"{self._uri(src_key)} -> {self._uri(dest_key)}"
        if size < 5 * 1024 * MiB:
            self._call(
                what,
                self._s3().copy_object,
                Bucket=self.bucket,
                Key=dest_key,
                CopySource=source,
            )
            return
        with self._transfers() as tm:
            self._call(what, lambda: tm.copy(source, self.bucket, dest_key).result())

    def download(self, uri: str, dest: Path, *, max_bytes: int | None = None) -> int:
        """Download an object to dest through the transfer manager (parallel ranged GETs past
        16 MiB, written to a temp name renamed at the end).

        The size comes from our HEAD, checked against max_bytes before any byte moves; the
        transfer is then told that size and ETag, so it skips its own HEAD and every GET
        carries If-Match: the object cannot change (or grow) under the download."""
        key = self._key_of(uri)
        head = self._head(key)
        if head is None:
            raise StorageError("media_not_found", f"{uri}: no such object")
        size = int(head["ContentLength"])
        if max_bytes is not None and size > max_bytes:
            raise _too_large(uri, max_bytes)
        known = _known_object(size, head.get("ETag"))
        dest = Path(dest)
        try:
            with self._transfers() as tm:
                self._call(
                    uri,
                    lambda: tm.download(self.bucket, key, str(dest), subscribers=[known]).result(),
                )
        except OSError as exc:  # the local side: no such directory, disk full
            raise StorageError("storage_error", f"{uri} -> {dest}: {exc}") from exc
        written = dest.stat().st_size
        if written != size:  # pragma: no cover - If-Match makes this unreachable
            dest.unlink(missing_ok=True)
            raise StorageError("storage_error", f"{uri}: got {written} bytes, expected {size}")
        return written

    def open(self, uri: str) -> tuple[Iterator[bytes], int, str | None]:
        """One GET, streamed in chunks (the connection is released when the iterator ends)."""
        key = self._key_of(uri)
        response = self._call(uri, self._s3().get_object, Bucket=self.bucket, Key=key)
        body = response["Body"]
        errors = _s3_errors()

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            except errors as exc:
                raise _s3_error(exc, uri) from exc
            finally:
                body.close()

        return chunks(), int(response["ContentLength"]), response.get("ContentType")

    # --- results -----------------------------------------------------------------------------

    def default_output_prefix(self) -> str:
        return self._uri(f"{self._base}results/")

    def _prefix_key(self, prefix: str) -> str:
        """The key prefix (no trailing '/') of an output prefix of this store."""
        parts = self._split(prefix)
        if parts is not None:
            bucket, key = parts
            key = key.rstrip("/")
            inside = key == self.prefix or key.startswith(self._base)
            if bucket == self.bucket and inside and ".." not in key and "//" not in key:
                return key
        raise StorageError(
            "media_outside_data_root", f"{prefix}: outside the media store {self.url}"
        )

    def check_output_prefix(self, prefix: str) -> None:
        self._prefix_key(prefix)

    def _result_key(self, prefix: str, job_id: str, name: str) -> str:
        base = self._prefix_key(prefix)
        rel = f"{check_job_id(job_id)}/{_check_rel(name)}"
        return f"{base}/{rel}" if base else rel

    def result_uri(self, prefix: str, job_id: str, name: str) -> str:
        return self._uri(self._result_key(prefix, job_id, name))

    def new_work_dir(self, prefix: str, job_id: str) -> Path:
        """A local temp dir for the job's outputs (stage_result uploads it, place removes it)."""
        import tempfile

        self._prefix_key(prefix)
        return Path(tempfile.mkdtemp(prefix=f"facefleet-{check_job_id(job_id)}-"))

    def stage_result(
        self,
        work_dir: Path,
        prefix: str,
        job_id: str,
        manifest: dict[str, Any],
        *,
        sync: bool = True,
    ) -> Staged:
        """Upload every result file (in parallel, multipart for big ones), not the manifest.

        If a manifest is there already (another delivery committed), nothing is uploaded: the
        committed result's files are never overwritten, and place_result returns False.
        (Two deliveries staging at the same moment are excluded by the job lock.)"""
        manifest_key = self._result_key(prefix, job_id, MANIFEST)
        location = manifest_key[: -len(MANIFEST)]
        files = tuple(_result_files(Path(work_dir)))
        for rel in files:
            _check_rel(rel)
        body = _manifest_bytes(manifest)
        if self._head(manifest_key) is not None:
            return Staged(prefix, job_id, Path(work_dir), body, location, files, committed=True)
        with self._transfers() as tm:
            futures = [
                (
                    location + rel,
                    tm.upload(
                        str(Path(work_dir) / rel),
                        self.bucket,
                        location + rel,
                        extra_args={
                            "ContentType": _content_type(rel) or "application/octet-stream"
                        },
                    ),
                )
                for rel in files
            ]
            for key, future in futures:
                self._call(self._uri(key), future.result)
        return Staged(prefix, job_id, Path(work_dir), body, location, files)

    def place_result(self, staged: Staged) -> bool:
        """Commit: create manifest.json, after every file, with a conditional create; False if
        another delivery's manifest is there (its result wins). The local work dir is removed
        once the outcome is known (kept when the store could not be reached, for a retry)."""
        placed = (not staged.committed) and self._create(
            staged.location + MANIFEST, staged.manifest, "application/json"
        )
        shutil.rmtree(staged.work_dir, ignore_errors=True)
        return placed

    def commit_result(
        self, work_dir: Path, prefix: str, job_id: str, manifest: dict[str, Any]
    ) -> bool:
        """stage + place: durable on return (a completed PUT is)."""
        return self.place_result(self.stage_result(work_dir, prefix, job_id, manifest))

    def sync(self) -> None:
        """Nothing to do: every completed PUT is durable."""

    def read_manifest(self, prefix: str, job_id: str) -> dict[str, Any] | None:
        key = self._result_key(prefix, job_id, MANIFEST)
        try:
            response = self._s3().get_object(Bucket=self.bucket, Key=key)
            data: dict[str, Any] = json.loads(response["Body"].read())
        except _s3_errors() as exc:
            err = _s3_error(exc, self._uri(key))
            if err.code == "media_not_found":
                return None
            raise err from exc
        return data

    # --- presigning and submissions ----------------------------------------------------------

    def presign_get(self, uri: str, expires_s: int) -> str | None:
        """A GET URL for one object, valid expires_s seconds (SigV4: at most 7 days)."""
        key = self._key_of(uri)
        url: str = self._call(
            uri,
            self._s3().generate_presigned_url,
            ClientMethod="get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=_expiry(expires_s),
        )
        return url

    def presign_put(self, name: str, expires_s: int) -> tuple[str, str] | None:
        """A PUT URL for a fresh key uploads/direct/<uuid>/<name>, and that object's URI: a
        client uploads straight to the store and submits the URI."""
        key = self._key(f"uploads/direct/{uuid.uuid4()}/{safe_name(name)}")
        url: str = self._call(
            self._uri(key),
            self._s3().generate_presigned_url,
            ClientMethod="put_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=_expiry(expires_s),
        )
        return url, self._uri(key)

    def _submission_key(self, job_id: str) -> str:
        return self._key(f"submissions/{check_job_id(job_id)}.json")

    def mark_submitted(self, job_id: str, body: bytes) -> bool:
        """Create submissions/<job_id>.json once; True if this call created it."""
        return self._create(self._submission_key(job_id), body, "application/json")

    def submitted(self, job_id: str) -> bool:
        return self._head(self._submission_key(job_id)) is not None

    def submission(self, job_id: str) -> bytes | None:
        """The body mark_submitted stored (the job request), or None."""
        key = self._submission_key(job_id)
        try:
            response = self._s3().get_object(Bucket=self.bucket, Key=key)
            body: bytes = response["Body"].read()
        except _s3_errors() as exc:
            err = _s3_error(exc, self._uri(key))
            if err.code == "media_not_found":
                return None
            raise err from exc
        return body

    # --- conditional create ------------------------------------------------------------------

    def conditional_writes(self) -> bool:
        """Whether the server honours If-None-Match on PutObject (probed once, then remembered).

        The probe creates a scratch key twice with If-None-Match: '*': a 412 on the second
        try means it is honoured; a second success (the header ignored) or a refusal of the
        header (501/400) means it is not. Transient errors are raised, not remembered."""
        if self._conditional is None:
            with self._probe_lock:
                if self._conditional is None:
                    self._conditional = self._probe_conditional()
                    if not self._conditional:
                        log.warning(
                            "%s does not honour If-None-Match on PutObject: create-once writes "
                            "fall back to HEAD-then-PUT (not atomic between writers)",
                            self.url,
                        )
        return self._conditional

    def _probe_conditional(self) -> bool:
        key = self._key(f".facefleet/probe-{uuid.uuid4().hex}")
        client = self._s3()
        errors = _s3_errors()
        created = False
        try:
            for attempt in (1, 2):
                try:
                    client.put_object(Bucket=self.bucket, Key=key, Body=b"", IfNoneMatch="*")
                    created = True
                except errors as exc:
                    code, status = _error_code(exc)
                    if attempt == 2 and (status == 412 or code == "PreconditionFailed"):
                        return True
                    if status in (400, 501) or code in ("NotImplemented", "InvalidArgument"):
                        return False
                    raise _s3_error(exc, self._uri(key)) from exc
            return False  # the second create succeeded: the header was ignored
        finally:
            if created:
                self._delete_quietly(key)

    def _create(self, key: str, body: bytes, content_type: str) -> bool:
        """Create an object unless it exists; True if this call created it.

        With conditional writes: PutObject If-None-Match '*', atomic in the server (412 = it
        existed; 409 ConditionalRequestConflict = a concurrent create in flight, retried).
        Without them (older servers; found by conditional_writes()): HEAD, then PUT. That
        fallback is not atomic: two writers at the same instant can both see "absent" and
        both return True (the later body wins); FaceFleet's job lock keeps result commits to
        one writer, and a doubled submission record only costs a duplicate publish."""
        uri = self._uri(key)
        client = self._s3()
        if not self.conditional_writes():
            if self._head(key) is not None:
                return False
            self._call(
                uri,
                client.put_object,
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType=content_type,
            )
            return True
        for attempt in range(5):
            try:
                client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentType=content_type,
                    IfNoneMatch="*",
                )
            except _s3_errors() as exc:
                code, status = _error_code(exc)
                if status == 412 or code == "PreconditionFailed":
                    return False
                if (status == 409 or code == "ConditionalRequestConflict") and attempt < 4:
                    time.sleep(0.05 * 2**attempt)
                    continue
                raise _s3_error(exc, uri) from exc
            return True
        raise AssertionError("unreachable")  # pragma: no cover


def _expiry(expires_s: int) -> int:
    if not 1 <= expires_s <= MAX_PRESIGN_S:
        raise StorageError(
            "invalid_request", f"presigned URL lifetime {expires_s}s: use 1..{MAX_PRESIGN_S}"
        )
    return int(expires_s)


def _known_object(size: int, etag: str | None) -> Any:
    """A transfer subscriber that hands our HEAD's size and ETag to the download (no second
    HEAD; If-Match on every GET)."""
    from s3transfer.subscribers import BaseSubscriber  # type: ignore[import-untyped]

    class Known(BaseSubscriber):  # type: ignore[misc]
        def on_queued(self, future: Any, **kwargs: Any) -> None:
            future.meta.provide_transfer_size(size)
            if etag is not None:
                future.meta.provide_object_etag(etag)

    return Known()


# --- the setting --------------------------------------------------------------------------------


def open_media_store(url: str, *, data_root: Path | None = None) -> MediaStore:
    """The store FACEFLEET_MEDIA_URL names: file:///abs/path or s3://bucket[/prefix].

    An empty url means the data root (data_root, FACEFLEET_DATA_ROOT). Anything else is a
    ValueError naming the setting: an unsupported scheme, a relative or remote file URL, a
    missing or invalid bucket, credentials, a query or fragment in the URL."""
    raw = (url or "").strip()
    if not raw:
        if data_root is None:
            raise ValueError(f"{SETTING} is empty and no data root was given")
        return FileMediaStore(Path(data_root))
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        raise ValueError(f"{SETTING}={raw!r}: no query or fragment allowed")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"{SETTING}={raw!r}: a file URL names an absolute local path "
                f"(file:///abs/path), not the host {parts.netloc!r}"
            )
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"{SETTING}={raw!r}: the path must be absolute (file:///abs/path)")
        return FileMediaStore(Path(path))
    if scheme == "s3":
        if "@" in parts.netloc or ":" in parts.netloc:
            raise ValueError(
                f"{SETTING}={raw!r}: no credentials or port in the URL (the AWS credential "
                "chain supplies credentials, AWS_ENDPOINT_URL the endpoint)"
            )
        if not parts.netloc:
            raise ValueError(f"{SETTING}={raw!r}: missing bucket (s3://bucket[/prefix])")
        return S3MediaStore(_validate_bucket(parts.netloc), _validate_prefix(parts.path))
    raise ValueError(
        f"{SETTING}={raw!r}: unsupported scheme {parts.scheme!r} "
        "(use file:///abs/path or s3://bucket/prefix)"
    )
