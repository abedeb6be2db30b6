"""The bad-input corpus: each input ends in its own error code, before the expensive work.

Runs on the classic backend (no weights); the checks live in media.py and are shared by both
backends.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from facefleet.consumer.errors import PermanentJobError
from facefleet.consumer.processors.faceswap import FaceSwapProcessor, media
from facefleet.settings import WorkerSettings
from facefleet.sniff import HEAD_BYTES, sniff
from tests.faceswap.conftest import ASTRONAUT, MakeContext, write_video


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(path: Path) -> Path:
    """A 200 KB-ish PNG that declares 100000 x 100000 pixels (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 300_000, 9)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    return path


def huge_jpeg(path: Path) -> Path:
    """A real JPEG whose SOF0 header is patched to claim 60000 x 60000."""
    ok, buf = cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))
    assert ok
    data = bytearray(buf.tobytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    path.write_bytes(bytes(data))
    return path


def truncated(src: Path, fmt: str) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        img = cv2.imread(str(src))
        ok, buf = cv2.imencode(fmt, img)
        assert ok
        data = buf.tobytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        return path

    return make


def grey_image(path: Path) -> Path:
    cv2.imwrite(str(path), np.full((240, 320, 3), 127, np.uint8))
    return path


def gif(path: Path) -> Path:
    path.write_bytes(b"GIF89a" + b"\x01\x00\x01\x00\x80\x00\x00" + b"\x00" * 40)
    return path


def text(path: Path) -> Path:
    path.write_text("this is not an image, whatever the name says\n")
    return path


def empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def bad_mp4(path: Path) -> Path:
    path.write_bytes(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x17" * 4000)
    return path


def flv(path: Path) -> Path:
    path.write_bytes(b"FLV\x01\x05\x00\x00\x00\x09" + b"\x00" * 100)
    return path


def small_video(path: Path) -> Path:
    frames = [np.full((64, 64, 3), 127, np.uint8) for _ in range(12)]
    return write_video(path, frames, fps=12, audio=False)


def copy_of(src: Path) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        path.write_bytes(src.read_bytes())
        return path

    return make


ASTRO = copy_of(ASTRONAUT)


@pytest.mark.parametrize(
    ("source", "target", "name", "code"),
    [
        pytest.param(ASTRO, empty, "t.jpg", "corrupt_media", id="zero-byte-file"),
        pytest.param(
            ASTRO, truncated(ASTRONAUT, ".jpg"), "t.jpg", "corrupt_media", id="truncated-jpeg"
        ),
        pytest.param(
            ASTRO, truncated(ASTRONAUT, ".png"), "t.png", "corrupt_media", id="truncated-png"
        ),
        pytest.param(ASTRO, text, "t.jpg", "unsupported_media", id="not-an-image"),
        pytest.param(ASTRO, gif, "t.gif", "unsupported_media", id="format-not-allowed"),
        pytest.param(ASTRO, flv, "t.mp4", "unsupported_media", id="unsupported-container"),
        pytest.param(ASTRO, bad_mp4, "t.mp4", "corrupt_media", id="corrupt-mp4"),
        pytest.param(ASTRO, huge_png, "t.png", "too_large", id="huge-declared-png"),
        pytest.param(ASTRO, huge_jpeg, "t.jpg", "too_large", id="huge-declared-jpeg"),
        pytest.param(ASTRO, grey_image, "t.png", "no_face_in_target", id="no-face-in-target"),
        pytest.param(grey_image, ASTRO, "t.png", "no_face_in_source", id="no-face-in-source"),
        pytest.param(small_video, ASTRO, "t.png", "unsupported_media", id="video-as-source"),
        pytest.param(ASTRO, small_video, "t.mp4", "no_face_in_target", id="video-without-faces"),
    ],
)
def test_bad_input_gets_its_code(
    classic_processor: FaceSwapProcessor,
    make_ctx: MakeContext,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: Callable[[Path], Path],
    target: Callable[[Path], Path],
    name: str,
    code: str,
) -> None:
    src = source(tmp_path / ("s.mp4" if source is small_video else "s.png"))
    tgt = target(tmp_path / name)
    if code == "too_large":
        # The bomb must be refused from its header: decoding it is a failure of the test.
        def no_decode(*args: object, **kwargs: object) -> None:
            raise AssertionError("a bomb reached the decoder")

        monkeypatch.setattr(media, "read_image", no_decode)
    ctx = make_ctx(src, tgt)
    with pytest.raises(PermanentJobError) as info:
        classic_processor.run(ctx)
    assert info.value.code == code, info.value.message
    assert not any(ctx.output_dir.iterdir())


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        pytest.param("media_max_bytes", 10_000, "too_large", id="over-max-bytes"),
        pytest.param("media_max_pixels", 100_000, "too_large", id="over-max-pixels"),
        pytest.param("media_image_formats", "jpeg", "unsupported_media", id="png-not-allowed"),
    ],
)
def test_limits_from_settings(make_ctx: MakeContext, field: str, value: object, code: str) -> None:
    proc = FaceSwapProcessor(WorkerSettings(backend="classic", **{field: value}))
    with pytest.raises(PermanentJobError) as info:
        proc.run(make_ctx(ASTRONAUT, ASTRONAUT))
    assert info.value.code == code


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("media_max_frames", 5, id="over-max-frames"),
        pytest.param("media_max_duration_s", 0.5, id="over-max-duration"),
    ],
)
def test_video_limits(make_ctx: MakeContext, tmp_path: Path, field: str, value: object) -> None:
    video = small_video(tmp_path / "v.mp4")
    proc = FaceSwapProcessor(WorkerSettings(backend="classic", **{field: value}))
    with pytest.raises(PermanentJobError) as info:
        proc.run(make_ctx(ASTRONAUT, video))
    assert info.value.code == "too_large"


def test_invalid_option_fails_before_reading_media(
    classic_processor: FaceSwapProcessor, make_ctx: MakeContext, tmp_path: Path
) -> None:
    with pytest.raises(PermanentJobError) as info:
        classic_processor.run(make_ctx(tmp_path / "nope.png", ASTRONAUT, quality=500))
    assert info.value.code == "invalid_option"


@pytest.mark.parametrize(
    ("ext", "params"),
    [
        pytest.param(".png", [], id="png"),
        pytest.param(".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], id="jpeg-progressive"),
        pytest.param(".webp", [cv2.IMWRITE_WEBP_QUALITY, 80], id="webp-lossy"),
        pytest.param(".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], id="webp-lossless"),
        pytest.param(".bmp", [], id="bmp"),
    ],
)
def test_header_size_matches_decoder(ext: str, params: list[int]) -> None:
    ok, buf = cv2.imencode(ext, np.zeros((37, 53, 3), np.uint8), params)
    assert ok
    data = buf.tobytes()
    sniffed = sniff(data[:HEAD_BYTES])
    assert sniffed is not None
    assert media.image_size(data, sniffed.format) == (53, 37)
