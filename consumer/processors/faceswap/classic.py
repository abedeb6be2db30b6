"""The `classic` backend: a face swap with OpenCV alone, no model weights.

- detect: the Haar frontal-face cascade bundled with opencv-python 4.x (cv2.data), on an
  equalised grey image downscaled to at most DETECT_MAX_SIDE;
- five points: the eye cascade inside the upper face when it finds one eye per side, else fixed
  proportions of the face box; nose and mouth from the eye line with arcface-template ratios;
- swap: the source face warped onto the target's five points by a least-squares similarity;
- paste back: Poisson blending (cv2.seamlessClone) under an elliptical mask, then feathered
  with a blurred copy of that mask so the seam fades out;
- embedding (reference selection only): a HOG descriptor of the aligned grey crop.

Quality, honestly: it is a pasted, colour-matched photo of the source face, not a generated one.
Pose, expression and lighting come from the source; frontal, similar faces look passable, while
profiles, glasses, occlusions and large pose differences look wrong or are not detected at all.
Haar misses faces a CNN finds and fires on face-like texture. The HOG "identity" separates
different crops, not different people. Use it for demos, CI and plumbing, not for product output.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from facefleet.consumer.processors.faceswap.geometry import (
    Face,
    Frame,
    align_matrix,
    arcface_template,
    umeyama,
)

NAME = "classic"
DETECT_MAX_SIDE = 960
QUALITY_NOTE = (
    "classic: Haar-cascade detection and Poisson-blended paste of the source photo; "
    "pose, expression and lighting come from the source; demo/CI quality"
)
_CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_eye.xml")


@dataclass(frozen=True)
class ClassicSource:
    image: Frame
    face: Face


@dataclass(frozen=True)
class ClassicPatch:
    """The source warped into a region of the target frame, with its masks."""

    x0: int
    y0: int
    warped: np.ndarray
    hard_mask: np.ndarray
    soft_mask: np.ndarray


def estimate_five_points(
    bbox: np.ndarray, eyes: tuple[np.ndarray, np.ndarray] | None
) -> np.ndarray:
    """Five landmarks (arcface order) from the eye centres, or from the box when eyes are missing."""
    x1, y1, x2, y2 = (float(v) for v in bbox[:4])
    w, h = x2 - x1, y2 - y1
    if eyes is None:
        left = np.array([x1 + 0.31 * w, y1 + 0.39 * h])
        right = np.array([x1 + 0.69 * w, y1 + 0.39 * h])
    else:
        left, right = eyes
    d = float(np.linalg.norm(right - left)) or 1.0
    u = (right - left) / d
    n = np.array([-u[1], u[0]])  # image y points down: this is "below the eye line"
    mid = (left + right) / 2
    # ratios of arcface_dst: nose 0.57 d below the eye midpoint, mouth corners 1.155 d below
    # and 0.414 d to either side
    nose = mid + n * 0.57 * d
    mouth_l = mid + n * 1.155 * d - u * 0.414 * d
    mouth_r = mid + n * 1.155 * d + u * 0.414 * d
    return np.array([left, right, nose, mouth_l, mouth_r], dtype=np.float32)


class ClassicBackend:
    """Stateless apart from the cascades (one pair per thread: CascadeClassifier is not
    documented as thread-safe)."""

    name = NAME
    quality_note = QUALITY_NOTE
    supports_enhance = False

    def __init__(self) -> None:
        for file in _CASCADES:
            path = cv2.data.haarcascades + file  # type: ignore[attr-defined]
            if cv2.CascadeClassifier(path).empty():
                raise RuntimeError(f"OpenCV cascade {path} is missing (opencv-python 4.x needed)")
        self._local = threading.local()

    def _cascades(self) -> tuple[cv2.CascadeClassifier, cv2.CascadeClassifier]:
        pair = getattr(self._local, "pair", None)
        if pair is None:
            folder = cv2.data.haarcascades  # type: ignore[attr-defined]
            pair = tuple(cv2.CascadeClassifier(folder + f) for f in _CASCADES)
            self._local.pair = pair
        return pair  # type: ignore[no-any-return]

    def warm_up(self) -> None:
        self.detect([np.zeros((64, 64, 3), np.uint8)])

    # --- detect ---------------------------------------------------------------------------

    def detect(self, frames: Sequence[Frame]) -> list[list[Face]]:
        return [self._detect_one(f) for f in frames]

    def _detect_one(self, frame: Frame) -> list[Face]:
        face_cc, eye_cc = self._cascades()
        scale = min(1.0, DETECT_MAX_SIDE / max(frame.shape[:2]))
        small = (
            frame
            if scale == 1.0
            else cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        )
        grey = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY))
        min_side = max(24, min(grey.shape) // 20)
        rects = face_cc.detectMultiScale(grey, 1.1, 5, minSize=(min_side, min_side))
        faces = []
        for x, y, w, h in rects:
            eyes = self._eyes(eye_cc, grey, int(x), int(y), int(w), int(h))
            bbox = np.array([x, y, x + w, y + h], dtype=np.float32) / scale
            if eyes is not None:
                eyes = (eyes[0] / scale, eyes[1] / scale)
            faces.append(Face(bbox=bbox, kps=estimate_five_points(bbox, eyes), score=1.0))
        return faces

    @staticmethod
    def _eyes(
        eye_cc: cv2.CascadeClassifier, grey: np.ndarray, x: int, y: int, w: int, h: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """One eye per half of the upper face, at a plausible height, else None."""
        roi = grey[y : y + h * 6 // 10, x : x + w]
        found = eye_cc.detectMultiScale(roi, 1.1, 3, minSize=(max(w // 8, 5), max(w // 8, 5)))
        left: tuple[float, np.ndarray] | None = None
        right: tuple[float, np.ndarray] | None = None
        for ex, ey, ew, eh in found:
            centre = np.array([x + ex + ew / 2, y + ey + eh / 2], dtype=np.float64)
            if not 0.2 * h < centre[1] - y < 0.55 * h:
                continue
            size = float(ew * eh)
            if centre[0] < x + w / 2:
                if left is None or size > left[0]:
                    left = (size, centre)
            elif right is None or size > right[0]:
                right = (size, centre)
        if left is None or right is None:
            return None
        if not 0.25 * w < right[1][0] - left[1][0] < 0.7 * w:
            return None
        return left[1], right[1]

    # --- identity (reference selection) -----------------------------------------------------

    def embed(self, items: Sequence[tuple[Frame, Face]]) -> None:
        hog = cv2.HOGDescriptor((64, 64), (16, 16), (8, 8), (8, 8), 9)
        for frame, face in items:
            m = align_matrix(face.kps, arcface_template(112))
            crop = cv2.warpAffine(frame, m, (112, 112), borderValue=0.0)
            grey = cv2.equalizeHist(cv2.cvtColor(cv2.resize(crop, (64, 64)), cv2.COLOR_BGR2GRAY))
            vec = np.asarray(hog.compute(grey), dtype=np.float32).ravel()
            face.embedding = vec / max(float(np.linalg.norm(vec)), 1e-12)

    # --- swap and paste ---------------------------------------------------------------------

    def prepare_source(self, image: Frame, face: Face) -> ClassicSource:
        return ClassicSource(image, face)

    def swap(
        self, items: Sequence[tuple[Frame, Face]], source: object
    ) -> list[ClassicPatch | None]:
        assert isinstance(source, ClassicSource)
        return [self._swap_one(frame, face, source) for frame, face in items]

    def _swap_one(self, frame: Frame, face: Face, source: ClassicSource) -> ClassicPatch | None:
        m = umeyama(source.face.kps, face.kps)[0:2]  # source -> target
        # The region of the target covered by the mapped source face box, plus a margin.
        sx1, sy1, sx2, sy2 = (float(v) for v in source.face.bbox[:4])
        box = np.array([[sx1, sy1, 1], [sx2, sy1, 1], [sx2, sy2, 1], [sx1, sy2, 1]])
        mapped = box @ m.T
        pad = 0.1 * max(np.ptp(mapped[:, 0]), np.ptp(mapped[:, 1]))
        x0 = max(0, math.floor(mapped[:, 0].min() - pad))
        y0 = max(0, math.floor(mapped[:, 1].min() - pad))
        x1 = min(frame.shape[1], math.ceil(mapped[:, 0].max() + pad))
        y1 = min(frame.shape[0], math.ceil(mapped[:, 1].max() + pad))
        if x1 - x0 < 16 or y1 - y0 < 16:
            return None
        shifted = m.copy()
        shifted[:, 2] -= (x0, y0)
        size = (x1 - x0, y1 - y0)
        warped = cv2.warpAffine(source.image, shifted, size, borderMode=cv2.BORDER_REFLECT)
        # Elliptical face mask in source coordinates: eyebrows to chin, cheek to cheek.
        src_mask = np.zeros(source.image.shape[:2], np.uint8)
        cx, cy = (sx1 + sx2) / 2, sy1 + (sy2 - sy1) * 0.55
        axes = (max(1, int((sx2 - sx1) * 0.42)), max(1, int((sy2 - sy1) * 0.5)))
        cv2.ellipse(src_mask, (int(cx), int(cy)), axes, 0, 0, 360, 255, -1)
        hard = cv2.warpAffine(src_mask, shifted, size, flags=cv2.INTER_NEAREST, borderValue=0)
        hard[:2, :] = 0
        hard[-2:, :] = 0
        hard[:, :2] = 0
        hard[:, -2:] = 0
        if int(np.count_nonzero(hard)) < 64:
            return None
        k = max(3, (min(size) // 12) | 1)
        soft = (
            cv2.GaussianBlur(
                cv2.erode(hard, np.ones((k // 2 + 1, k // 2 + 1), np.uint8)), (k, k), 0
            ).astype(np.float32)
            / 255.0
        )
        return ClassicPatch(x0, y0, warped, hard, soft)

    def paste_back(self, frame: Frame, patch: object) -> bool:
        if patch is None:
            return False
        assert isinstance(patch, ClassicPatch)
        h, w = patch.hard_mask.shape
        region = frame[patch.y0 : patch.y0 + h, patch.x0 : patch.x0 + w]
        bx, by, bw, bh = cv2.boundingRect(patch.hard_mask)
        centre = (bx + bw // 2, by + bh // 2)
        try:
            cloned = cv2.seamlessClone(
                patch.warped, region, patch.hard_mask, centre, cv2.NORMAL_CLONE
            )
        except cv2.error:
            return False
        soft = patch.soft_mask[:, :, None]
        region[:] = (cloned * soft + region * (1 - soft)).round().astype(np.uint8)
        return True

    def enhance(self, items: Sequence[tuple[Frame, Face]], blend: int) -> bool:
        """No enhancer without weights; the job's details say so."""
        return False
