"""Uploads: checks done before anything is queued, and streaming into the media store.

Checks: size (413), kind by content (415), emptiness (400). The kind is sniffed from magic bytes
(facefleet.sniff, the sniffer the worker uses too), never taken from the file name or the
client's Content-Type, so a renamed executable is refused at the door rather than by a GPU worker.

Streaming: an upload's bytes go from the request body straight into `media.put_stream` (which
hashes, content-addresses and, for s3, uploads in 5 MiB parts) through a bounded `Pipe` read by
a thread of the upload's own. Nothing is buffered whole, in memory or on local disk: the
gateway holds at most the pipe's bound plus what put_stream keeps in flight (a few MiB for
files, about 20 MiB for s3), whatever the upload's size.

An upload is committed only when its caller says so (`StreamingUpload.commit`): until then its
put_stream is kept waiting for the end of its input, so a submit refused after its files were
received (an unknown tier in a field after the files, a second file that is too large) aborts
them, and put_stream removes its temporary file or aborts its multipart upload: a refused upload
leaves nothing behind, and nothing content-addressed (possibly shared with another job) is ever
deleted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable, Collection
from pathlib import PurePosixPath
from typing import BinaryIO, TypeVar, cast
from urllib.parse import urlsplit

from facefleet.media import MediaStore, Stored, safe_name
from facefleet.sniff import EXTENSIONS, HEAD_BYTES, sniff
from facefleet.storage import StorageError

SNIFF_BYTES = HEAD_BYTES
"""Bytes held back from an upload until its kind is known (the shared sniffer's need)."""
PIPE_BYTES = 1 << 20
"""Bytes a pipe holds before the request body stops being read (back-pressure to the client)."""
MAX_URL = 4096
"""Longest https:// input URL accepted (presigned URLs of other stores run to ~2 KB)."""

T = TypeVar("T")


class UploadRejected(Exception):
    """An upload the gateway refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_kind(role: str, head: bytes, *, allowed: Collection[str]) -> str:
    """Kind of an upload for `role` ("source", "target" or "upload") from its first bytes, or
    UploadRejected (415)."""
    sniffed = sniff(head)
    if sniffed is None:
        raise UploadRejected(415, f"{role}: not a recognised image or video")
    kind = sniffed.format
    if kind not in allowed:
        raise UploadRejected(415, f"{role}: {kind} is not accepted here ({', '.join(allowed)})")
    if role == "source" and sniffed.kind != "image":
        raise UploadRejected(415, f"source: must be an image with a face, got {kind}")
    return kind


def check_size(role: str, size: int, *, max_bytes: int) -> None:
    if size == 0:
        raise UploadRejected(400, f"{role}: empty file")
    if size > max_bytes:
        raise UploadRejected(413, f"{role}: {size} bytes is over the limit of {max_bytes}")


def check_media(
    role: str, head: bytes, size: int, *, max_bytes: int, allowed: Collection[str]
) -> str:
    """Kind of a whole upload for `role` ("source" or "target"), or UploadRejected."""
    check_size(role, size, max_bytes=max_bytes)
    return check_kind(role, head, allowed=allowed)


def stored_name(name: str, kind: str) -> str:
    """The name an upload is stored under: the client's name made safe, with the extension of
    the kind its bytes turned out to be (so a stored name never lies about its content)."""
    stem = PurePosixPath(safe_name(name)).stem or "file"
    return f"{stem[:100]}.{EXTENSIONS[kind]}"


# --- the JSON form of a submit: media URIs --------------------------------------------------------


def check_uri(
    media: MediaStore, role: str, uri: str, *, max_bytes: int, allowed: Collection[str]
) -> str:
    """Validate a media URI of a JSON submit; blocking (run it in a thread).

    Accepted: URIs the media store owns (the object must exist, be within the size limit and
    sniff as an accepted kind: `media.open` is read for its first chunk only) and `https://`
    URLs, which the gateway never fetches: the worker does, under its SSRF rules. Anything else
    is UploadRejected (400) with the reason."""
    field = f"{role}_uri"
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "https":
        if len(uri) > MAX_URL:
            raise UploadRejected(400, f"{field}: URL longer than {MAX_URL} characters")
        if not parts.hostname:
            raise UploadRejected(400, f"{field}: no host in the URL")
        return uri
    if scheme == "http":
        raise UploadRejected(400, f"{field}: plain http:// is not accepted; use https://")
    if not media.owns(uri):
        what = f"scheme {scheme!r}" if scheme not in ("file", "s3") else "the URI"
        raise UploadRejected(
            400,
            f"{field}: {what} is outside the media store {media.url}; use a URI from "
            "POST /v1/uploads or an https:// URL",
        )
    try:
        chunks, size, _ = media.open(uri)
    except StorageError as exc:
        if exc.code == "media_not_found":
            raise UploadRejected(400, f"{field}: {uri}: no such file or object") from exc
        raise UploadRejected(
            503, f"{field}: the media store did not answer: {exc.message}"
        ) from exc
    try:
        head = next(iter(chunks), b"")[:SNIFF_BYTES]
    except StorageError as exc:
        raise UploadRejected(
            503, f"{field}: the media store did not answer: {exc.message}"
        ) from exc
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    check_media(role, head, size, max_bytes=max_bytes, allowed=allowed)
    return uri


# --- streaming into the media store ------------------------------------------------------------


class _Aborted(Exception):
    """Raised into put_stream's read when the upload was refused or the client went away."""


class Pipe:
    """A bounded byte pipe from the event loop (async `write`) to one reader thread (`read`).

    The writer waits while `limit` bytes are buffered, so a fast client is slowed to the store's
    pace instead of filling memory. `close()` is the end of the input; `abort()` makes the
    reader's next read raise, which is how put_stream is told to throw its work away.
    """

    def __init__(self, limit: int = PIPE_BYTES) -> None:
        self._loop = asyncio.get_running_loop()
        self._limit = limit
        self._cond = threading.Condition()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._reader_gone = False
        self._space = asyncio.Event()
        self._space.set()

    # --- event-loop side -----------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        """Queue bytes for the reader, waiting for room; raises _Aborted once the reader ended."""
        if not data:
            return
        while True:
            with self._cond:
                if self._reader_gone or self._error is not None or self._eof:
                    raise _Aborted("the upload's reader has ended")
                if self._buffered < self._limit:
                    self._chunks.append(data)
                    self._buffered += len(data)
                    self._cond.notify()
                    return
                self._space.clear()
            await self._space.wait()

    def close(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify()

    def abort(self) -> None:
        with self._cond:
            if self._error is None:
                self._error = _Aborted("upload aborted")
            self._cond.notify()

    def reader_done(self) -> None:
        """Called on the loop when the reader thread ended: a waiting writer must not hang."""
        with self._cond:
            self._reader_gone = True
        self._space.set()

    # --- reader-thread side --------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all buffered bytes for -1); b"" at the end; blocks until data."""
        with self._cond:
            while not self._chunks and not self._eof and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            if not self._chunks:
                return b""
            out: list[bytes] = []
            got = 0
            while self._chunks and (size < 0 or got < size):
                chunk = self._chunks.popleft()
                if size >= 0 and got + len(chunk) > size:
                    keep = size - got
                    self._chunks.appendleft(chunk[keep:])
                    chunk = chunk[:keep]
                out.append(chunk)
                got += len(chunk)
            self._buffered -= got
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is writing
            self._loop.call_soon_threadsafe(self._space.set)
        return out[0] if len(out) == 1 else b"".join(out)


def start_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run `fn` on a thread of its own; its outcome lands in the returned future.

    Not the default executor: an upload's thread waits on its client for as long as the upload
    lasts, and a submit's two uploads wait for each other (the first is held until the second
    ended), which could starve or deadlock a small shared pool."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(cast(T, result))

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, None, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class StreamingUpload:
    """One upload on its way into `media.put_stream`, fed from the event loop.

    feed() bytes as they arrive; end() when the body of this upload is over; then commit() to
    make it durable (its Stored) or abort() to leave nothing behind. The first SNIFF_BYTES are
    held back until the kind is known, so a refused kind never reaches the store; the size
    limit is enforced on every feed (413 as soon as it is passed) and again by put_stream.
    """

    def __init__(
        self,
        media: MediaStore,
        role: str,
        name: str,
        *,
        max_bytes: int,
        allowed: Collection[str],
    ) -> None:
        self.media = media
        self.role = role
        self.name = name
        self.max_bytes = max_bytes
        self.allowed = allowed
        self.size = 0
        self.kind: str | None = None
        self._head = bytearray()
        self._pipe: Pipe | None = None
        self._future: asyncio.Future[Stored] | None = None
        self.ended = False

    async def feed(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.size > self.max_bytes:
            raise UploadRejected(413, f"{self.role}: over the limit of {self.max_bytes} bytes")
        if self._pipe is None:
            self._head += data
            if len(self._head) < SNIFF_BYTES:
                return
            data = bytes(self._head)
            self._start()
        await self._write(data)

    async def end(self) -> None:
        """This upload's bytes are all in; checks what can only be checked at the end."""
        self.ended = True
        check_size(self.role, self.size, max_bytes=self.max_bytes)
        if self._pipe is None:  # the whole upload is shorter than SNIFF_BYTES
            head = bytes(self._head)
            self._start()
            await self._write(head)

    def _start(self) -> None:
        self.kind = check_kind(self.role, bytes(self._head), allowed=self.allowed)
        self._head = bytearray()
        pipe = Pipe()
        name = stored_name(self.name, self.kind)
        reader = cast(BinaryIO, pipe)

        def put() -> Stored:
            return self.media.put_stream(reader, name, max_bytes=self.max_bytes)

        future = start_thread(put, f"upload-{self.role}")
        future.add_done_callback(lambda _: pipe.reader_done())
        self._pipe, self._future = pipe, future

    async def _write(self, data: bytes) -> None:
        assert self._pipe is not None and self._future is not None
        try:
            await self._pipe.write(data)
        except _Aborted:
            with contextlib.suppress(_Aborted):
                await self._outcome()  # the store gave up first: its reason, when it has one
            raise UploadRejected(503, f"{self.role}: the media store stopped reading") from None

    async def _outcome(self) -> Stored:
        assert self._future is not None
        try:
            return await asyncio.shield(self._future)
        except StorageError as exc:
            if exc.code == "too_large":
                raise UploadRejected(
                    413, f"{self.role}: over the limit of {self.max_bytes} bytes"
                ) from exc
            raise UploadRejected(
                503, f"{self.role}: the media store could not store it: {exc.message}"
            ) from exc

    async def commit(self) -> Stored:
        """End the input and wait until put_stream made the upload durable."""
        if not self.ended:
            await self.end()
        assert self._pipe is not None
        self._pipe.close()
        return await self._outcome()

    async def abort(self) -> None:
        """Throw the upload away; put_stream removes whatever it had started."""
        if self._pipe is None or self._future is None:
            return
        self._pipe.abort()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(self._future), 30)
