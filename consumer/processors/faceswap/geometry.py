"""Faces and alignment: the Face record both backends fill, the 5-point templates, and the
similarity transform that aligns a face to a template.

The similarity fit is Umeyama's least squares, the same estimator insightface's face_align calls
through scikit-image's deprecated `SimilarityTransform.estimate` (0.26 warns, 2.2 removes it), so
our crops equal insightface's without that dependency.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from facefleet.models.templates import ARCFACE_DST

Frame = np.ndarray
"""HxWx3 uint8 BGR image."""
Matrix = np.ndarray
"""2x3 float affine matrix."""


FFHQ_512 = (
    np.array(
        [
            [0.37691676, 0.46864664],
            [0.62285697, 0.46912813],
            [0.50123859, 0.61331904],
            [0.39308822, 0.72541100],
            [0.61150205, 0.72490465],
        ],
        dtype=np.float32,
    )
    * 512
)
"""GFPGAN's ffhq_512 template (facefusion / facexlib), in pixels of the 512 crop."""


@dataclass
class Face:
    """One detected face in frame coordinates."""

    bbox: np.ndarray
    """x1, y1, x2, y2 (float32)."""
    kps: np.ndarray
    """5x2 float32 landmarks in ARCFACE_DST order."""
    score: float
    embedding: np.ndarray | None = field(default=None, repr=False)
    """Backend-specific identity vector, L2-normalised (set only when needed)."""

    @property
    def area(self) -> float:
        return float((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1]))


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src to dst; 3x3."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    num, dim = src.shape
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_demean = src - src_mean
    dst_demean = dst - dst_mean
    a = dst_demean.T @ src_demean / num
    d = np.ones((dim,), dtype=np.float64)
    if np.linalg.det(a) < 0:
        d[dim - 1] = -1
    t = np.eye(dim + 1, dtype=np.float64)
    u, s, v = np.linalg.svd(a)
    rank = np.linalg.matrix_rank(a)
    if rank == 0:
        return np.full((dim + 1, dim + 1), np.nan)
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(v) > 0:
            t[:dim, :dim] = u @ v
        else:
            s_ = d[dim - 1]
            d[dim - 1] = -1
            t[:dim, :dim] = u @ np.diag(d) @ v
            d[dim - 1] = s_
    else:
        t[:dim, :dim] = u @ np.diag(d) @ v
    scale = 1.0 / src_demean.var(axis=0).sum() * (s @ d)
    t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean.T)
    t[:dim, :dim] *= scale
    return t


def arcface_template(size: int) -> np.ndarray:
    """insightface's estimate_norm template for a crop of `size` (112k: plain, 128k: +8 px x)."""
    if size % 112 == 0:
        ratio, diff_x = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio = size / 128.0
        diff_x = 8.0 * ratio
    else:
        raise ValueError(f"arcface crops are multiples of 112 or 128, not {size}")
    dst = ARCFACE_DST * ratio
    dst[:, 0] += diff_x
    return dst


def align_matrix(kps: np.ndarray, template: np.ndarray) -> Matrix:
    """2x3 matrix taking frame coordinates to crop coordinates."""
    return umeyama(kps, template)[0:2, :]


def crop_corners_in_frame(matrix: Matrix, size: int) -> np.ndarray:
    """The crop's four corners mapped back to the frame (4x2)."""
    inv = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(inv)[0:2]
    corners = np.array([[0, 0, 1], [size, 0, 1], [size, size, 1], [0, size, 1]], dtype=np.float64)
    result: np.ndarray = corners @ inv.T
    return result
