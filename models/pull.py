"""The init container's job: make DIR hold exactly the catalogue's bytes, once, safely.

Per file: a stamp-verified file is a cache hit (a stat, no hashing); otherwise an on-disk copy is
hashed, and a missing, truncated or corrupt one is fetched into DIR/.partial/<file>.part (resuming
with a Range request), checked for size and SHA-256, fsynced and renamed into place with
os.replace, so the worker only ever sees a complete, verified file. An exclusive flock on
DIR/.lock serialises pullers sharing one volume: the second waits, then finds cache hits.

Exit codes (documented for operators in `facefleet models pull --help`):
    0  every requested model is present and verified
    2  usage: bad arguments, unreadable catalogue, unknown model name
    3  checksum mismatch: a source delivered bytes that do not match the catalogue, after retries
    4  source unreachable: no URL delivered the file (refused, DNS, HTTP 4xx/5xx, missing file)
    5  disk or permission problem writing DIR (ENOSPC, EACCES, read-only volume, not a directory)
    6  timed out waiting for another puller's lock on DIR/.lock
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TextIO

from facefleet.models.catalog import Catalog, ModelEntry
from facefleet.models.integrity import (
    CHUNK,
    Hasher,
    Stamp,
    remove_stamp,
    sha256_file,
    trusted_digest,
    write_stamp,
)
from facefleet.models.sources import (
    Opened,
    RangeNotSatisfiable,
    SourceError,
    mirror_url,
    open_source,
    resolve_url,
)

LOCK_FILE = ".lock"
PARTIAL_DIR = ".partial"


class ExitCode(enum.IntEnum):
    OK = 0
    USAGE = 2
    CHECKSUM = 3
    UNREACHABLE = 4
    DISK = 5
    LOCK_TIMEOUT = 6


class DiskError(Exception):
    """Writing the destination failed; not the source's fault, so no other URL is tried."""


class LockTimeout(Exception):
    pass


class _WrongContent(Exception):
    """The source's bytes are not the catalogue's file (size or checksum)."""


@dataclass(frozen=True)
class PullOptions:
    base_url: str | None = None
    """Replace every catalogue URL by <base_url>/<file> (an internal mirror)."""
    attempts: int = 3
    """Tries per URL for transient errors (reset connection, HTTP 5xx); each resumes."""
    backoff_s: float = 1.0
    timeout_s: float = 30.0
    lock_timeout_s: float | None = None
    """None waits for the lock as long as it takes (the other puller is making progress)."""
    progress_every_s: float = 10.0


Status = Literal["cached", "verified", "fetched", "failed"]


@dataclass(frozen=True)
class FileResult:
    name: str
    file: str
    status: Status
    code: ExitCode = ExitCode.OK
    message: str = ""
    url: str | None = None
    bytes_fetched: int = 0


@dataclass
class PullReport:
    results: list[FileResult] = field(default_factory=list)
    code: ExitCode = ExitCode.OK
    """The first failure's code, so a partial failure is never reported as success."""

    def add(self, result: FileResult) -> None:
        self.results.append(result)
        if result.code != ExitCode.OK and self.code == ExitCode.OK:
            self.code = result.code

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]


