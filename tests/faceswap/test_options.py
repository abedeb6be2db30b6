"""Option parsing: every bad value is an invalid_option naming the option."""

from __future__ import annotations

import pytest

from facefleet.consumer.errors import PermanentJobError
from facefleet.consumer.processors.faceswap.options import FaceSwapOptions, parse_options


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param({}, FaceSwapOptions(), id="defaults"),
        pytest.param(
            {"face_selector": "MANY", "enhance": "true", "enhance_blend": 40, "quality": 75.0},
            FaceSwapOptions(face_selector="many", enhance=True, enhance_blend=40, quality=75),
            id="case-and-strings-normalised",
        ),
        pytest.param(
            {"output_format": "jpeg"}, FaceSwapOptions(output_format="jpg"), id="jpeg-alias"
        ),
        pytest.param(
            {"face_selector": "reference", "reference_face_index": 2, "reference_distance": 0.5},
            FaceSwapOptions(
                face_selector="reference", reference_face_index=2, reference_distance=0.5
            ),
            id="reference",
        ),
    ],
)
def test_valid_options(options: dict[str, object], expected: FaceSwapOptions) -> None:
    assert parse_options(options) == expected


@pytest.mark.parametrize(
    ("options", "mentions"),
    [
        pytest.param({"face_selectr": "one"}, "face_selectr", id="typo-in-name"),
        pytest.param(
            {"reference_uri": "file:///x"}, "reference_uri", id="reference-uri-unsupported"
        ),
        pytest.param({"face_selector": "all"}, "face_selector", id="unknown-selector"),
        pytest.param({"enhance_blend": 101}, "enhance_blend", id="blend-over-100"),
        pytest.param({"enhance_blend": 50.5}, "enhance_blend", id="blend-not-integer"),
        pytest.param({"quality": 0}, "quality", id="quality-zero"),
        pytest.param({"quality": True}, "quality", id="quality-bool"),
        pytest.param({"reference_distance": "nan"}, "reference_distance", id="distance-nan"),
        pytest.param({"reference_distance": 1.5}, "reference_distance", id="distance-over-1"),
        pytest.param({"enhance": "maybe"}, "enhance", id="enhance-not-bool"),
        pytest.param({"output_format": "gif"}, "output_format", id="format-unknown"),
    ],
)
def test_invalid_options(options: dict[str, object], mentions: str) -> None:
    with pytest.raises(PermanentJobError) as info:
        parse_options(options)
    assert info.value.code == "invalid_option"
    assert mentions in info.value.message


@pytest.mark.parametrize(
    ("fmt", "is_video", "target", "expected"),
    [
        pytest.param(None, False, "png", "png", id="image-keeps-png"),
        pytest.param(None, False, "bmp", "jpg", id="image-bmp-becomes-jpg"),
        pytest.param(None, True, "webm", "mp4", id="video-default-mp4"),
        pytest.param("webp", False, "jpeg", "webp", id="image-explicit"),
    ],
)
def test_resolved_format(fmt: str | None, is_video: bool, target: str, expected: str) -> None:
    opts = parse_options({} if fmt is None else {"output_format": fmt})
    assert opts.resolved_format(is_video, target) == expected


@pytest.mark.parametrize(
    ("fmt", "is_video"),
    [pytest.param("mp4", False, id="mp4-for-image"), pytest.param("jpg", True, id="jpg-for-video")],
)
def test_format_kind_mismatch(fmt: str, is_video: bool) -> None:
    with pytest.raises(PermanentJobError) as info:
        parse_options({"output_format": fmt}).resolved_format(is_video, "png")
    assert info.value.code == "invalid_option"
