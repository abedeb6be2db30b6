"""SCRFD face detection (catalogue entry det_10g), batched over frames.

Same math as insightface 2.1's `SCRFD.detect` at one input size (letterbox into the model size,
RGB (x-127.5)/128, anchors per stride, distance decoding, NMS IoU 0.4 with the +1 area
convention), so detections equal insightface's; a test checks this on the tiny model. We do our
own decoding because insightface runs one frame per call and decodes every anchor before
thresholding, and because the session here is the worker's, with its providers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from facefleet.consumer.processors.faceswap.geometry import Face, Frame
from facefleet.consumer.processors.faceswap.sessions import batch_capacity, run_in_batches

MODEL_NAME = "det_10g"
DEFAULT_INPUT_SIZE = (640, 640)


def _layout(outputs: int) -> tuple[tuple[int, ...], int, bool]:
    """(strides, anchors per location, has keypoints) from the output count."""
    layouts = {
        6: ((8, 16, 32), 2, False),
        9: ((8, 16, 32), 2, True),
        10: ((8, 16, 32, 64, 128), 1, False),
        15: ((8, 16, 32, 64, 128), 1, True),
    }
    if outputs not in layouts:
        raise ValueError(f"SCRFD models have 6, 9, 10 or 15 outputs, this one has {outputs}")
    return layouts[outputs]


def nms(dets: np.ndarray, thresh: float) -> list[int]:
    """Greedy NMS over rows sorted by score, insightface's +1-pixel area convention."""
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


class Detector:
    """Runs one SCRFD session over batches of frames."""

    def __init__(self, session: Any, det_thresh: float = 0.5, nms_thresh: float = 0.4) -> None:
        self.session = session
        self.det_thresh = det_thresh
        self.nms_thresh = nms_thresh
        inp = session.get_inputs()[0]
        self.input_name: str = inp.name
        h, w = inp.shape[2], inp.shape[3]
        fixed = isinstance(h, int) and isinstance(w, int)
        self.input_size: tuple[int, int] = (w, h) if fixed else DEFAULT_INPUT_SIZE
        outs = session.get_outputs()
        self.output_names = [o.name for o in outs]
        self.rank3 = len(outs[0].shape) == 3
        # Only a rank-3 ([batch, rows, C]) export says which rows belong to which frame; the
        # buffalo_l det_10g has rank-2 outputs, so it runs one frame per call.
        self.capacity = batch_capacity(inp.shape[0])
        self.strides, self.anchors, self.use_kps = _layout(len(outs))
        if not self.use_kps:
            raise ValueError("the swapper needs 5 keypoints; this SCRFD model has none")
        self._centers: dict[tuple[int, int, int], np.ndarray] = {}

    def _letterbox(self, frame: Frame) -> tuple[np.ndarray, float]:
        iw, ih = self.input_size
        im_ratio = frame.shape[0] / frame.shape[1]
        if im_ratio > ih / iw:
            new_h = ih
            new_w = int(new_h / im_ratio)
        else:
            new_w = iw
            new_h = int(new_w * im_ratio)
        scale = new_h / frame.shape[0]
        canvas = np.zeros((ih, iw, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(frame, (new_w, new_h))
        return canvas, scale

    def _anchor_centers(self, stride: int) -> np.ndarray:
        iw, ih = self.input_size
        key = (ih // stride, iw // stride, stride)
        centers = self._centers.get(key)
        if centers is None:
            ys, xs = np.mgrid[: key[0], : key[1]]
            grid = np.stack([xs, ys], axis=-1).astype(np.float32)
            centers = (grid * stride).reshape((-1, 2))
            if self.anchors > 1:
                centers = np.stack([centers] * self.anchors, axis=1).reshape((-1, 2))
            self._centers[key] = centers
        return centers

    def _run(self, blob: np.ndarray) -> list[list[np.ndarray]]:
        """Per frame, the outputs as 2-D arrays: one call per batch for a rank-3 export with a
        symbolic batch dim, else one call per frame."""
        if not self.rank3:
            return [
                list(self.session.run(self.output_names, {self.input_name: blob[i : i + 1]}))
                for i in range(blob.shape[0])
            ]
        chunks = run_in_batches(
            self.session, self.output_names, self.input_name, blob, self.capacity
        )
        return [[o[i] for o in outs] for outs in chunks for i in range(len(outs[0]))]

    def detect(self, frames: Sequence[Frame]) -> list[list[Face]]:
        """Faces per frame, sorted by score."""
        if not frames:
            return []
        boxes = [self._letterbox(f) for f in frames]
        blob = cv2.dnn.blobFromImages(
            [b[0] for b in boxes],
            1.0 / 128.0,
            self.input_size,
            (127.5, 127.5, 127.5),
            swapRB=True,
        )
        outputs = self._run(np.ascontiguousarray(blob, dtype=np.float32))
        return [self._decode(outs, scale) for outs, (_, scale) in zip(outputs, boxes, strict=True)]

    def _decode(self, outs: list[np.ndarray], det_scale: float) -> list[Face]:
        fmc = len(self.strides)
        scores_l, boxes_l, kps_l = [], [], []
        for idx, stride in enumerate(self.strides):
            scores = outs[idx]
            pos = np.where(scores >= self.det_thresh)[0]
            if pos.size == 0:
                continue
            centers = self._anchor_centers(stride)[pos]
            dist = outs[idx + fmc][pos] * stride
            box = np.stack(
                [
                    centers[:, 0] - dist[:, 0],
                    centers[:, 1] - dist[:, 1],
                    centers[:, 0] + dist[:, 2],
                    centers[:, 1] + dist[:, 3],
                ],
                axis=-1,
            )
            kd = outs[idx + 2 * fmc][pos] * stride
            kps = np.empty_like(kd)
            kps[:, 0::2] = centers[:, 0:1] + kd[:, 0::2]
            kps[:, 1::2] = centers[:, 1:2] + kd[:, 1::2]
            scores_l.append(scores[pos])
            boxes_l.append(box)
            kps_l.append(kps.reshape((-1, 5, 2)))
        if not scores_l:
            return []
        scores_all = np.vstack(scores_l).ravel()
        order = np.argsort(-scores_all, kind="stable")
        bboxes = np.vstack(boxes_l) / det_scale
        kpss = np.vstack(kps_l) / det_scale
        pre = np.hstack((bboxes, scores_all[:, None])).astype(np.float32, copy=False)[order]
        kpss = kpss[order]
        keep = nms(pre, self.nms_thresh)
        return [
            Face(bbox=pre[i, :4].copy(), kps=kpss[i].astype(np.float32), score=float(pre[i, 4]))
            for i in keep
        ]