class Puller:
    """Pulls catalogue entries into one destination directory; see the module docstring."""

    def __init__(
        self,
        catalog: Catalog,
        dest: Path,
        options: PullOptions | None = None,
        *,
        hasher: Hasher = sha256_file,
        log: TextIO | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.dest = Path(dest)
        self.options = options or PullOptions()
        self.hasher = hasher
        self.log = log if log is not None else sys.stderr
        self.sleep = sleep
        self.clock = clock

    def pull(self, names: Iterable[str] | None = None) -> PullReport:
        entries = self.catalog.select(names)  # unknown names fail before any I/O
        report = PullReport()
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
            with self._locked():
                self._say(
                    f"pulling {len(entries)} model(s) into {self.dest} "
                    f"(catalogue {self.catalog.source})"
                )
                for entry in entries:
                    report.add(self._pull_one(entry))
        except LockTimeout as exc:
            self._say(f"error: {exc}")
            report.code = ExitCode.LOCK_TIMEOUT
        except OSError as exc:
            self._say(f"error: cannot use {self.dest}: {_oserror(exc)}")
            report.code = ExitCode.DISK
        return report

    # -- one file -----------------------------------------------------------------------------

    def _pull_one(self, entry: ModelEntry) -> FileResult:
        final = self.dest / entry.file
        try:
            state = self._existing(entry, final)
        except OSError as exc:
            return self._fail(entry, ExitCode.DISK, f"cannot read {final}: {_oserror(exc)}")
        if state in ("cached", "verified"):
            hit: Status = "cached" if state == "cached" else "verified"
            how = "verified stamp" if hit == "cached" else "sha256 checked"
            self._say(f"ok {entry.file}: {entry.bytes:,} bytes ({how})")
            return FileResult(entry.name, entry.file, hit)
        if state != "absent":
            self._say(f"{entry.file}: on-disk copy is {state}; fetching it again")

        urls = self._urls(entry)
        if not urls:
            return self._fail(entry, ExitCode.UNREACHABLE, "the catalogue lists no URL")
        part = self.dest / PARTIAL_DIR / f"{entry.file}.part"
        unreachable: list[str] = []
        mismatched: list[str] = []
        for url in urls:
            try:
                outcome = self._fetch_from(entry, url, part)
            except DiskError as exc:
                return self._fail(entry, ExitCode.DISK, str(exc))
            except _WrongContent as exc:
                mismatched.append(f"{url}: {exc}")
                continue
            except SourceError as exc:
                unreachable.append(str(exc))
                continue
            digest, fetched, started = outcome
            try:
                self._install(entry, part, final, digest)
            except OSError as exc:
                return self._fail(entry, ExitCode.DISK, f"cannot install {final}: {_oserror(exc)}")
            elapsed = max(self.clock() - started, 1e-9)
            self._say(
                f"fetched {entry.file}: {fetched:,} bytes in {elapsed:.1f} s "
                f"({fetched / elapsed / 1e6:.1f} MB/s) from {url}"
            )
            return FileResult(entry.name, entry.file, "fetched", url=url, bytes_fetched=fetched)
        if mismatched:
            detail = "; ".join(mismatched + unreachable)
            return self._fail(
                entry, ExitCode.CHECKSUM, f"no source had the expected bytes: {detail}"
            )
        return self._fail(
            entry, ExitCode.UNREACHABLE, "every source failed: " + "; ".join(unreachable)
        )

    def _existing(self, entry: ModelEntry, final: Path) -> str:
        """'cached' | 'verified' | 'absent' | a description of what is wrong with the copy."""
        try:
            st = final.stat()
        except FileNotFoundError:
            return "absent"
        if st.st_size != entry.bytes:
            return f"truncated or wrong ({st.st_size:,} bytes, expected {entry.bytes:,})"
        digest = trusted_digest(self.dest, entry.file, st)
        if digest == entry.sha256:
            return "cached"
        if digest is not None:
            return f"a different version (sha256 {digest[:12]}...)"
        digest = self.hasher(final)
        if digest != entry.sha256:
            return f"corrupt (sha256 {digest[:12]}..., expected {entry.sha256[:12]}...)"
        with contextlib.suppress(OSError):  # a read-only volume still verifies, just not fast
            write_stamp(self.dest, entry.file, Stamp.of(final.stat(), digest))
        return "verified"

    def _urls(self, entry: ModelEntry) -> list[str]:
        if self.options.base_url:
            return [mirror_url(self.options.base_url, entry.file)]
        return [resolve_url(u, self.catalog.source.parent) for u in entry.urls]

    def _fetch_from(self, entry: ModelEntry, url: str, part: Path) -> tuple[str, int, float]:
        """Download (resuming) and verify; returns (sha256, bytes transferred, start time)."""
        started = self.clock()
        fetched = 0
        fresh_retry_done = False
        attempt = 0
        while True:
            attempt += 1
            resumed_from = _size_or_zero(part)
            try:
                fetched += self._download(entry, url, part)
            except _WrongContent:
                _unlink(part)  # never resume another source from these bytes
                raise
            except SourceError as exc:
                if not exc.retryable or attempt >= self.options.attempts:
                    raise
                delay = self.options.backoff_s * 2 ** (attempt - 1)
                self._say(f"{entry.file}: {exc}; retrying in {delay:.0f} s")
                self.sleep(delay)
                continue
            try:
                digest = self.hasher(part)
            except OSError as exc:
                raise DiskError(f"cannot read {part}: {_oserror(exc)}") from exc
            if digest == entry.sha256:
                return digest, fetched, started
            _unlink(part)
            if resumed_from > 0 and not fresh_retry_done:
                # The stale prefix may be what is wrong; one clean download decides.
                fresh_retry_done = True
                self._say(f"{entry.file}: resumed copy fails its checksum; downloading afresh")
                continue
            raise _WrongContent(f"sha256 {digest}, expected {entry.sha256}")

    def _download(self, entry: ModelEntry, url: str, part: Path) -> int:
        """Bring `part` to entry.bytes bytes from `url`; returns the bytes transferred."""
        try:
            part.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DiskError(f"cannot create {part.parent}: {_oserror(exc)}") from exc
        have = _size_or_zero(part)
        if have > entry.bytes:
            _unlink(part)
            have = 0
        if have == entry.bytes:
            return 0  # a previous puller died between download and rename; just verify
        try:
            opened = open_source(url, have, timeout_s=self.options.timeout_s)
        except RangeNotSatisfiable:
            _unlink(part)
            have = 0
            opened = open_source(url, 0, timeout_s=self.options.timeout_s)
        try:
            if opened.total is not None and opened.total != entry.bytes:
                raise _WrongContent(f"source has {opened.total:,} bytes, expected {entry.bytes:,}")
            if have and opened.offset == have:
                self._say(f"{entry.file}: resuming at {have:,} of {entry.bytes:,} bytes")
            have = opened.offset
            return self._copy(entry, opened, part, have)
        finally:
            opened.close()

    def _copy(self, entry: ModelEntry, source: Opened, part: Path, have: int) -> int:
        written = have
        started = last_report = self.clock()
        try:
            out = part.open("r+b" if have else "wb")
        except OSError as exc:
            raise DiskError(f"cannot write {part}: {_oserror(exc)}") from exc
        with out:
            try:
                out.seek(have)
                out.truncate()
                while chunk := source.read(CHUNK):
                    if written + len(chunk) > entry.bytes:
                        raise _WrongContent(f"source sends more than {entry.bytes:,} bytes")
                    out.write(chunk)
                    written += len(chunk)
                    now = self.clock()
                    if now - last_report >= self.options.progress_every_s:
                        last_report = now
                        rate = (written - have) / max(now - started, 1e-9) / 1e6
                        self._say(
                            f"{entry.file}: {written:,}/{entry.bytes:,} bytes "
                            f"({100 * written // entry.bytes}%) {rate:.1f} MB/s"
                        )
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise DiskError(f"cannot write {part}: {_oserror(exc)}") from exc
        if written < entry.bytes:
            raise SourceError(
                source.url,
                f"connection ended after {written:,} of {entry.bytes:,} bytes",
                retryable=True,
            )
        return written - have

    def _install(self, entry: ModelEntry, part: Path, final: Path, digest: str) -> None:
        remove_stamp(self.dest, entry.file)
        os.replace(part, final)
        _fsync_dir(final.parent)
        write_stamp(self.dest, entry.file, Stamp.of(final.stat(), digest))

    # -- lock and output ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        path = self.dest / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                self._say(f"waiting for {path} (held by {holder}): another pull is running")
                self._wait_for_lock(fd, path)
            os.ftruncate(fd, 0)
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()} since {stamp}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _wait_for_lock(self, fd: int, path: Path) -> None:
        timeout = self.options.lock_timeout_s
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        deadline = self.clock() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if self.clock() >= deadline:
                    raise LockTimeout(f"gave up waiting {timeout:.0f} s for {path}") from None
                self.sleep(0.2)

    def _fail(self, entry: ModelEntry, code: ExitCode, message: str) -> FileResult:
        self._say(f"FAILED {entry.file} ({entry.name}): {message}")
        return FileResult(entry.name, entry.file, "failed", code, message)

    def _say(self, line: str) -> None:
        print(line, file=self.log, flush=True)


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise DiskError(f"cannot stat {path}: {_oserror(exc)}") from exc


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise DiskError(f"cannot remove {path}: {_oserror(exc)}") from exc


def _fsync_dir(path: Path) -> None:
    """Make the rename durable: without it a node crash can lose the directory entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _oserror(exc: OSError) -> str:
    return f"{exc.strerror or exc} (errno {exc.errno})" if exc.errno else str(exc)
