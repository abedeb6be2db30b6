"""One conformance suite for every MediaStore: the file data root and S3 (on a real moto_server).

Each test runs against every backend (ids file / s3, plus s3-fallback where create-once
semantics matter: S3 with the HEAD-then-PUT fallback for servers without If-None-Match).
Observations go through the same public API a caller has, plus a listing of what the store
holds (files under the root, objects under the prefix) to prove nothing is left behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import httpx
import pytest

from facefleet.media import (
    FileMediaStore,
    MediaStore,
    S3MediaStore,
    Stored,
    open_media_store,
    safe_name,
)
from facefleet.storage import StorageError

MiB = 1 << 20
KINDS = [
    pytest.param("file", id="file"),
    pytest.param("s3", id="s3", marks=pytest.mark.integration),
]
KINDS_WITH_FALLBACK = [
    *KINDS,
    pytest.param("s3-fallback", id="s3-fallback", marks=pytest.mark.integration),
]


# --- helpers ------------------------------------------------------------------------------------


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


class GenReader(io.RawIOBase):
    """A reader of unknown length over a generator, with short reads (like an HTTP body)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self._buf:
            self._buf = next(self._chunks, b"")
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _chunks(size: int, seed: int, chunk: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    left = size
    while left:
        block = rng.randbytes(min(chunk, left))
        left -= len(block)
        yield block


def gen_stream(size: int, *, seed: int = 0, chunk: int = 65_521) -> tuple[BinaryIO, str]:
    """A generator-backed stream of `size` random bytes (odd chunk sizes), and its SHA-256."""
    digest = hashlib.sha256()
    for block in _chunks(size, seed, chunk):
        digest.update(block)
    return cast(BinaryIO, GenReader(_chunks(size, seed, chunk))), digest.hexdigest()


@dataclass
class Backend:
    """One store under test and a way to see what it holds."""

    kind: str
    store: MediaStore
    scratch: Path
    """Local files outside the store (sources, download targets)."""
    writes: dict[str, int] = field(default_factory=dict)
    """s3: object writes (PutObject, CreateMultipartUpload, CopyObject) per key."""

    def stored(self) -> list[str]:
        """Every stored object/file, relative to the store's root (temp ones included)."""
        if isinstance(self.store, FileMediaStore):
            root = self.store.root
            return sorted(
                str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()
            )
        assert isinstance(self.store, S3MediaStore)
        client = self.store._s3()
        base = self.store.prefix + "/"
        found: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.store.bucket, Prefix=base
        ):
            found += [item["Key"][len(base) :] for item in page.get("Contents", [])]
        return sorted(found)

    def pending_uploads(self) -> list[str]:
        """Multipart uploads started and neither completed nor aborted (s3)."""
        if not isinstance(self.store, S3MediaStore):
            return []
        response = self.store._s3().list_multipart_uploads(
            Bucket=self.store.bucket, Prefix=self.store.prefix + "/"
        )
        return [u["Key"] for u in response.get("Uploads", [])]

    def key_of(self, uri: str) -> str:
        if isinstance(self.store, FileMediaStore):
            path = self.store.local_path(uri)
            assert path is not None
            return str(path.relative_to(self.store.root))
        assert isinstance(self.store, S3MediaStore)
        return uri.removeprefix(f"s3://{self.store.bucket}/{self.store.prefix}/")

    def identity(self, uri: str) -> tuple[Any, ...]:
        """Changes whenever the object is written again."""
        if isinstance(self.store, FileMediaStore):
            path = self.store.local_path(uri)
            assert path is not None
            st = path.stat()
            return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        assert isinstance(self.store, S3MediaStore)
        key = uri.removeprefix(f"s3://{self.store.bucket}/")
        return (self.writes.get(key, 0),)

    def read(self, uri: str) -> bytes:
        dest = self.scratch / f"read-{uuid.uuid4().hex}"
        self.store.download(uri, dest)
        data = dest.read_bytes()
        dest.unlink()
        return data

    def source(self, name: str, data: bytes) -> Path:
        path = self.scratch / uuid.uuid4().hex / name
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        return path


