"""GFPGAN 1.4 face enhancement as ONNX (catalogue entry gfpgan_1.4), batched over faces.

facefusion's pre/post-processing (ffhq_512 crop, RGB (x/255-0.5)/0.5 in, clip(-1,1) -> (x+1)/2
-> *255 out, box mask paste, `blend` percent of the enhanced frame). Runs on onnxruntime, so the
hot path never imports torch; the alignment is the same least-squares similarity as the
swapper's rather than facefusion's RANSAC fit (identical on five clean points, deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from facefleet.consumer.processors.faceswap.geometry import (
    FFHQ_512,
    Face,
    Frame,
    align_matrix,
    crop_corners_in_frame,
)
from facefleet.consumer.processors.faceswap.paste import box_mask, paste_crop
from facefleet.consumer.processors.faceswap.sessions import batch_capacity, run_in_batches

MODEL_NAME = "gfpgan_1.4"


class Enhancer:
    """All faces of a batch in one call when the export has a symbolic batch dim (our
    convert-gfpgan output, tiny models with batched=True); one call per face when it is fixed at 1
    (facefusion's gfpgan_1.4.onnx), since onnxruntime rejects any other shape."""

    def __init__(self, session: Any) -> None:
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name: str = inp.name
        self.size = int(inp.shape[2])
        self.capacity = batch_capacity(inp.shape[0])
        self.output_names = [session.get_outputs()[0].name]
        self.template = FFHQ_512 * (self.size / 512.0)
        self.mask = box_mask(self.size)

    def _forward(self, blob: np.ndarray) -> np.ndarray:
        chunks = run_in_batches(
            self.session, self.output_names, self.input_name, blob, self.capacity
        )
        return np.concatenate([outs[0] for outs in chunks])

    def enhance(self, items: Sequence[tuple[Frame, Face]], blend: int) -> None:
        """Enhance each (frame, face) in place; blend 0 leaves the frame, 100 is fully enhanced."""
        if not items or blend <= 0:
            return
        crops, matrices = [], []
        for frame, face in items:
            m = align_matrix(face.kps, self.template)
            crops.append(
                cv2.warpAffine(
                    frame,
                    m,
                    (self.size, self.size),
                    borderMode=cv2.BORDER_REPLICATE,
                    flags=cv2.INTER_AREA,
                )
            )
            matrices.append(m)
        blob = np.stack([c[:, :, ::-1] for c in crops]).astype(np.float32) / 255.0
        blob = np.ascontiguousarray(((blob - 0.5) / 0.5).transpose(0, 3, 1, 2))
        preds = self._forward(blob)
        b = blend / 100.0
        for (frame, _), pred, m in zip(items, preds, matrices, strict=True):
            out = (np.clip(pred, -1, 1) + 1) / 2
            enhanced = (out.transpose(1, 2, 0) * 255).round().astype(np.uint8)[:, :, ::-1]
            # Blend only the face's bounding box: the rest of the frame is unchanged anyway.
            corners = crop_corners_in_frame(m, self.size)
            x0 = max(0, int(np.floor(corners[:, 0].min())))
            y0 = max(0, int(np.floor(corners[:, 1].min())))
            x1 = min(frame.shape[1], int(np.ceil(corners[:, 0].max())) + 1)
            y1 = min(frame.shape[0], int(np.ceil(corners[:, 1].max())) + 1)
            if x0 >= x1 or y0 >= y1:
                continue
            region = frame[y0:y1, x0:x1]
            pasted = region.copy()
            shifted = m.copy()
            shifted[:, 2] += m[:, :2] @ np.array([x0, y0], dtype=np.float64)
            paste_crop(pasted, np.ascontiguousarray(enhanced), shifted, self.mask)
            frame[y0:y1, x0:x1] = cv2.addWeighted(region, 1 - b, pasted, b, 0)
