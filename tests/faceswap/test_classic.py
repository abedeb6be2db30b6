"""The classic backend on real photos: it finds the faces, changes them, and nothing far away."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facefleet.consumer.processors.faceswap import FaceSwapProcessor
from facefleet.consumer.processors.faceswap.classic import ClassicBackend, estimate_five_points
from tests.faceswap.conftest import ASTRONAUT, HANKS, T1, MakeContext


@pytest.mark.parametrize(
    ("image", "at_least"),
    [
        pytest.param(ASTRONAUT, 1, id="astronaut"),
        pytest.param(HANKS, 1, id="tom-hanks"),
        pytest.param(T1, 4, id="t1-group"),
    ],
)
def test_finds_faces(image: Path, at_least: int) -> None:
    faces = ClassicBackend().detect([cv2.imread(str(image))])[0]
    assert len(faces) >= at_least
    for face in faces:
        x1, y1, x2, y2 = face.bbox
        # keypoints sit inside the box, eyes above nose above mouth
        assert np.all((face.kps[:, 0] > x1) & (face.kps[:, 0] < x2))
        assert np.all((face.kps[:, 1] > y1) & (face.kps[:, 1] < y2))
        assert face.kps[0, 1] < face.kps[2, 1] < face.kps[3, 1]


def test_astronaut_face_is_where_it_is() -> None:
    """Eileen Collins' face in skimage's astronaut.png is around x 180-270, y 60-170."""
    faces = ClassicBackend().detect([cv2.imread(str(ASTRONAUT))])[0]
    cx = [(f.bbox[0] + f.bbox[2]) / 2 for f in faces]
    cy = [(f.bbox[1] + f.bbox[3]) / 2 for f in faces]
    assert any(180 < x < 270 and 60 < y < 170 for x, y in zip(cx, cy, strict=True))


def _far_from_faces(
    shape: tuple[int, ...], faces_bboxes: list[np.ndarray], pad: float
) -> np.ndarray:
    far = np.ones(shape[:2], bool)
    for x1, y1, x2, y2 in faces_bboxes:
        w, h = x2 - x1, y2 - y1
        far[
            max(0, int(y1 - pad * h)) : int(y2 + pad * h),
            max(0, int(x1 - pad * w)) : int(x2 + pad * w),
        ] = False
    return far


@pytest.mark.parametrize(
    ("source", "target", "selector"),
    [
        pytest.param(HANKS, ASTRONAUT, "one", id="hanks-onto-astronaut"),
        pytest.param(ASTRONAUT, T1, "many", id="astronaut-onto-t1-many"),
    ],
)
def test_swap_changes_faces_only(
    classic_processor: FaceSwapProcessor,
    make_ctx: MakeContext,
    source: Path,
    target: Path,
    selector: str,
) -> None:
    ctx = make_ctx(source, target, face_selector=selector, output_format="png")
    out = classic_processor.run(ctx)
    before = cv2.imread(str(target))
    after = cv2.imread(str(ctx.output_dir / out.result_file))
    assert after.shape == before.shape
    faces = ClassicBackend().detect([before])[0]
    diff = np.abs(after.astype(int) - before.astype(int)).max(axis=2)
    # far from every face: bit-identical (PNG out, paste confined to a face neighbourhood)
    far = _far_from_faces(before.shape, [f.bbox for f in faces], pad=0.6)
    assert far.mean() > 0.5
    assert diff[far].max() == 0
    # inside the swapped faces: visibly changed
    assert out.details["faces_swapped"] >= 1
    changed = 0
    for f in faces:
        x1, y1, x2, y2 = (int(v) for v in f.bbox)
        inner = diff[
            y1 + (y2 - y1) // 4 : y2 - (y2 - y1) // 4, x1 + (x2 - x1) // 4 : x2 - (x2 - x1) // 4
        ]
        changed += int((inner > 8).mean() > 0.2)
    assert changed >= (1 if selector == "one" else 3)
    assert out.details["backend"] == "classic"
    assert [e["stage"] for e in ctx.events][:7] == [
        "decode",
        "detect",
        "select",
        "swap",
        "paste_back",
        "enhance",
        "encode",
    ]


def test_one_selects_the_largest_face(
    classic_processor: FaceSwapProcessor, make_ctx: MakeContext
) -> None:
    ctx = make_ctx(ASTRONAUT, T1, face_selector="one", output_format="png")
    out = classic_processor.run(ctx)
    assert out.details["faces_swapped"] == 1


def test_enhance_is_reported_as_skipped(
    classic_processor: FaceSwapProcessor, make_ctx: MakeContext
) -> None:
    out = classic_processor.run(make_ctx(HANKS, ASTRONAUT, enhance=True))
    assert out.details["enhanced"] is False
    assert "enhance_skipped" in out.details


def test_five_points_fallback_without_eyes() -> None:
    kps = estimate_five_points(np.array([0, 0, 100, 100], np.float32), None)
    assert kps[0, 0] < kps[2, 0] < kps[1, 0]  # nose between the eyes
    assert kps[3, 1] == pytest.approx(kps[4, 1])  # level mouth