@pytest.fixture
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], Backend]:
    def make(kind: str) -> Backend:
        scratch = tmp_path / f"scratch-{uuid.uuid4().hex[:6]}"
        scratch.mkdir()
        if kind == "file":
            root = tmp_path / f"root-{uuid.uuid4().hex[:6]}"
            return Backend(kind, open_media_store(root.as_uri()), scratch)
        base_url: str = request.getfixturevalue("s3_media_url")
        url = f"{base_url}/t-{uuid.uuid4().hex[:10]}"
        store = open_media_store(url)
        assert isinstance(store, S3MediaStore)
        if kind == "s3-fallback":
            store = S3MediaStore(store.bucket, store.prefix, conditional_writes=False)
        backend = Backend(kind, store, scratch)

        def count(params: dict[str, Any], **_: Any) -> None:
            backend.writes[params["Key"]] = backend.writes.get(params["Key"], 0) + 1

        events = store._s3().meta.events
        for op in ("PutObject", "CreateMultipartUpload", "CopyObject"):
            events.register(f"before-parameter-build.s3.{op}", count)
        return backend

    return make


@pytest.fixture(params=KINDS)
def backend(request: pytest.FixtureRequest, make_backend: Callable[[str], Backend]) -> Backend:
    return make_backend(request.param)


@pytest.fixture(params=KINDS_WITH_FALLBACK)
def any_backend(request: pytest.FixtureRequest, make_backend: Callable[[str], Backend]) -> Backend:
    return make_backend(request.param)


def code_of(fn: Callable[[], object]) -> str:
    with pytest.raises(StorageError) as info:
        fn()
    return info.value.code


# --- put_file: content addressing ---------------------------------------------------------------

A = blob(3000, seed=1)
B = blob(3000, seed=2)


@pytest.mark.parametrize(
    ("puts", "same_uri", "stored"),
    [
        pytest.param([("x.png", A), ("x.png", A)], True, 1, id="same-bytes-twice-one-object"),
        pytest.param([("x.png", A), ("x.png", B)], False, 2, id="different-bytes-same-name"),
        pytest.param([("x.png", A), ("y.png", A)], False, 2, id="same-bytes-other-name"),
        pytest.param([("big.bin", blob(20 * MiB, 3))] * 2, True, 1, id="multipart-size-twice"),
    ],
)
def test_put_file_is_content_addressed(
    backend: Backend, puts: list[tuple[str, bytes]], same_uri: bool, stored: int
) -> None:
    uris: list[str] = []
    for i, (name, data) in enumerate(puts):
        uris.append(backend.store.put_file(backend.source(name, data)))
        if i == 0:
            first = backend.identity(uris[0])
    assert (uris[0] == uris[1]) is same_uri
    assert backend.identity(uris[0]) == first, "the same bytes were written twice"
    assert len(backend.stored()) == stored
    for uri, (name, data) in zip(uris, puts, strict=True):
        sha = hashlib.sha256(data).hexdigest()
        assert backend.key_of(uri) == f"uploads/{sha}/{name}"
        assert backend.store.owns(uri)
        assert backend.read(uri) == data


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("../../etc/passwd", "passwd", id="traversal-to-basename"),
        pytest.param("a b?c#d.png", "a_b_c_d.png", id="unsafe-characters"),
        pytest.param("..", "file", id="dotdot-only"),
        pytest.param(".hidden..png", "hidden.png", id="leading-and-double-dots"),
        pytest.param("C:\\Users\\x\\photo.jpg", "photo.jpg", id="windows-path"),
    ],
)
def test_put_file_sanitises_the_name(backend: Backend, name: str, expected: str) -> None:
    assert safe_name(name) == expected
    uri = backend.store.put_file(backend.source("src.bin", A), name)
    assert backend.key_of(uri).endswith(f"/{expected}")
    assert ".." not in backend.key_of(uri)


