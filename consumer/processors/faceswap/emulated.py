"""The `emulated` backend: the face-swap job's real CPU work around model calls that only hold
an emulated device.

Why: the GPU's duty cycle (time it is busy / wall time) is what a pipelined worker improves,
and it must be measurable on a machine without a GPU. Each model call here takes the device
(consumer/device.py, one exclusive lane: a GPU runs one kernel stream at a time) for the time
FACEFLEET_EMULATED_MODEL_MS gives it, optionally growing with the batch, and sleeps, so it uses
no CPU. Everything around the calls is the real thing: the processor decodes and encodes the
photos, the swap cuts each face's aligned crop from the frame and paste-back blends it in (the
insightface backend's own geometry and paste code), and the worker stores the result and emits
the events.

What it cannot show: a real network's memory traffic, host-device copies, kernel launch gaps or
contention between concurrent sessions; the detector always "finds" one face in the middle of
the frame. Results are the target with the face region's colours inverted, so a test can see a
swap happened.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from facefleet.consumer.device import Device
from facefleet.consumer.processors.faceswap.geometry import (
    Face,
    Frame,
    align_matrix,
    arcface_template,
)
from facefleet.consumer.processors.faceswap.paste import paste_swapped
from facefleet.consumer.processors.faceswap.swapper import SwappedFace
from facefleet.models.templates import ARCFACE_DST

QUALITY_NOTE = "emulated: no models; each model call holds an emulated device (measurement only)"
CROP = 128
EMBEDDING = 512


class EmulatedBackend:
    name = "emulated"
    quality_note = QUALITY_NOTE
    supports_enhance = True

    def __init__(self, device: Device, times_ms: dict[str, tuple[float, float]]) -> None:
        self.device = device
        self.times_ms = times_ms
        self.template = arcface_template(CROP)

    def _call(self, model: str, rows: int) -> None:
        base, per_row = self.times_ms.get(model, (0.0, 0.0))
        self.device.occupy((base + per_row * rows) / 1000.0)

    def warm_up(self) -> None:
        return None  # nothing to load; warm-up would only add held time before any job

    def detect(self, frames: Sequence[Frame]) -> list[list[Face]]:
        self._call("detect", len(frames))
        return [[_middle_face(frame)] for frame in frames]

    def embed(self, items: Sequence[tuple[Frame, Face]]) -> None:
        self._call("embed", len(items))
        for frame, face in items:
            face.embedding = _embedding(frame, face)

    def prepare_source(self, image: Frame, face: Face) -> object:
        if face.embedding is None:
            self.embed([(image, face)])
        return face.embedding

    def swap(self, items: Sequence[tuple[Frame, Face]], source: object) -> list[object | None]:
        crops = []
        for frame, face in items:
            m = align_matrix(face.kps, self.template)
            crops.append((cv2.warpAffine(frame, m, (CROP, CROP), borderValue=0.0), m))
        self._call("swap", len(items))
        return [SwappedFace(np.ascontiguousarray(255 - crop), m) for crop, m in crops]

    def paste_back(self, frame: Frame, patch: object) -> bool:
        if patch is None:
            return False
        assert isinstance(patch, SwappedFace)
        return paste_swapped(frame, patch.crop, patch.matrix)

    def enhance(self, items: Sequence[tuple[Frame, Face]], blend: int) -> bool:
        if items and blend > 0:
            self._call("enhance", len(items))
        return True


def _middle_face(frame: Frame) -> Face:
    """A face a third of the frame's height tall, in its middle, with the arcface landmarks."""
    h, w = frame.shape[:2]
    side = max(h, 3) / 3.0
    x0, y0 = (w - side) / 2.0, (h - side) / 2.0
    kps = (ARCFACE_DST / 112.0 * side + np.array([x0, y0])).astype(np.float32)
    bbox = np.array([x0, y0, x0 + side, y0 + side], dtype=np.float32)
    return Face(bbox=bbox, kps=kps, score=0.99)


def _embedding(frame: Frame, face: Face) -> np.ndarray:
    """A unit vector that depends on the face's pixels (the same face gives the same one)."""
    x0, y0, x1, y1 = (int(v) for v in face.bbox)
    patch = cv2.resize(frame[max(y0, 0) : y1, max(x0, 0) : x1], (16, 16)).astype(np.float32)
    vec = np.resize(patch.ravel(), EMBEDDING) - 127.5
    norm = float(np.linalg.norm(vec)) or 1.0
    out: np.ndarray = (vec / norm).astype(np.float32)
    return out
