"""Where model bytes come from: http(s) with Range resume, file://, and s3:// when boto3 is there.

Every source is opened at a byte offset and read as a stream; the puller owns retries, sizes and
checksums. Errors are classified once, here: `SourceError.retryable` says whether trying the same
URL again can help (a reset connection) or not (a 404, a missing file).
"""

from __future__ import annotations

import contextlib
import http.client
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

USER_AGENT = "facefleet-models/1"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class SourceError(Exception):
    """A source could not deliver bytes (exit code 4 when no source does)."""

    def __init__(self, url: str, message: str, *, retryable: bool) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.retryable = retryable


class RangeNotSatisfiable(SourceError):
    """The source refused the resume offset (HTTP 416): restart from byte 0."""


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


@dataclass
class Opened:
    """An open source stream positioned at `offset` (0 when the source ignored the Range)."""

    url: str
    stream: Readable
    offset: int
    total: int | None
    """The whole object's length when the source says so; lets the puller reject a wrong file early."""
    _close: Callable[[], object] = field(repr=False, default=lambda: None)

    def read(self, size: int) -> bytes:
        try:
            return self.stream.read(size)
        except (OSError, http.client.HTTPException) as exc:
            raise SourceError(self.url, f"read failed: {exc}", retryable=True) from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._close()


def open_source(url: str, offset: int = 0, *, timeout_s: float = 30.0) -> Opened:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _open_http(url, offset, timeout_s)
    if scheme == "file":
        return _open_file(url, offset)
    if scheme == "s3":
        return _open_s3(url, offset, timeout_s)
    raise SourceError(
        url, f"unsupported URL scheme {scheme!r} (http, https, file, s3)", retryable=False
    )


def resolve_url(url: str, base_dir: Path) -> str:
    """Relative catalogue URLs (tiny catalogues) resolve against the catalogue's directory."""
    if "://" in url:
        return url
    return (base_dir / url).resolve().as_uri()


def mirror_url(base_url: str, file: str) -> str:
    """`--base-url`: the internal mirror holds every model under its plain file name."""
    if "://" not in base_url:
        base_url = Path(base_url).resolve().as_uri()
    return f"{base_url.rstrip('/')}/{urllib.parse.quote(file)}"


def _open_http(url: str, offset: int, timeout_s: float) -> Opened:
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416:
            raise RangeNotSatisfiable(url, f"HTTP 416 for offset {offset}", retryable=True) from exc
        retryable = exc.code >= 500 or exc.code in (408, 429)
        raise SourceError(url, f"HTTP {exc.code} {exc.reason}", retryable=retryable) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise SourceError(url, f"unreachable: {reason}", retryable=True) from exc
    status = response.status
    length = response.headers.get("Content-Length")
    if status == 206:
        match = _CONTENT_RANGE.fullmatch((response.headers.get("Content-Range") or "").strip())
        if match is None or int(match.group(1)) != offset:
            response.close()
            raise SourceError(url, "HTTP 206 with an unusable Content-Range", retryable=False)
        total = None if match.group(3) == "*" else int(match.group(3))
        return Opened(url, response, offset, total, response.close)
    if status == 200:
        total = int(length) if length and length.isdigit() else None
        return Opened(url, response, 0, total, response.close)
    response.close()
    raise SourceError(url, f"unexpected HTTP {status}", retryable=False)


def _open_file(url: str, offset: int) -> Opened:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise SourceError(url, "file:// URLs must be local", retryable=False)
    path = Path(urllib.request.url2pathname(parts.path))
    try:
        handle: IO[bytes] = path.open("rb")
    except FileNotFoundError as exc:
        raise SourceError(url, f"no such file {path}", retryable=False) from exc
    except OSError as exc:
        raise SourceError(
            url, f"cannot open {path}: {exc.strerror or exc}", retryable=False
        ) from exc
    try:
        total = path.stat().st_size
        if offset > total:
            raise RangeNotSatisfiable(url, f"offset {offset} beyond {total} bytes", retryable=True)
        handle.seek(offset)
    except BaseException:
        handle.close()
        raise
    return Opened(url, handle, offset, total, handle.close)


def _open_s3(url: str, offset: int, timeout_s: float) -> Opened:
    """s3://bucket/key via boto3 (optional; honours AWS_* env, incl. AWS_ENDPOINT_URL for MinIO)."""
    try:
        import boto3  # type: ignore[import-untyped,import-not-found,unused-ignore]
        import botocore.config  # type: ignore[import-untyped,import-not-found,unused-ignore]
        import botocore.exceptions  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError as exc:
        raise SourceError(
            url, "s3:// sources need boto3 (pip install boto3)", retryable=False
        ) from exc
    parts = urllib.parse.urlsplit(url)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    config = botocore.config.Config(connect_timeout=timeout_s, read_timeout=timeout_s)
    client = boto3.client("s3", config=config)
    kwargs: dict[str, str] = {"Bucket": bucket, "Key": key}
    if offset > 0:
        kwargs["Range"] = f"bytes={offset}-"
    try:
        response = client.get_object(**kwargs)
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "InvalidRange":
            raise RangeNotSatisfiable(url, "offset beyond object", retryable=True) from exc
        retryable = code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout")
        raise SourceError(url, f"S3 {code or exc}", retryable=retryable) from exc
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        raise SourceError(url, f"unreachable: {exc}", retryable=True) from exc
    body = response["Body"]
    match = _CONTENT_RANGE.fullmatch(str(response.get("ContentRange") or ""))
    if offset > 0 and match is None:
        offset = 0  # the store ignored the Range
    if match is not None and match.group(3) != "*":
        total: int | None = int(match.group(3))
    else:
        total = int(response["ContentLength"]) if offset == 0 else None
    return Opened(url, body, offset, total, body.close)