def test_put_file_of_a_missing_file_is_media_not_found(backend: Backend) -> None:
    assert code_of(lambda: backend.store.put_file(backend.scratch / "nope.png")) == (
        "media_not_found"
    )


# --- put_stream -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_bytes"),
    [
        pytest.param(0, None, id="empty"),
        pytest.param(3000, None, id="small-unknown-length"),
        pytest.param(3000, 3000, id="exactly-at-limit"),
        pytest.param(20 * MiB + 7, 30 * MiB, id="multipart-unknown-length"),
    ],
)
def test_put_stream_stores_a_stream_of_unknown_length(
    backend: Backend, size: int, max_bytes: int | None
) -> None:
    stream, sha = gen_stream(size, seed=size)
    stored = backend.store.put_stream(stream, "clip.mp4", max_bytes=max_bytes)
    assert isinstance(stored, Stored)
    assert (stored.size, stored.sha256) == (size, sha)
    assert backend.key_of(stored.uri) == f"uploads/{sha}/clip.mp4"
    assert backend.stored() == [f"uploads/{sha}/clip.mp4"], "a temp object was left behind"
    assert backend.pending_uploads() == []
    assert hashlib.sha256(backend.read(stored.uri)).hexdigest() == sha
    # The same bytes again: the same URI, the stored object untouched, the temp removed.
    before = backend.identity(stored.uri)
    again = backend.store.put_stream(gen_stream(size, seed=size)[0], "clip.mp4")
    assert again == stored
    assert backend.identity(stored.uri) == before
    assert backend.stored() == [f"uploads/{sha}/clip.mp4"]


@pytest.mark.parametrize(
    ("size", "max_bytes"),
    [
        pytest.param(10_000, 5_000, id="small-over-limit"),
        pytest.param(10_000, 0, id="zero-limit"),
        pytest.param(20 * MiB, 12 * MiB, id="multipart-over-limit"),
    ],
)
def test_put_stream_over_max_bytes_is_too_large_and_leaves_nothing(
    backend: Backend, size: int, max_bytes: int
) -> None:
    stream, _ = gen_stream(size)
    assert code_of(lambda: backend.store.put_stream(stream, "x.bin", max_bytes=max_bytes)) == (
        "too_large"
    )
    assert backend.stored() == []
    assert backend.pending_uploads() == []


# --- download / open ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_bytes", "code"),
    [
        pytest.param(3000, None, None, id="small-roundtrip"),
        pytest.param(0, None, None, id="empty-roundtrip"),
        pytest.param(20 * MiB + 1, None, None, id="ranged-roundtrip"),
        pytest.param(3000, 3000, None, id="exactly-at-limit"),
        pytest.param(3000, 2999, "too_large", id="over-limit"),
        pytest.param(20 * MiB + 1, 20 * MiB, "too_large", id="ranged-over-limit"),
    ],
)
def test_download(backend: Backend, size: int, max_bytes: int | None, code: str | None) -> None:
    data = blob(size, seed=size)
    uri = backend.store.put_file(backend.source("in.bin", data))
    dest = backend.scratch / "out" / "dl.bin"
    dest.parent.mkdir()
    if code is None:
        assert backend.store.download(uri, dest, max_bytes=max_bytes) == size
        assert dest.read_bytes() == data
    else:
        assert code_of(lambda: backend.store.download(uri, dest, max_bytes=max_bytes)) == code
        assert list(dest.parent.iterdir()) == [], "a partial download was left behind"


def test_missing_objects_are_media_not_found(backend: Backend) -> None:
    uri = backend.store.put_file(backend.source("in.png", A))
    missing = uri.replace("in.png", "gone.png")
    dest = backend.scratch / "dl.png"
    assert code_of(lambda: backend.store.download(missing, dest)) == "media_not_found"
    assert code_of(lambda: backend.store.open(missing)) == "media_not_found"
    assert not dest.exists()


