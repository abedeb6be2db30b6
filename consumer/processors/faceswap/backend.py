"""The backend interface both face-swap implementations share, and the insightface backend.

A backend works on batches (lists of frames or of (frame, face) pairs) so the video path can
hand the detector and the enhancer several frames per inference call. Patches returned by
`swap` are opaque to the pipeline and go back to the same backend's `paste_back`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from facefleet.consumer.device import Device
from facefleet.consumer.processors.faceswap import detector, enhancer, recognizer, swapper
from facefleet.consumer.processors.faceswap.geometry import Face, Frame
from facefleet.consumer.processors.faceswap.paste import paste_swapped
from facefleet.consumer.processors.faceswap.sessions import (
    create_session,
    open_model,
    resolve_model_files,
)
from facefleet.settings import WorkerSettings

INSIGHTFACE_QUALITY_NOTE = (
    "insightface: SCRFD detection, ArcFace identity, INSwapper 128 px swap"
    " (+ GFPGAN 1.4 when enhance is on)"
)


class Backend(Protocol):
    name: str
    quality_note: str
    supports_enhance: bool

    def warm_up(self) -> None:
        """Run every model once so the first job pays no lazy initialisation."""

    def detect(self, frames: Sequence[Frame]) -> list[list[Face]]:
        """Faces per frame, in any order."""
        ...

    def embed(self, items: Sequence[tuple[Frame, Face]]) -> None:
        """Set each face's normalised identity embedding."""

    def prepare_source(self, image: Frame, face: Face) -> object:
        """Whatever `swap` needs from the source face (computed once per job)."""
        ...

    def swap(self, items: Sequence[tuple[Frame, Face]], source: object) -> Sequence[object | None]:
        """One patch per (frame, face), None where the face cannot be swapped."""
        ...

    def paste_back(self, frame: Frame, patch: object) -> bool:
        """Blend a patch into its frame in place; False when nothing was pasted."""
        ...

    def enhance(self, items: Sequence[tuple[Frame, Face]], blend: int) -> bool:
        """Enhance faces in place; False when this backend has no enhancer."""
        ...


def _create(path: Path, settings: WorkerSettings) -> Any:
    """One session (through this module's name, so a test can count the sessions made)."""
    return create_session(path, settings)


MODEL_NAMES = (detector.MODEL_NAME, recognizer.MODEL_NAME, swapper.MODEL_NAME, enhancer.MODEL_NAME)


class InsightfaceBackend:
    """SCRFD + ArcFace + INSwapper + GFPGAN on onnxruntime; each piece gets its session here."""

    name = "insightface"
    quality_note = INSIGHTFACE_QUALITY_NOTE
    supports_enhance = True

    def __init__(
        self,
        det: detector.Detector,
        rec: recognizer.Recognizer,
        swap_model: swapper.Swapper,
        enh: enhancer.Enhancer,
    ) -> None:
        self.detector = det
        self.recognizer = rec
        self.swapper = swap_model
        self.enhancer = enh

    @classmethod
    def load(
        cls,
        settings: WorkerSettings,
        catalog_path: Path | None = None,
        device: Device | None = None,
    ) -> InsightfaceBackend:
        """Resolve the four catalogue entries in settings.model_dir and open their sessions
        (settings.instances per model, dynamic batching per settings.dynamic_batch); with a
        device, every model call takes one of its lanes."""
        files = resolve_model_files(settings.model_dir, MODEL_NAMES, catalog_path)
        sessions = {
            name: open_model(
                functools.partial(_create, path, settings),
                instances=settings.instances,
                device=device,
                max_rows=settings.dynamic_batch,
                max_delay_s=settings.batch_delay_ms / 1000.0,
            )
            for name, path in files.items()
        }
        return cls(
            detector.Detector(sessions[detector.MODEL_NAME]),
            recognizer.Recognizer(sessions[recognizer.MODEL_NAME], files[recognizer.MODEL_NAME]),
            swapper.Swapper(sessions[swapper.MODEL_NAME], files[swapper.MODEL_NAME]),
            enhancer.Enhancer(sessions[enhancer.MODEL_NAME]),
        )

    def warm_up(self) -> None:
        frame = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
        self.detector.detect([frame])
        face = Face(
            bbox=np.array([64, 64, 192, 192], np.float32),
            kps=np.array([[100, 110], [156, 110], [128, 140], [104, 170], [152, 170]], np.float32),
            score=1.0,
        )
        self.recognizer.embed([(frame, face)])
        patches = self.swapper.swap([(frame, face)], self.swapper.latent(face))
        paste_swapped(frame, patches[0].crop, patches[0].matrix)
        self.enhancer.enhance([(frame, face)], 100)

    def detect(self, frames: Sequence[Frame]) -> list[list[Face]]:
        return self.detector.detect(frames)

    def embed(self, items: Sequence[tuple[Frame, Face]]) -> None:
        self.recognizer.embed(items)

    def prepare_source(self, image: Frame, face: Face) -> object:
        if face.embedding is None:
            self.recognizer.embed([(image, face)])
        return self.swapper.latent(face)

    def swap(self, items: Sequence[tuple[Frame, Face]], source: object) -> list[object | None]:
        assert isinstance(source, np.ndarray)
        return list(self.swapper.swap(items, source))

    def paste_back(self, frame: Frame, patch: object) -> bool:
        if patch is None:
            return False
        assert isinstance(patch, swapper.SwappedFace)
        return paste_swapped(frame, patch.crop, patch.matrix)

    def enhance(self, items: Sequence[tuple[Frame, Face]], blend: int) -> bool:
        self.enhancer.enhance(items, blend)
        return True
