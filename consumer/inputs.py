"""A job's inputs as local files: from the media store, from https://, or from the data root.

    s3://bucket/prefix/...   in the media store: streamed to the job's scratch dir (size-checked)
    file:///...              in a file:// media store or the data root: used in place
    https://...              fetched by facefleet.fetch (SSRF-guarded, size-limited, timeouts)

Every failure is a JobError with its own code, mapped here at the boundary: a refused address
is `fetch_refused`, an unreachable one `fetch_failed` (retried when the server may recover), a
file over the limit `too_large`, a missing object `media_not_found`, a URI of another store
`media_outside_data_root`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from facefleet.consumer.errors import PermanentJobError, TransientJobError
from facefleet.fetch import FetchError, FetchPolicy, fetch_to_file, parse_allow
from facefleet.media import MediaStore, safe_name
from facefleet.settings import SettingsError, WorkerSettings
from facefleet.storage import Storage, StorageError

FETCHED = ("https", "http")


def fetch_policy(settings: WorkerSettings) -> FetchPolicy:
    """The worker's fetch policy, from its settings (a bad allow list stops the worker)."""
    try:
        allow = parse_allow(settings.fetch_allow)
    except ValueError as exc:
        raise SettingsError(f"FACEFLEET_FETCH_ALLOW: {exc}") from exc
    return FetchPolicy(
        allow=allow,
        max_bytes=settings.media_max_bytes,
        connect_timeout=settings.fetch_connect_timeout_s,
        read_timeout=settings.fetch_read_timeout_s,
        max_redirects=settings.fetch_max_redirects,
    )


class Scratch:
    """A job attempt's local scratch dir, made on first use (most file:// inputs need none)."""

    def __init__(self, parent: Path | None, job_id: str) -> None:
        self.parent = parent
        self.job_id = job_id
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            if self.parent is not None:
                self.parent.mkdir(parents=True, exist_ok=True)
            self._path = Path(tempfile.mkdtemp(prefix=f"in-{self.job_id}-", dir=self.parent))
        return self._path

    def cleanup(self) -> None:
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None


class Inputs:
    """Turns input URIs into local paths for processors. Thread-safe (no mutable state)."""

    def __init__(
        self,
        media: MediaStore,
        data_root: Callable[[], Storage],
        policy: FetchPolicy,
        max_bytes: int,
    ) -> None:
        self.media = media
        self.data_root = data_root
        """The workers' data root, asked for only when a job names a file:// input outside a
        file:// media store."""
        self.policy = policy
        self.max_bytes = max_bytes

    def localize(self, uri: str, role: str, scratch: Scratch) -> Path:
        """The input as a local file (in scratch when it had to be copied)."""
        try:
            return self._localize(uri, role, scratch)
        except FetchError as exc:
            text = f"{role}: {exc.message}"
            if exc.retryable:
                raise TransientJobError("fetch_failed", text) from exc
            raise PermanentJobError(exc.code, text) from exc
        except StorageError as exc:
            if exc.code == "storage_error":
                raise TransientJobError(exc.code, f"{role}: {exc.message}") from exc
            raise PermanentJobError(exc.code, f"{role}: {exc.message}") from exc

    def _localize(self, uri: str, role: str, scratch: Scratch) -> Path:
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        name = f"{role}-{safe_name(os.path.basename(parts.path) or role)}"
        if scheme in FETCHED:
            dest = scratch.path / name
            fetch_to_file(uri, dest, self.policy)
            return dest
        try:  # `owns` and `local_path` in one: each resolves the path (realpath) on file://
            in_store = self.media.local_path(uri)
        except StorageError as exc:
            if exc.code != "media_outside_data_root":
                raise
            if scheme not in ("", "file"):
                raise StorageError(
                    "media_outside_data_root",
                    f"{uri}: outside the media store {self.media.url} (use a URI in the store, "
                    "an https:// URL or a file:// path in the data root)",
                ) from None
            local = self.data_root().resolve(uri)  # the workers' data root, as before S3
        else:
            if in_store is None:  # an object: fetched into the scratch dir
                dest = scratch.path / name
                self.media.download(uri, dest, max_bytes=self.max_bytes)
                return dest
            local = in_store
        if not local.is_file():
            raise StorageError("media_not_found", f"{local} does not exist")
        return local