@pytest.mark.parametrize(
    ("name", "size", "content_type"),
    [
        pytest.param("face.png", 3000, "image/png", id="png"),
        pytest.param("clip.mp4", 3 * MiB + 5, "video/mp4", id="several-chunks"),
        pytest.param("empty.jpg", 0, "image/jpeg", id="empty"),
    ],
)
def test_open_streams_chunks(backend: Backend, name: str, size: int, content_type: str) -> None:
    data = blob(size, seed=7)
    uri = backend.store.put_file(backend.source(name, data))
    chunks, length, ctype = backend.store.open(uri)
    got = list(chunks)
    assert length == size
    assert b"".join(got) == data
    assert all(len(c) <= 1 << 20 for c in got)
    assert ctype == content_type


def test_open_can_be_abandoned_midway(backend: Backend) -> None:
    uri = backend.store.put_file(backend.source("big.bin", blob(3 * MiB)))
    chunks, _, _ = backend.store.open(uri)
    assert next(iter(chunks))
    cast(Any, chunks).close()  # a client that went away: the file/connection is released
    assert backend.read(uri) == blob(3 * MiB)


# --- foreign URIs -------------------------------------------------------------------------------


def _file_outside(b: Backend) -> str:
    outside = b.scratch / "secret.txt"
    outside.write_text("no")
    return outside.as_uri()


def _file_symlink_escape(b: Backend) -> str:
    assert isinstance(b.store, FileMediaStore)
    outside = b.scratch / "secret.txt"
    outside.write_text("no")
    link = b.store.root / "uploads" / "escape.png"
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, link)
    return link.as_uri()


def _s3(b: Backend) -> S3MediaStore:
    assert isinstance(b.store, S3MediaStore)
    return b.store


FOREIGN: list[Any] = [
    pytest.param("file", lambda b: "file:///etc/passwd", id="file-etc-passwd"),
    pytest.param("file", _file_outside, id="file-outside-root"),
    pytest.param(
        "file", lambda b: f"{b.store.url}/../{b.scratch.name}/secret.txt", id="file-dotdot"
    ),
    pytest.param("file", _file_symlink_escape, id="file-symlink-escape"),
    pytest.param("file", lambda b: "file://otherhost/etc/hosts", id="file-remote-host"),
    pytest.param("file", lambda b: "s3://bucket/uploads/x.png", id="file-s3-uri"),
    pytest.param(
        "s3",
        lambda b: f"s3://other-{uuid.uuid4().hex[:8]}/{_s3(b).prefix}/uploads/x.png",
        id="s3-other-bucket",
        marks=pytest.mark.integration,
    ),
    pytest.param(
        "s3",
        lambda b: f"s3://{_s3(b).bucket}/elsewhere/uploads/x.png",
        id="s3-other-prefix",
        marks=pytest.mark.integration,
    ),
    pytest.param(
        "s3",
        lambda b: f"{_s3(b).url}evil/uploads/x.png",
        id="s3-sibling-prefix",
        marks=pytest.mark.integration,
    ),
    pytest.param(
        "s3",
        lambda b: f"{_s3(b).url}/../elsewhere/x.png",
        id="s3-dotdot",
        marks=pytest.mark.integration,
    ),
    pytest.param(
        "s3", lambda b: "file:///etc/passwd", id="s3-file-uri", marks=pytest.mark.integration
    ),
    pytest.param(
        "s3",
        lambda b: "https://example.com/x.png",
        id="s3-https-uri",
        marks=pytest.mark.integration,
    ),
]


