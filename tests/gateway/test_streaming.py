"""Offline tests of the gateway's streaming uploads: the multipart parser feeding the media
store part by part, commit/abort, the bounded pipe, upload tokens and media-URI checks.

A real FileMediaStore in a temp dir (no fakes); the s3 store is exercised end to end against
moto_server in test_media.py."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from facefleet.media import FileMediaStore
from facefleet.producer.gateway.auth import TokenError, TokenProblem, TokenSigner
from facefleet.producer.gateway.forms import SubmitForm, parse_submit_form
from facefleet.producer.gateway.uploads import Pipe, UploadRejected, check_uri, stored_name
from tests.gateway.conftest import png
from tests.gateway.forms import JPEG_HEAD, Form, Part, form

ALLOWED = ("jpeg", "png", "webp", "bmp", "mp4", "mov", "webm", "matroska", "avi")


def files_under(root: Path) -> list[Path]:
    """Every file the store holds under uploads/ (temp files included)."""
    uploads = root / "uploads"
    return sorted(p for p in uploads.rglob("*") if p.is_file()) if uploads.exists() else []


async def body_of(f: Form, chunk: int = 7000) -> AsyncIterator[bytes]:
    """The form's bytes in small uneven chunks, as a socket would deliver them."""
    data = f.body()
    for i in range(0, len(data), chunk):
        await asyncio.sleep(0)
        yield data[i : i + chunk]


def parse(store: FileMediaStore, f: Form, max_bytes: int = 1 << 20) -> SubmitForm:
    async def run() -> SubmitForm:
        return await parse_submit_form(
            store, f.content_type, body_of(f), max_bytes=max_bytes, allowed=ALLOWED
        )

    return asyncio.run(run())


@pytest.fixture
def store(tmp_path: Path) -> FileMediaStore:
    return FileMediaStore(tmp_path / "media")


def test_files_stream_in_and_fields_after_them_are_read(store: FileMediaStore) -> None:
    source, target = png(rgb=(1, 2, 3)), png(width=300, height=300)
    f = form(
        Part("source", source, "me.png"),
        Part("target", target, "../../etc/group.png"),
        Part("tier", b"standard"),
        Part("options", b'{"a": 1}'),
    )

    async def run() -> dict[str, str]:
        parsed = await parse_submit_form(
            store, f.content_type, body_of(f), max_bytes=1 << 20, allowed=ALLOWED
        )
        assert parsed.fields == {"tier": "standard", "options": '{"a": 1}'}
        return await parsed.commit()

    uris = asyncio.run(run())
    assert store.local_path(uris["source"]).read_bytes() == source  # type: ignore[union-attr]
    assert store.local_path(uris["target"]).read_bytes() == target  # type: ignore[union-attr]
    # stored as <role>.<ext of the sniffed kind>: the client's file name never chooses a path
    assert uris["target"].endswith("/target.png")
    assert [p.name for p in files_under(store.root)] == ["source.png", "target.png"]


def test_an_aborted_form_leaves_nothing_behind(store: FileMediaStore) -> None:
    f = form(
        Part("source", png(), "a.png"),
        Part("target", JPEG_HEAD, "b.jpg", padding=3 << 20),
        Part("tier", b"nosuchtier"),
    )

    async def run() -> None:
        parsed = await parse_submit_form(
            store, f.content_type, body_of(f, 64 * 1024), max_bytes=8 << 20, allowed=ALLOWED
        )
        await parsed.abort()  # e.g. the tier field was refused after both files arrived

    asyncio.run(run())
    assert files_under(store.root) == []


