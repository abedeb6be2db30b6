"""What a media file is, from its first bytes: one sniffer for the gateway and the worker.

Why one: the gateway refuses at the door what a worker would refuse later, so both must read
the same bytes the same way (they had one each, and they disagreed on GIF, TIFF and FLV).
Why from content: a file name or a client's Content-Type is whatever the client says.

ISO base media files (MP4, MOV, HEIF, AVIF) all start with an `ftyp` box; its major and
compatible brands say which one it is. HEIC and AVIF photos are images (their brands are
listed below), not MP4 videos, although they share the container.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MediaKind = Literal["image", "video"]

HEAD_BYTES = 256
"""Bytes a caller reads for sniff(): enough for an ftyp box's brand list."""

EXTENSIONS: dict[str, str] = {
    "jpeg": "jpg",
    "png": "png",
    "webp": "webp",
    "bmp": "bmp",
    "gif": "gif",
    "tiff": "tiff",
    "heic": "heic",
    "heif": "heif",
    "avif": "avif",
    "mp4": "mp4",
    "mov": "mov",
    "webm": "webm",
    "matroska": "mkv",
    "avi": "avi",
    "flv": "flv",
}
"""File extension of each format sniff() names (a stored file is named after its content)."""

IMAGE_FORMATS = frozenset({"jpeg", "png", "webp", "bmp", "gif", "tiff", "heic", "heif", "avif"})
VIDEO_FORMATS = frozenset({"mp4", "mov", "webm", "matroska", "avi", "flv"})

# ftyp brands (ISO/IEC 23008-12 HEIF, AV1 Image File Format). A file can carry a generic
# major brand (mif1, msf1, miaf) with the specific one among its compatible brands.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})
_HEIF_BRANDS = frozenset({b"mif1", b"msf1", b"mif2", b"miaf"})


@dataclass(frozen=True)
class Sniffed:
    """A recognised format: its kind and its short name (a key of EXTENSIONS)."""

    kind: MediaKind
    format: str

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def _ftyp_brands(head: bytes) -> tuple[bytes, list[bytes]]:
    """(major brand, compatible brands) of an ftyp box at the start of head."""
    size = int.from_bytes(head[0:4], "big")
    end = min(len(head), size if size >= 16 else len(head))
    compatible = [head[i : i + 4] for i in range(16, end - 3, 4)]
    return head[8:12], compatible


def _iso_media(head: bytes) -> Sniffed:
    major, compatible = _ftyp_brands(head)
    if major in _AVIF_BRANDS:
        return Sniffed("image", "avif")
    if major in _HEIC_BRANDS:
        return Sniffed("image", "heic")
    if major in _HEIF_BRANDS:
        if _AVIF_BRANDS.intersection(compatible):
            return Sniffed("image", "avif")
        if _HEIC_BRANDS.intersection(compatible):
            return Sniffed("image", "heic")
        return Sniffed("image", "heif")
    if major == b"qt  ":
        return Sniffed("video", "mov")
    return Sniffed("video", "mp4")


def sniff(head: bytes) -> Sniffed | None:
    """Name the format from the first bytes (HEAD_BYTES of them), or None for one we do not
    know."""
    if head.startswith(b"\xff\xd8\xff"):
        return Sniffed("image", "jpeg")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Sniffed("image", "png")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Sniffed("image", "webp")
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return Sniffed("video", "avi")
    if head.startswith(b"BM") and len(head) >= 26:
        return Sniffed("image", "bmp")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return Sniffed("image", "gif")
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return Sniffed("image", "tiff")
    if head[4:8] == b"ftyp" and len(head) >= 12:
        return _iso_media(head)
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return Sniffed("video", "webm" if b"webm" in head[:64] else "matroska")
    if head[:3] == b"FLV":
        return Sniffed("video", "flv")
    return None