@pytest.mark.parametrize(("kind", "make_uri"), FOREIGN)
def test_foreign_uris_are_refused(
    make_backend: Callable[[str], Backend], kind: str, make_uri: Callable[[Backend], str]
) -> None:
    b = make_backend(kind)
    uri = make_uri(b)
    dest = b.scratch / "dl.bin"
    assert not b.store.owns(uri)
    for op in (
        lambda: b.store.download(uri, dest),
        lambda: b.store.open(uri),
        lambda: b.store.local_path(uri),
        lambda: b.store.presign_get(uri, 60),
    ):
        with pytest.raises(StorageError) as info:
            op()
        assert info.value.code == "media_outside_data_root"
    assert not dest.exists()


def test_foreign_uri_message_names_the_store(backend: Backend) -> None:
    uri = "s3://someone-else/x.png" if backend.kind == "file" else "file:///etc/passwd"
    with pytest.raises(StorageError) as info:
        backend.store.download(uri, backend.scratch / "x")
    assert f"outside the media store {backend.store.url}" in info.value.message


# --- results ------------------------------------------------------------------------------------


def _result_listing(b: Backend, job_id: str) -> list[str]:
    """What a reader listing <default prefix>/<job_id>/ sees."""
    return sorted(k.split("/", 2)[2] for k in b.stored() if k.startswith(f"results/{job_id}/"))


@pytest.mark.parametrize(
    ("flow", "size"),
    [
        pytest.param("stage-place", 3000, id="stage-then-place"),
        pytest.param("batch", 3000, id="stage-nosync-then-sync-then-place"),
        pytest.param("commit", 3000, id="commit-result"),
        pytest.param("stage-place", 20 * MiB, id="multipart-result"),
    ],
)
def test_results_commit_once_and_the_first_delivery_wins(
    any_backend: Backend, flow: str, size: int
) -> None:
    b, store = any_backend, any_backend.store
    prefix = store.default_output_prefix()
    job_id = str(uuid.uuid4())

    def deliver(tag: str, seed: int) -> tuple[bool, bytes, dict[str, Any]]:
        work = store.new_work_dir(prefix, job_id)
        data = blob(size, seed=seed)
        (work / "result.png").write_bytes(data)
        (work / "frames").mkdir()
        (work / "frames" / "0001.png").write_bytes(tag.encode())
        manifest = {"delivery": tag, "files": ["result.png", "frames/0001.png"]}
        if flow == "commit":
            return store.commit_result(work, prefix, job_id, manifest), data, manifest
        staged = store.stage_result(work, prefix, job_id, manifest, sync=flow != "batch")
        # A reader before the commit point: no manifest, to list or to read.
        assert store.read_manifest(prefix, job_id) is None or tag == "B"
        if tag == "A":
            assert "manifest.json" not in _result_listing(b, job_id)
        if flow == "batch":
            store.sync()
        return store.place_result(staged), data, manifest

    placed, first_data, first_manifest = deliver("A", 1)
    assert placed is True
    assert store.read_manifest(prefix, job_id) == first_manifest
    assert _result_listing(b, job_id) == ["frames/0001.png", "manifest.json", "result.png"]

    placed, _, _ = deliver("B", 2)
    assert placed is False, "a second delivery committed over the first"
    assert store.read_manifest(prefix, job_id) == first_manifest
    assert b.read(store.result_uri(prefix, job_id, "result.png")) == first_data
    assert b.read(store.result_uri(prefix, job_id, "frames/0001.png")) == b"A"
    assert (
        b.read(store.result_uri(prefix, job_id, "manifest.json"))
        == json.dumps(first_manifest, sort_keys=True).encode()
    )
    # Nothing but the result itself is left: no work dirs, no temp objects, no open uploads.
    assert [k for k in b.stored() if not k.startswith(f"results/{job_id}/")] == []
    assert b.pending_uploads() == []


def test_read_manifest_of_an_unknown_job_is_none(backend: Backend) -> None:
    assert backend.store.read_manifest(
        backend.store.default_output_prefix(), str(uuid.uuid4())
    ) is (None)


