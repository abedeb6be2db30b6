"""The multipart form of `POST /v1/jobs`, parsed incrementally: each file part streams into the
media store while it arrives.

Why not `request.form()`: Starlette spools every file part to a temporary file first, so a 2 GB
video costs 2 GB of local disk and is then read a second time to copy it into the store (a
network upload for s3). Here python-multipart's push parser is fed the request body chunk by
chunk; its callbacks only record what they saw, and after each chunk the bytes of a file part
are fed to that part's `StreamingUpload` (a bounded pipe into `media.put_stream` on a thread),
so memory stays bounded and no byte touches local disk unless the store is a file:// one.
Awaiting the pipe when it is full stops reading the request: TCP back-pressure slows the
client to the store's pace.

Text fields are collected (bounded in number and size) and validated after the body ended; only
then are the uploads committed (`forms.SubmitForm.commit`), so a submit refused for any reason
leaves nothing behind (uploads.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from facefleet.media import MediaStore
from facefleet.producer.gateway.uploads import StreamingUpload, UploadRejected

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

ROLES = ("source", "target")
MAX_FIELDS = 16
MAX_FIELD_BYTES = 256 * 1024
MAX_HEADER_BYTES = 8 * 1024
DRAIN_BYTES = 1 << 30
"""At most this much of a refused body is read and discarded so that the client, still
sending, gets the answer instead of a reset connection (BodyLimit bounds it too)."""


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    disposition: bytes = b""
    header_name: bytes = b""
    header_value: bytes = b""
    header_bytes: int = 0
    data: bytearray = field(default_factory=bytearray)
    upload: StreamingUpload | None = None


@dataclass
class SubmitForm:
    """What the form held: its text fields and one StreamingUpload per role (not committed)."""

    fields: dict[str, str]
    uploads: dict[str, StreamingUpload]

    async def commit(self) -> dict[str, str]:
        """Make both uploads durable; their URIs by role. On failure nothing is kept."""
        uris: dict[str, str] = {}
        try:
            for role, upload in self.uploads.items():
                uris[role] = (await upload.commit()).uri
        except BaseException:
            await self.abort()
            raise
        return uris

    async def abort(self) -> None:
        for upload in self.uploads.values():
            await upload.abort()


class _Collector:
    """python-multipart callbacks (synchronous, called inside `parser.write`): they record
    events; the async side (`parse_submit_form`) acts on them between writes."""

    def __init__(self, charset: str) -> None:
        self.charset = charset
        self.part = _Part()
        self.events: list[tuple[str, _Part, bytes]] = []
        self.ended = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.events.append(("data", self.part, data[start:end]))

    def on_part_end(self) -> None:
        self.events.append(("end", self.part, b""))

    def _header_bytes(self, n: int) -> None:
        self.part.header_bytes += n
        if self.part.header_bytes > MAX_HEADER_BYTES:
            raise UploadRejected(400, "multipart: part headers too large")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self.part.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self.part.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.part.header_name.lower() == b"content-disposition":
            self.part.disposition = self.part.header_value
        self.part.header_name = self.part.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.disposition)
        if b"name" not in options:
            raise UploadRejected(400, "multipart: a part without a name")
        self.part.name = options[b"name"].decode(self.charset, "replace")
        if b"filename" in options:
            self.part.filename = options[b"filename"].decode(self.charset, "replace")
        self.events.append(("headers", self.part, b""))

    def on_end(self) -> None:
        self.ended = True


async def parse_submit_form(
    media: MediaStore,
    content_type: str,
    body: AsyncIterator[bytes],
    *,
    max_bytes: int,
    allowed: tuple[str, ...],
) -> SubmitForm:
    """Read a submit's multipart body: `source` and `target` file parts stream into the media
    store as they arrive (sniffed and size-checked on the way), text fields are returned.

    Raises UploadRejected (400/413/415/503) with every upload already aborted; on success the
    uploads still wait for `SubmitForm.commit()` (or `abort()`)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadRejected(400, "multipart: no boundary in Content-Type")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        "".encode(charset)
    except LookupError:
        charset = "utf-8"
    collector = _Collector(charset)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
    except FormParserError as exc:
        raise UploadRejected(400, f"multipart: {exc}") from exc
    form = SubmitForm({}, {})
    fields = 0
    try:
        async for chunk in body:
            try:
                parser.write(chunk)
            except FormParserError as exc:
                raise UploadRejected(400, "multipart: malformed body") from exc
            events, collector.events = collector.events, []
            for kind, part, data in events:
                if kind == "headers":
                    if part.filename is not None:
                        part.upload = _start_upload(form, part, media, max_bytes, allowed)
                    else:
                        fields += 1
                        if fields > MAX_FIELDS:
                            raise UploadRejected(400, f"multipart: at most {MAX_FIELDS} fields")
                elif kind == "data":
                    if part.upload is not None:
                        await part.upload.feed(data)
                    else:
                        part.data += data
                        if len(part.data) > MAX_FIELD_BYTES:
                            raise UploadRejected(
                                400, f"{part.name}: a field of at most {MAX_FIELD_BYTES} bytes"
                            )
                elif part.upload is not None:  # end of a file part
                    await part.upload.end()
                else:
                    form.fields[part.name] = part.data.decode(charset, "replace")
        try:
            parser.finalize()
        except FormParserError as exc:
            raise UploadRejected(400, "multipart: malformed body") from exc
        if not collector.ended:
            raise UploadRejected(400, "multipart: the body ended before its closing boundary")
        for role in ROLES:
            if role not in form.uploads:
                raise UploadRejected(400, f"{role}: a file field is required")
    except UploadRejected:
        await form.abort()
        await drain(body)
        raise
    except BaseException:
        await form.abort()
        raise
    return form


def _start_upload(
    form: SubmitForm,
    part: _Part,
    media: MediaStore,
    max_bytes: int,
    allowed: tuple[str, ...],
) -> StreamingUpload:
    if part.name not in ROLES:
        raise UploadRejected(400, f"{part.name}: unexpected file field (use source and target)")
    if part.name in form.uploads:
        raise UploadRejected(400, f"{part.name}: more than one file")
    upload = StreamingUpload(media, part.name, part.name, max_bytes=max_bytes, allowed=allowed)
    form.uploads[part.name] = upload
    return upload


async def drain(body: AsyncIterator[bytes], limit: int = DRAIN_BYTES) -> None:
    """Read and discard the rest of a refused request body (up to `limit` bytes), so the
    client gets its answer rather than a connection reset while it is still sending."""
    seen = 0
    with contextlib.suppress(Exception):
        async for chunk in body:
            seen += len(chunk)
            if seen > limit:
                break
