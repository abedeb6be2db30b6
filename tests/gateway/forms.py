"""multipart/form-data bodies built by hand, so tests choose the order of parts (fields after
files, as browsers may send them) and can stream bodies far larger than memory."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

BLOCK = b"\0" * (1 << 20)
JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
"""Enough of a JPEG for the gateway's sniffing (it checks kinds from magic bytes only)."""


@dataclass(frozen=True)
class Part:
    """One form part: a text field (`filename` None) or a file of `data` + `padding` zero bytes
    (generated block by block, never held whole)."""

    name: str
    data: bytes = b""
    filename: str | None = None
    padding: int = 0

    def head(self, boundary: str) -> bytes:
        disposition = f'form-data; name="{self.name}"'
        if self.filename is not None:
            disposition += f'; filename="{self.filename}"'
        lines = [f"--{boundary}", f"Content-Disposition: {disposition}"]
        if self.filename is not None:
            lines.append("Content-Type: application/octet-stream")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    @property
    def size(self) -> int:
        return len(self.data) + self.padding

    def chunks(self) -> Iterator[bytes]:
        yield self.data
        left = self.padding
        while left > 0:
            n = min(left, len(BLOCK))
            yield BLOCK[:n]
            left -= n


@dataclass(frozen=True)
class Form:
    content_type: str
    length: int
    parts: tuple[Part, ...]
    boundary: str

    def stream(self) -> Iterator[bytes]:
        for part in self.parts:
            yield part.head(self.boundary)
            yield from part.chunks()
            yield b"\r\n"
        yield f"--{self.boundary}--\r\n".encode()

    def body(self) -> bytes:
        return b"".join(self.stream())

    def headers(self, api_key: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": self.content_type,
            "Content-Length": str(self.length),
        }


def form(*parts: Part) -> Form:
    boundary = "ffb" + uuid.uuid4().hex
    length = sum(len(p.head(boundary)) + p.size + 2 for p in parts) + len(boundary) + 6
    return Form(f"multipart/form-data; boundary={boundary}", length, parts, boundary)