JOB = "0b6ee6f4-3a55-4b8e-9d0a-3b1c3e0f2a11"


@pytest.mark.parametrize(
    ("name", "file_tail", "s3_tail"),
    [
        pytest.param("result.png", f"results/{JOB}/result.png", None, id="plain"),
        pytest.param("out put#1.png", f"results/{JOB}/out%20put%231.png", None, id="quoted"),
        pytest.param("frames/0001.png", f"results/{JOB}/frames/0001.png", None, id="nested"),
    ],
)
def test_result_uri_format(
    backend: Backend, name: str, file_tail: str, s3_tail: str | None
) -> None:
    store = backend.store
    uri = store.result_uri(store.default_output_prefix(), JOB, name)
    if isinstance(store, FileMediaStore):
        assert uri == (store.root / "results" / JOB / name).as_uri()
        assert uri == f"{store.url}/{file_tail}"
    else:
        assert isinstance(store, S3MediaStore)
        # s3 URIs carry the key verbatim (as the AWS CLI writes them).
        assert uri == f"s3://{store.bucket}/{store.prefix}/results/{JOB}/{name}"
    assert store.owns(uri)


@pytest.mark.parametrize(
    ("job_id", "name", "code"),
    [
        pytest.param("not-a-uuid", "result.png", "invalid_request", id="job-id-not-uuid"),
        pytest.param("../../etc", "result.png", "invalid_request", id="job-id-traversal"),
        pytest.param(JOB, "../escape.png", "invalid_request", id="name-dotdot"),
        pytest.param(JOB, "/abs.png", "invalid_request", id="name-absolute"),
        pytest.param(JOB, "", "invalid_request", id="name-empty"),
    ],
)
def test_result_uri_refuses_bad_ids_and_names(
    backend: Backend, job_id: str, name: str, code: str
) -> None:
    store = backend.store
    assert code_of(lambda: store.result_uri(store.default_output_prefix(), job_id, name)) == code


def test_output_prefixes(backend: Backend) -> None:
    store = backend.store
    default = store.default_output_prefix()
    assert default.endswith("/results/")
    store.check_output_prefix(default)
    inside = default + "team-a/"
    store.check_output_prefix(inside)
    assert store.result_uri(inside, JOB, "r.png").startswith(inside + JOB + "/")
    if isinstance(store, FileMediaStore):
        outside = [
            "file:///tmp/elsewhere/",
            f"{store.url}/../x/",
            "s3://b/results/",
            "file:///",
            "/",
        ]
    else:
        assert isinstance(store, S3MediaStore)
        assert default == f"s3://{store.bucket}/{store.prefix}/results/"
        outside = [
            f"s3://{store.bucket}/elsewhere/",
            f"s3://other-bucket/{store.prefix}/results/",
            f"{store.url}/../x/",
            "file:///tmp/",
        ]
    for prefix in outside:
        code = code_of(lambda p=prefix: store.check_output_prefix(p))  # type: ignore[misc]
        assert code == "media_outside_data_root", prefix
        code = code_of(lambda p=prefix: store.result_uri(p, JOB, "r.png"))  # type: ignore[misc]
        assert code == "media_outside_data_root", prefix


# --- submissions --------------------------------------------------------------------------------


def test_mark_submitted_creates_once(any_backend: Backend) -> None:
    store = any_backend.store
    job_id = str(uuid.uuid4())
    assert store.submitted(job_id) is False
    assert store.mark_submitted(job_id, b'{"n": 1}') is True
    assert store.mark_submitted(job_id, b'{"n": 2}') is False
    assert store.submitted(job_id) is True
    assert store.submitted(str(uuid.uuid4())) is False
    assert store.submission(job_id) == b'{"n": 1}'  # the first body wins
    assert store.submission(str(uuid.uuid4())) is None
    assert any_backend.stored() == [f"submissions/{job_id}.json"]
    assert code_of(lambda: store.mark_submitted("../x", b"{}")) == "invalid_request"


