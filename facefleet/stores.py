"""Open the job store a URL names (facefleet.jobstore's backends live apart from the interface,
so the interface imports neither of them)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from facefleet.jobstore import SETTING, JobStore, StoreError


def open_job_store(url: str, *, data_root: Path | None = None) -> JobStore:
    """The store FACEFLEET_STORE_URL names; empty means the journals under data_root."""
    raw = (url or "").strip()
    if not raw:
        if data_root is None:
            raise StoreError(f"{SETTING} is empty and no data root was given")
        raw = Path(data_root).resolve().as_uri()
    if raw.startswith("file:///"):
        from facefleet.journal import FileJobStore
        from facefleet.storage import Storage

        return FileJobStore(Storage(Path(unquote(urlsplit(raw).path))))
    if raw.startswith(("postgresql://", "postgres://")):
        from facefleet.pgstore import PostgresJobStore

        return PostgresJobStore(raw)
    raise StoreError(f"{SETTING}: use file:///absolute/path or postgresql://user@host/db")
