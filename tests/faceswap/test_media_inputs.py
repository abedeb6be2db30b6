"""Photos and videos as phones make them: EXIF orientation, display-matrix rotation, HEIC, AVIF.

Built from insightface's sample photo (t1.jpg, a group photo, landscape). Each stored picture is
the upright photo turned by the inverse of its orientation with Pillow's own transpose (an
implementation independent of ours), its EXIF orientation written by Pillow, so the worker must
hand back the upright photo. A decoder that ignored the tag, or turned the wrong way, fails.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from facefleet.consumer.errors import PermanentJobError
from facefleet.consumer.processors.faceswap import FaceSwapProcessor, media
from facefleet.consumer.processors.faceswap.media import MediaLimits
from facefleet.producer.gateway.uploads import UploadRejected, check_kind
from facefleet.settings import GatewaySettings, WorkerSettings
from facefleet.sniff import HEAD_BYTES
from tests.faceswap.conftest import HANKS, T1, MakeContext, write_video

T = Image.Transpose
INVERSE: dict[int, T | None] = {
    1: None,
    2: T.FLIP_LEFT_RIGHT,
    3: T.ROTATE_180,
    4: T.FLIP_TOP_BOTTOM,
    5: T.TRANSPOSE,
    6: T.ROTATE_90,  # shown turned 90 degrees clockwise: stored turned counter-clockwise
    7: T.TRANSVERSE,
    8: T.ROTATE_270,
}
"""The transpose that makes a stored picture out of an upright one, per EXIF orientation."""

LIMITS = MediaLimits()
WIDTH, HEIGHT = 321, 222


@pytest.fixture(scope="module")
def upright() -> Image.Image:
    """t1.jpg scaled down (odd width: a transposition is never the identity on its size)."""
    with Image.open(T1) as img:
        return img.convert("RGB").resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)


def _bgr(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])


def _stored(upright: Image.Image, orientation: int, fmt: str, path: Path) -> Path:
    """upright turned into what a camera stores for `orientation`, with that EXIF tag."""
    op = INVERSE[orientation]
    img = upright if op is None else upright.transpose(op)
    exif = Image.Exif()
    exif[0x0112] = orientation
    params: dict[str, object] = {"exif": exif}
    if fmt == "JPEG":
        params["quality"] = 95
    if fmt == "WEBP":
        params["lossless"] = True
    if fmt == "HEIF":
        pytest.importorskip("pillow_heif").register_heif_opener()
        params["quality"] = 90
    if fmt == "AVIF":
        params["quality"] = 90
    img.save(path, fmt, **params)
    return path


def _mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize(
    ("fmt", "tolerance"),
    [
        pytest.param("JPEG", 3.0, id="jpeg"),
        pytest.param("PNG", 0.0, id="png"),
        pytest.param("WEBP", 0.0, id="webp-lossless"),
    ],
)
@pytest.mark.parametrize(
    "orientation",
    [
        pytest.param(1, id="1-upright"),
        pytest.param(2, id="2-mirrored"),
        pytest.param(3, id="3-upside-down"),
        pytest.param(4, id="4-mirrored-upside-down"),
        pytest.param(5, id="5-transposed"),
        pytest.param(6, id="6-phone-portrait"),
        pytest.param(7, id="7-transversed"),
        pytest.param(8, id="8-turned-left"),
    ],
)
def test_exif_orientation_is_applied(
    upright: Image.Image, orientation: int, fmt: str, tolerance: float, tmp_path: Path
) -> None:
    path = _stored(upright, orientation, fmt, tmp_path / f"photo.{fmt.lower()}")
    info = media.probe(path, LIMITS, "target")
    assert (info.width, info.height, info.orientation) == (WIDTH, HEIGHT, orientation)
    picture = media.read_image(path, info, "target")
    assert picture.shape == (HEIGHT, WIDTH, 3)
    assert _mean_diff(picture, _bgr(upright)) <= tolerance


@pytest.mark.parametrize(
    ("fmt", "orientation"),
    [
        pytest.param("HEIF", 1, id="heic"),
        pytest.param("AVIF", 1, id="avif"),
        pytest.param("AVIF", 6, id="avif-phone-portrait"),
        pytest.param("AVIF", 3, id="avif-upside-down"),
    ],
)
def test_heic_and_avif_decode_upright(
    upright: Image.Image, fmt: str, orientation: int, tmp_path: Path
) -> None:
    path = _stored(upright, orientation, fmt, tmp_path / "photo.bin")
    info = media.probe(path, LIMITS, "source")
    assert (info.kind, info.format) == ("image", "heic" if fmt == "HEIF" else "avif")
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    picture = media.read_image(path, info, "source")
    assert picture.shape == (HEIGHT, WIDTH, 3)
    assert _mean_diff(picture, _bgr(upright)) < 6.0


def test_heic_without_its_decoder_is_refused_naming_the_format(
    upright: Image.Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _stored(upright, 1, "HEIF", tmp_path / "photo.heic")
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as on a worker without the extra
    with pytest.raises(PermanentJobError) as info:
        media.probe(path, LIMITS, "source")
    assert info.value.code == "unsupported_media"
    assert "heic" in str(info.value) and "pillow-heif" in str(info.value)


def test_heic_bomb_is_refused_from_its_container(upright: Image.Image, tmp_path: Path) -> None:
    path = _stored(upright, 1, "HEIF", tmp_path / "photo.heic")
    with pytest.raises(PermanentJobError) as info:
        media.probe(path, MediaLimits(max_pixels=WIDTH * HEIGHT - 1), "source")
    assert info.value.code == "too_large"


def test_formats_not_decoded_are_refused_naming_them(tmp_path: Path) -> None:
    path = tmp_path / "still.gif"
    Image.new("RGB", (8, 8)).save(path, "GIF")
    with pytest.raises(PermanentJobError) as info:
        media.probe(path, LIMITS, "source")
    assert info.value.code == "unsupported_media"
    assert "gif" in str(info.value)


def test_phone_portrait_jpeg_swaps_end_to_end(
    classic_processor: FaceSwapProcessor, make_ctx: MakeContext, tmp_path: Path
) -> None:
    """The report: a phone JPEG with orientation 6 failed as corrupt_media."""
    with Image.open(T1) as img:
        target = _stored(img.convert("RGB"), 6, "JPEG", tmp_path / "phone.jpg")
    ctx = make_ctx(HANKS, target)
    out = classic_processor.run(ctx)
    result = cv2.imread(str(ctx.output_dir / out.result_file), cv2.IMREAD_UNCHANGED)
    assert result.shape[:2] == (886, 1280)  # upright: landscape, as the photo was taken
    assert out.details["faces_swapped"] >= 1


@pytest.mark.parametrize(
    "rotation",
    [
        pytest.param(0, id="none"),
        pytest.param(-90, id="portrait-clockwise"),
        pytest.param(90, id="portrait-counter-clockwise"),
        pytest.param(180, id="upside-down"),
    ],
)
def test_video_rotation_is_honoured(upright: Image.Image, rotation: int, tmp_path: Path) -> None:
    """A video whose display matrix turns its frames comes out upright, its sides swapped."""
    picture = cv2.resize(_bgr(upright), (160, 112), interpolation=cv2.INTER_AREA)
    stored = np.ascontiguousarray(np.rot90(picture, -(rotation // 90)))
    path = write_video(tmp_path / "v.mp4", [stored] * 3, audio=False, rotation=rotation)
    info = media.probe(path, LIMITS, "target")
    assert (info.width, info.height, info.rotation) == (160, 112, rotation)
    frames = list(media.read_frames(path, LIMITS))
    assert len(frames) == 3
    assert frames[0].shape == (112, 160, 3)
    # H.264 at 4:2:0 is lossy: close to the upright picture, far from it upside down
    assert _mean_diff(frames[0], picture) < 10.0
    assert _mean_diff(frames[0], picture[::-1]) > 30.0


def test_rotated_video_result_is_upright(
    classic_processor: FaceSwapProcessor, make_ctx: MakeContext, tmp_path: Path
) -> None:
    import av

    frame = cv2.resize(cv2.imread(str(T1)), (320, 222), interpolation=cv2.INTER_AREA)
    stored = np.ascontiguousarray(np.rot90(frame, 1))  # shown turned clockwise: 320 x 222
    target = write_video(tmp_path / "portrait.mp4", [stored] * 4, audio=False, rotation=-90)
    ctx = make_ctx(HANKS, target)
    out = classic_processor.run(ctx)
    with av.open(str(ctx.output_dir / out.result_file)) as result:
        stream = result.streams.video[0]
        shown = next(result.decode(stream))
        assert (shown.width, shown.height, shown.rotation) == (320, 222, 0)


def _gateway_kind(data: bytes) -> str | None:
    allowed = GatewaySettings.model_fields["upload_types"].default
    try:
        return check_kind("target", data[:HEAD_BYTES], allowed=allowed)
    except UploadRejected:
        return None


def _worker_kind(path: Path) -> str | None:
    limits = MediaLimits.from_settings(WorkerSettings())
    try:
        return media.probe(path, limits, "target").format
    except PermanentJobError as exc:
        assert exc.code == "unsupported_media"
        return None


@pytest.mark.parametrize(
    "fmt",
    [
        pytest.param("JPEG", id="jpeg"),
        pytest.param("PNG", id="png"),
        pytest.param("WEBP", id="webp"),
        pytest.param("BMP", id="bmp"),
        pytest.param("GIF", id="gif"),
        pytest.param("TIFF", id="tiff"),
        pytest.param("HEIF", id="heic"),
        pytest.param("AVIF", id="avif"),
    ],
)
def test_gateway_and_worker_agree(upright: Image.Image, fmt: str, tmp_path: Path) -> None:
    """What the gateway lets in with its defaults, a worker with its defaults takes, and as the
    same format; what one refuses, the other refuses too."""
    if fmt == "HEIF":
        pytest.importorskip("pillow_heif").register_heif_opener()
    buf = io.BytesIO()
    ImageOps.exif_transpose(upright).save(buf, fmt)
    path = tmp_path / "photo.bin"
    path.write_bytes(buf.getvalue())
    assert _gateway_kind(buf.getvalue()) == _worker_kind(path)