def _race(store: MediaStore, job_id: str, writers: int) -> list[bool]:
    gate = threading.Barrier(writers)
    results: list[bool] = []

    def submit(i: int) -> None:
        gate.wait()
        results.append(store.mark_submitted(job_id, f'{{"n": {i}}}'.encode()))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_mark_submitted_from_many_threads_exactly_one_wins(backend: Backend) -> None:
    for _ in range(5):
        assert sorted(_race(backend.store, str(uuid.uuid4()), 8)) == [False] * 7 + [True]


@pytest.mark.integration
def test_moto_honours_if_none_match(make_backend: Callable[[str], Backend]) -> None:
    """moto 5.x answers 412 to a second If-None-Match create; the probe finds that and
    leaves no probe object behind."""
    b = make_backend("s3")
    assert isinstance(b.store, S3MediaStore)
    assert b.store.conditional_writes() is True
    assert b.stored() == []


@pytest.mark.integration
def test_a_server_ignoring_if_none_match_is_detected(
    make_backend: Callable[[str], Backend], caplog: pytest.LogCaptureFixture
) -> None:
    """An older server that drops If-None-Match (simulated: the header is removed from every
    request before signing) is found by the probe; create-once falls back to HEAD-then-PUT."""
    b = make_backend("s3")
    store = b.store
    assert isinstance(store, S3MediaStore)

    def drop_header(request: Any, **_: Any) -> None:
        if "If-None-Match" in request.headers:
            del request.headers["If-None-Match"]

    store._s3().meta.events.register("before-sign.s3.PutObject", drop_header)
    assert store.conditional_writes() is False
    assert "does not honour If-None-Match" in caplog.text
    job_id = str(uuid.uuid4())
    assert store.mark_submitted(job_id, b"{}") is True
    assert store.mark_submitted(job_id, b"{}") is False
    assert b.stored() == [f"submissions/{job_id}.json"]


# --- presigned URLs -----------------------------------------------------------------------------


def _httpx_get(url: str) -> bytes:
    response = httpx.get(url)
    response.raise_for_status()
    return response.content


def _urllib_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def _httpx_put(url: str, data: bytes) -> int:
    return httpx.put(url, content=data).status_code


