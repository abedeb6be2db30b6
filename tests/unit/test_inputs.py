"""Where a job's input comes from (consumer.inputs.Inputs): a file:// in the media store is used
in place, an object of the store is downloaded into scratch, a file:// outside an object store
is read from the workers' data root, anything else is refused with a code that says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from facefleet.consumer.errors import PermanentJobError
from facefleet.consumer.inputs import Inputs, Scratch
from facefleet.fetch import FetchPolicy
from facefleet.media import FileMediaStore
from facefleet.storage import Storage, StorageError

JOB = "00000000-0000-4000-8000-000000000001"


class FakeObjectStore:
    """A fake of an object store's two calls Inputs makes: it owns s3://fake/... only, has no
    local paths, and downloads by writing the key's name."""

    url = "s3://fake"

    def local_path(self, uri: str) -> Path | None:
        if not uri.startswith("s3://fake/"):
            raise StorageError("media_outside_data_root", f"{uri}: outside the media store")
        return None

    def download(self, uri: str, dest: Path, *, max_bytes: int | None = None) -> int:
        if uri.endswith("missing.png"):
            raise StorageError("media_not_found", f"{uri}: no such object")
        dest.write_bytes(uri.encode())
        return len(uri)


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """(media root, workers' data root), each with an input.png."""
    media, data = tmp_path / "media", tmp_path / "data"
    for root in (media, data):
        root.mkdir()
        (root / "input.png").write_bytes(root.name.encode())
    return media, data


@pytest.mark.parametrize(
    ("store", "uri", "expected"),
    [
        pytest.param("file", "{media}/input.png", b"media", id="file store: used in place"),
        pytest.param("file", "file://{media}/input.png", b"media", id="file store: file URI"),
        pytest.param("file", "{data}/input.png", b"data", id="file store: data root fallback"),
        pytest.param("s3", "s3://fake/k/input.png", b"s3://fake/k/input.png", id="s3: downloaded"),
        pytest.param("s3", "file://{data}/input.png", b"data", id="s3: file URI in the data root"),
        pytest.param("file", "{media}/nope.png", "media_not_found", id="file store: missing"),
        pytest.param("s3", "s3://fake/missing.png", "media_not_found", id="s3: missing object"),
        pytest.param("file", "/etc/hostname", "media_outside_data_root", id="outside both roots"),
        pytest.param("file", "s3://fake/x.png", "media_outside_data_root", id="file store: s3 URI"),
        pytest.param("s3", "s3://other/x.png", "media_outside_data_root", id="s3: other bucket"),
    ],
)
def test_localize(
    roots: tuple[Path, Path], tmp_path: Path, store: str, uri: str, expected: bytes | str
) -> None:
    media_root, data_root = roots
    media = FileMediaStore(media_root) if store == "file" else FakeObjectStore()
    inputs = Inputs(media, lambda: Storage(data_root), FetchPolicy(), 1 << 20)  # type: ignore[arg-type]
    scratch = Scratch(tmp_path / "scratch", JOB)
    uri = uri.format(media=media_root, data=data_root)
    if isinstance(expected, bytes):
        assert inputs.localize(uri, "source", scratch).read_bytes() == expected
        return
    with pytest.raises(PermanentJobError) as info:
        inputs.localize(uri, "source", scratch)
    assert info.value.code == expected
    assert info.value.message.startswith("source: ")
