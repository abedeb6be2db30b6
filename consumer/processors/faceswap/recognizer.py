"""ArcFace identity embeddings (catalogue entry w600k_r50), batched over faces.

Same preprocessing as insightface's ArcFaceONNX (arcface 112 crop, RGB, (x-mean)/std with the
MXNet-style mean 0 / std 1 when the graph starts with Sub and Mul nodes, else 127.5/127.5).
Embeddings come back L2-normalised: every consumer (the swapper's latent, reference matching)
wants the normed vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facefleet.consumer.processors.faceswap.geometry import (
    Face,
    Frame,
    align_matrix,
    arcface_template,
)
from facefleet.consumer.processors.faceswap.sessions import batch_capacity, run_in_batches

MODEL_NAME = "w600k_r50"


def _normalisation(model_file: Path) -> tuple[float, float]:
    """insightface's rule: an MXNet export normalises inside the graph (Sub and Mul up front)."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    names = [node.name for node in graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


class Recognizer:
    def __init__(self, session: Any, model_file: Path) -> None:
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name: str = inp.name
        self.size = int(inp.shape[2])
        self.capacity = batch_capacity(inp.shape[0])
        self.output_names = [o.name for o in session.get_outputs()]
        self.mean, self.std = _normalisation(model_file)
        self.template = arcface_template(self.size)

    def crop(self, frame: Frame, face: Face) -> np.ndarray:
        m = align_matrix(face.kps, self.template)
        return cv2.warpAffine(frame, m, (self.size, self.size), borderValue=0.0)

    def embed(self, items: Sequence[tuple[Frame, Face]]) -> None:
        """Set `face.embedding` (normalised) for each (frame, face)."""
        if not items:
            return
        crops = [self.crop(frame, face) for frame, face in items]
        blob = cv2.dnn.blobFromImages(
            crops, 1.0 / self.std, (self.size, self.size), (self.mean,) * 3, swapRB=True
        )
        blob = np.ascontiguousarray(blob, dtype=np.float32)
        chunks = run_in_batches(
            self.session, self.output_names, self.input_name, blob, self.capacity
        )
        feats = np.vstack([outs[0] for outs in chunks])
        for (_, face), feat in zip(items, feats, strict=True):
            vec = feat.astype(np.float32).ravel()
            face.embedding = vec / max(float(np.linalg.norm(vec)), 1e-12)