def _urllib_put(url: str, data: bytes) -> int:
    # An explicit type: urllib's default (a form) makes moto's werkzeug consume the body as a
    # form, and the PUT then hangs waiting for it.
    request = urllib.request.Request(
        url, data=data, method="PUT", headers={"Content-Type": "application/octet-stream"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


@pytest.mark.parametrize(
    ("get", "put"),
    [
        pytest.param(_httpx_get, _httpx_put, id="httpx"),
        pytest.param(_urllib_get, _urllib_put, id="urllib"),
    ],
)
def test_presigned_urls(
    backend: Backend,
    get: Callable[[str], bytes],
    put: Callable[[str, bytes], int],
) -> None:
    store = backend.store
    uri = store.put_file(backend.source("face.png", A))
    url = store.presign_get(uri, 60)
    direct = store.presign_put("my photo.png", 60)
    if isinstance(store, FileMediaStore):
        assert url is None and direct is None
        return
    assert url is not None and direct is not None
    assert get(url) == A
    put_url, put_uri = direct
    assert put_uri.startswith(f"{store.url}/uploads/direct/")
    assert put_uri.endswith("/my_photo.png")
    assert put(put_url, B) == 200
    assert backend.read(put_uri) == B
    assert code_of(lambda: store.presign_get(uri, 0)) == "invalid_request"


# --- memory -------------------------------------------------------------------------------------


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise LookupError(field_name)


def _reset_peak() -> int:
    """Reset the peak RSS to the current RSS (Linux: clear_refs 5); the current RSS in KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    return _status_kb("VmRSS")


@pytest.mark.slow
@pytest.mark.parametrize("size", [pytest.param(64 * MiB, id="64MB")])
def test_streaming_keeps_memory_flat(backend: Backend, size: int) -> None:
    store = backend.store
    # Warm up: the SDK's imports and endpoint rules are not the transfer's memory.
    warm = store.put_stream(gen_stream(2 * MiB, seed=9)[0], "warm.bin")
    store.download(warm.uri, backend.scratch / "warm.bin")

    stream, sha = gen_stream(size, seed=64, chunk=1 << 20)
    base = _reset_peak()
    stored = store.put_stream(stream, "big.bin", max_bytes=size)
    put_growth = (_status_kb("VmHWM") - base) * 1024

    dest = backend.scratch / "big.bin"
    base = _reset_peak()
    assert store.download(stored.uri, dest, max_bytes=size) == size
    get_growth = (_status_kb("VmHWM") - base) * 1024

    assert stored.sha256 == sha
    digest = hashlib.sha256()
    with open(dest, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    assert digest.hexdigest() == sha
    print(
        f"{backend.kind}: peak RSS growth put_stream {put_growth / MiB:.1f} MiB, "
        f"download {get_growth / MiB:.1f} MiB for {size / MiB:.0f} MiB"
    )
    assert put_growth < size // 2, f"put_stream grew RSS by {put_growth / MiB:.1f} MiB"
    assert get_growth < size // 2, f"download grew RSS by {get_growth / MiB:.1f} MiB"


# --- FACEFLEET_MEDIA_URL ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        pytest.param("file://{tmp}/root", "file://{tmp}/root", id="file"),
        pytest.param("file://localhost{tmp}/root/", "file://{tmp}/root", id="file-localhost"),
        pytest.param("file://{tmp}/a%20b", "file://{tmp}/a%20b", id="file-quoted"),
        pytest.param("s3://media-bucket", "s3://media-bucket", id="s3-bucket"),
        pytest.param("s3://media.bucket-1/a/b/", "s3://media.bucket-1/a/b", id="s3-prefix"),
        pytest.param("  s3://media-bucket/p  ", "s3://media-bucket/p", id="s3-whitespace"),
    ],
)
def test_open_media_store_parses_the_setting(url: str, normalised: str, tmp_path: Path) -> None:
    tmp = str(tmp_path.resolve())
    store = open_media_store(url.format(tmp=tmp))
    assert isinstance(store, FileMediaStore if url.strip().startswith("file") else S3MediaStore)
    assert store.url == normalised.format(tmp=tmp)


def test_open_media_store_empty_url_is_the_data_root(tmp_path: Path) -> None:
    store = open_media_store("", data_root=tmp_path)
    assert isinstance(store, FileMediaStore)
    assert store.url == tmp_path.resolve().as_uri()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://example.com/media", id="unsupported-scheme"),
        pytest.param("/srv/facefleet", id="bare-path"),
        pytest.param("file:relative/path", id="file-relative"),
        pytest.param("file://relative/path", id="file-host"),
        pytest.param("s3://", id="s3-missing-bucket"),
        pytest.param("s3:///prefix", id="s3-empty-bucket"),
        pytest.param("s3://Media_Bucket", id="s3-bucket-not-dns"),
        pytest.param("s3://ab", id="s3-bucket-too-short"),
        pytest.param("s3://192.168.1.1", id="s3-bucket-ip"),
        pytest.param("s3://bucket..x", id="s3-bucket-double-dot"),
        pytest.param("s3://key:secret@bucket", id="s3-credentials"),
        pytest.param("s3://bucket/a/../b", id="s3-prefix-dotdot"),
        pytest.param("s3://bucket/a//b", id="s3-prefix-empty-segment"),
        pytest.param("s3://bucket/p?versionId=1", id="s3-query"),
        pytest.param("", id="empty-without-data-root"),
    ],
)
def test_open_media_store_refuses_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="FACEFLEET_MEDIA_URL"):
        open_media_store(url)
