"""INSwapper face swap (catalogue entry inswapper_128), batched over faces.

insightface's INSwapper math (arcface-128 crop, RGB/255 blob, latent = normed source embedding
@ emap then L2-normalised, emap = the graph's last initializer), returning the swapped 128 crop
and its matrix; paste.py puts it back. Inputs are fed by position, as insightface does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facefleet.consumer.processors.faceswap.geometry import (
    Face,
    Frame,
    Matrix,
    align_matrix,
    arcface_template,
)

MODEL_NAME = "inswapper_128"


@dataclass(frozen=True)
class SwappedFace:
    """A swapped crop (size x size BGR uint8) and the matrix that cut it from the frame."""

    crop: np.ndarray
    matrix: Matrix


def load_emap(model_file: Path) -> np.ndarray:
    """The [512, 512] identity projection stored as the graph's last initializer."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_file)).graph
    emap = numpy_helper.to_array(graph.initializer[-1])
    if emap.ndim != 2 or emap.shape[0] != emap.shape[1]:
        raise ValueError(f"{model_file}: last initializer is {emap.shape}, expected a square emap")
    return emap


class Swapper:
    def __init__(self, session: Any, model_file: Path) -> None:
        self.session = session
        inputs = session.get_inputs()
        if len(inputs) != 2 or len(session.get_outputs()) != 1:
            raise ValueError(f"{model_file}: INSwapper has 2 inputs and 1 output")
        self.target_name: str = inputs[0].name
        self.source_name: str = inputs[1].name
        self.output_names = [session.get_outputs()[0].name]
        self.size = int(inputs[0].shape[2])
        self.batchable = not isinstance(inputs[0].shape[0], int) or inputs[0].shape[0] != 1
        self.emap = load_emap(model_file)
        self.template = arcface_template(self.size)

    def latent(self, source: Face) -> np.ndarray:
        """The identity input for a source face (needs its embedding)."""
        if source.embedding is None:
            raise ValueError("source face has no embedding")
        latent = source.embedding.reshape((1, -1)) @ self.emap
        latent /= max(float(np.linalg.norm(latent)), 1e-12)
        return np.ascontiguousarray(latent, dtype=np.float32)

    def swap(self, items: Sequence[tuple[Frame, Face]], latent: np.ndarray) -> list[SwappedFace]:
        if not items:
            return []
        crops, matrices = [], []
        for frame, face in items:
            m = align_matrix(face.kps, self.template)
            crops.append(cv2.warpAffine(frame, m, (self.size, self.size), borderValue=0.0))
            matrices.append(m)
        blob = cv2.dnn.blobFromImages(
            crops, 1.0 / 255.0, (self.size, self.size), (0.0, 0.0, 0.0), swapRB=True
        )
        blob = np.ascontiguousarray(blob, dtype=np.float32)
        if self.batchable:
            lat = np.repeat(latent, len(crops), axis=0)
            preds = self.session.run(
                self.output_names, {self.target_name: blob, self.source_name: lat}
            )[0]
        else:
            preds = np.concatenate(
                [
                    self.session.run(
                        self.output_names,
                        {self.target_name: blob[i : i + 1], self.source_name: latent},
                    )[0]
                    for i in range(len(crops))
                ]
            )
        out = []
        for pred, m in zip(preds, matrices, strict=True):
            bgr = np.clip(255 * pred.transpose((1, 2, 0)), 0, 255).astype(np.uint8)[:, :, ::-1]
            out.append(SwappedFace(np.ascontiguousarray(bgr), m))
        return out
