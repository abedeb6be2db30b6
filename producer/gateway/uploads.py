"""Upload checks done before anything is queued: size (413), kind by content (415), emptiness.

The kind is sniffed from magic bytes, never taken from the file name or the client's
Content-Type, so a renamed executable is refused at the door rather than by a GPU worker.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import BinaryIO

from facefleet.storage import Storage

IMAGE_KINDS = frozenset({"jpeg", "png", "webp", "bmp"})
EXTENSIONS = {
    "jpeg": "jpg",
    "png": "png",
    "webp": "webp",
    "bmp": "bmp",
    "mp4": "mp4",
    "mov": "mov",
    "webm": "webm",
    "matroska": "mkv",
    "avi": "avi",
}
SNIFF_BYTES = 64


class UploadRejected(Exception):
    """An upload the gateway refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def sniff(head: bytes) -> str | None:
    """Media kind from the first bytes of a file, or None when unrecognised."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[4:8] == b"ftyp":
        return "mov" if head[8:12] == b"qt  " else "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm" if b"webm" in head else "matroska"
    return None


def check_media(
    role: str, head: bytes, size: int, *, max_bytes: int, allowed: Collection[str]
) -> str:
    """Kind of an upload for `role` ("source" or "target"), or UploadRejected."""
    if size == 0:
        raise UploadRejected(400, f"{role}: empty file")
    if size > max_bytes:
        raise UploadRejected(413, f"{role}: {size} bytes is over the limit of {max_bytes}")
    kind = sniff(head)
    if kind is None:
        raise UploadRejected(415, f"{role}: not a recognised image or video")
    if kind not in allowed:
        raise UploadRejected(415, f"{role}: {kind} is not accepted here ({', '.join(allowed)})")
    if role == "source" and kind not in IMAGE_KINDS:
        raise UploadRejected(415, f"source: must be an image with a face, got {kind}")
    return kind


def store_upload(storage: Storage, role: str, kind: str, data: BinaryIO) -> str:
    """Copy an upload into the data root (content-addressed) and return its file:// URI.

    Blocking; run it in a thread. The client's file name is ignored: the stored name is
    `<role>.<ext>`, so no upload can choose where it lands.
    """
    incoming = storage.root / "uploads" / ".incoming" / uuid.uuid4().hex
    incoming.mkdir(parents=True)
    try:
        tmp = incoming / f"{role}.{EXTENSIONS[kind]}"
        data.seek(0)
        with open(tmp, "wb") as out:
            shutil.copyfileobj(data, out, 1 << 20)
        return storage.import_file(tmp)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def check_stored(
    storage: Storage, role: str, uri: str, *, max_bytes: int, allowed: Collection[str]
) -> str:
    """Validate a media URI that is already in the data root (the JSON form of a submit)."""
    from facefleet.storage import StorageError

    try:
        path: Path = storage.resolve(uri)
    except StorageError as exc:
        raise UploadRejected(400, f"{role}: {exc.message}") from exc
    if not path.is_file():
        raise UploadRejected(400, f"{role}: {uri}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    check_media(role, head, path.stat().st_size, max_bytes=max_bytes, allowed=allowed)
    return uri