@pytest.mark.parametrize(
    ("parts", "status", "reason"),
    [
        pytest.param(
            [Part("source", png(), "a.png"), Part("target", JPEG_HEAD, "b.jpg", padding=2 << 20)],
            413,
            "target: over the limit",
            id="second-file-too-large",
        ),
        pytest.param(
            [Part("source", b"MZ\x90\x00 an executable" * 8, "a.png"), Part("target", png(), "b")],
            415,
            "source: not a recognised image or video",
            id="not-media",
        ),
        pytest.param(
            [Part("source", png(), "a.png"), Part("target", b"", "b.png")],
            400,
            "target: empty file",
            id="empty",
        ),
        pytest.param([Part("source", png(), "a.png")], 400, "target: a file field", id="missing"),
        pytest.param(
            [Part("source", png(), "a.png"), Part("target", b"text", None)],
            400,
            "target: a file field",
            id="target-as-text",
        ),
        pytest.param(
            [Part("source", png(), "a"), Part("source", png(), "b"), Part("target", png(), "c")],
            400,
            "source: more than one file",
            id="two-sources",
        ),
        pytest.param(
            [Part("source", png(), "a"), Part("other", png(), "b")],
            400,
            "other: unexpected file field",
            id="unexpected-file",
        ),
        pytest.param(
            [Part("source", png(), "a"), Part("target", png(), "b"), Part("x", b"y" * 300_000)],
            400,
            "x: a field of at most",
            id="huge-field",
        ),
    ],
)
def test_refused_forms_leave_nothing_behind(
    store: FileMediaStore, parts: list[Part], status: int, reason: str
) -> None:
    with pytest.raises(UploadRejected) as refused:
        parse(store, form(*parts))
    assert refused.value.status == status
    assert reason in refused.value.reason
    assert files_under(store.root) == []


def test_a_truncated_body_is_refused(store: FileMediaStore) -> None:
    f = form(Part("source", png(), "a.png"), Part("target", png(), "b.png"))
    cut = f.body()[:-30]

    async def run() -> None:
        async def body() -> AsyncIterator[bytes]:
            yield cut

        await parse_submit_form(store, f.content_type, body(), max_bytes=1 << 20, allowed=ALLOWED)

    with pytest.raises(UploadRejected, match="closing boundary"):
        asyncio.run(run())
    assert files_under(store.root) == []


def test_the_pipe_holds_at_most_its_bound_and_the_writer_waits() -> None:
    """Back-pressure: with 64 KiB buffered the writer waits until the reader takes some."""

    async def run() -> tuple[int, int, bytes]:
        pipe = Pipe(limit=64 * 1024)
        got: list[bytes] = []
        release = threading.Event()

        def reader() -> None:
            release.wait(10)
            while block := pipe.read(10_000):
                got.append(block)

        thread = threading.Thread(target=reader)
        thread.start()
        writes = 0

        async def writer() -> None:
            nonlocal writes
            for _ in range(20):
                await pipe.write(b"x" * 16 * 1024)
                writes += 1
            pipe.close()

        task = asyncio.create_task(writer())
        await asyncio.sleep(0.2)
        held = writes  # what went in while nobody read
        release.set()
        await asyncio.wait_for(task, 10)
        await asyncio.to_thread(thread.join, 10)
        return held, writes, b"".join(got)

    held, writes, data = asyncio.run(run())
    assert held == 4  # 4 x 16 KiB fill the 64 KiB bound; the 5th write waits
    assert writes == 20
    assert data == b"x" * 16 * 1024 * 20


def test_an_aborted_pipe_fails_its_reader() -> None:
    """abort() is how put_stream learns to throw its work away: its next read raises."""

    async def run() -> BaseException | None:
        pipe = Pipe()
        await pipe.write(b"abc")
        error: list[BaseException] = []

        def reader() -> None:
            try:
                while pipe.read(2):
                    time.sleep(0.01)
            except Exception as exc:
                error.append(exc)

        thread = threading.Thread(target=reader)
        thread.start()
        await asyncio.sleep(0.1)
        pipe.abort()
        await asyncio.to_thread(thread.join, 10)
        return error[0] if error else None

    assert asyncio.run(run()) is not None


# --- upload tokens -------------------------------------------------------------------------------

SIGNER = TokenSigner("u" * 40, ttl_s=600)


def test_upload_token_round_trip() -> None:
    token = SIGNER.issue_upload("face.png", "png", 60)
    claims = SIGNER.verify_upload(token)
    assert (claims.name, claims.kind) == ("face.png", "png")
    assert claims.exp > time.time()
    assert SIGNER.verify_upload(SIGNER.issue_upload("x", None, 60)).kind is None


def test_upload_and_job_tokens_never_pass_for_each_other() -> None:
    job = str(uuid.uuid4())
    upload = SIGNER.issue_upload("face.png", None, 60)
    assert not TokenSigner.looks_like_token(upload)
    with pytest.raises(TokenError) as as_job:
        SIGNER.verify(upload, job)
    assert as_job.value.problem is TokenProblem.MALFORMED
    with pytest.raises(TokenError) as as_upload:
        SIGNER.verify_upload(SIGNER.issue(job))
    assert as_upload.value.problem is TokenProblem.MALFORMED


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        pytest.param("", TokenProblem.MISSING, id="missing"),
        pytest.param("u1.abc", TokenProblem.MALFORMED, id="malformed"),
        pytest.param(
            SIGNER.issue_upload("a.png", None, 60)[:-2] + "AA", TokenProblem.BAD_SIGNATURE, id="sig"
        ),
        pytest.param(
            TokenSigner("o" * 40, 600).issue_upload("a.png", None, 60),
            TokenProblem.BAD_SIGNATURE,
            id="other-secret",
        ),
        pytest.param(
            SIGNER.issue_upload("a.png", None, 60, now=time.time() - 61),
            TokenProblem.EXPIRED,
            id="expired",
        ),
    ],
)
def test_bad_upload_tokens_are_refused(token: str, problem: TokenProblem) -> None:
    with pytest.raises(TokenError) as refused:
        SIGNER.verify_upload(token)
    assert refused.value.problem is problem


def test_edited_upload_claims_break_the_signature() -> None:
    import base64
    import json

    prefix, payload, sig = SIGNER.issue_upload("a.png", "png", 60).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["kind"] = "mp4"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(TokenError) as refused:
        SIGNER.verify_upload(f"{prefix}.{forged}.{sig}")
    assert refused.value.problem is TokenProblem.BAD_SIGNATURE


# --- media URIs of a JSON submit -------------------------------------------------------------------


def test_stored_names_carry_the_sniffed_kind() -> None:
    assert stored_name("holiday photo.PNG", "jpeg") == "holiday_photo.jpg"
    assert stored_name("../../x", "png") == "x.png"
    assert stored_name("", "mp4") == "file.mp4"


@pytest.fixture
def stored(store: FileMediaStore) -> Iterator[dict[str, str]]:
    text = store.root / "notes.txt"
    text.write_bytes(b"just some text, no magic bytes here" * 3)
    image = store.root / "face.png"
    image.write_bytes(png())
    video = store.root / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    yield {"text": text.as_uri(), "image": image.as_uri(), "video": video.as_uri()}


@pytest.mark.parametrize(
    ("role", "key", "status", "reason"),
    [
        ("source", "image", None, None),
        ("target", "video", None, None),
        ("source", "video", 415, "source: must be an image"),
        ("source", "text", 415, "source: not a recognised image or video"),
        ("source", "missing", 400, "no such file"),
        ("source", "http://example.com/a.png", 400, "plain http:// is not accepted"),
        ("source", "https:///a.png", 400, "no host"),
        ("source", "ftp://example.com/a.png", 400, "scheme 'ftp' is outside the media store"),
        ("source", "file:///etc/passwd", 400, "outside the media store"),
        ("source", "s3://bucket/a.png", 400, "outside the media store"),
        ("source", "/etc/passwd", 400, "outside the media store"),
    ],
)
def test_json_media_uris_are_checked(
    store: FileMediaStore,
    stored: dict[str, str],
    role: str,
    key: str,
    status: int | None,
    reason: str | None,
) -> None:
    uri = stored.get(key) or ((store.root / "nothing.png").as_uri() if key == "missing" else key)
    if status is None:
        assert check_uri(store, role, uri, max_bytes=1 << 20, allowed=ALLOWED) == uri
        return
    with pytest.raises(UploadRejected) as refused:
        check_uri(store, role, uri, max_bytes=1 << 20, allowed=ALLOWED)
    assert refused.value.status == status
    assert reason is not None and reason in refused.value.reason


def test_https_inputs_are_not_fetched_by_the_gateway(store: FileMediaStore) -> None:
    """A URL nobody can reach is accepted as is: the worker fetches it, under its SSRF rules."""
    url = "https://unreachable.invalid/face.png?X-Amz-Signature=abc"
    assert check_uri(store, "source", url, max_bytes=1, allowed=ALLOWED) == url


def test_a_stored_file_over_the_limit_is_413(store: FileMediaStore, stored: dict[str, str]) -> None:
    with pytest.raises(UploadRejected) as refused:
        check_uri(store, "source", stored["image"], max_bytes=10, allowed=ALLOWED)
    assert refused.value.status == 413
