"""Paste-back: put an aligned crop back into its frame under a soft mask, touching only the
face's neighbourhood.

`paste_swapped` is insightface's INSwapper paste-back (warp the crop and a white square back,
threshold >20, erode by max(s//10, 10), Gaussian blur 2*max(s//20, 5)+1, s = sqrt of the mask
extent, float blend, truncate to uint8) computed on a region of interest around the face instead
of the whole frame. The region has a margin wider than the erosion plus the blur, so the result
equals the full-frame computation up to OpenCV's fixed-point warp rounding (on photo-like
content at most three levels on under 1% of the pixels: tests/faceswap/test_paste.py), while
costing face-sized rather than frame-sized work.

`paste_crop` is facefusion's paste (bounding box of the warped crop corners, replicate border,
mask-weighted blend), used by the enhancer; `box_mask` is facefusion's box mask.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from facefleet.consumer.processors.faceswap.geometry import Frame, Matrix, crop_corners_in_frame


def _bounds(
    matrix: Matrix, size: int, frame: Frame, margin: int
) -> tuple[int, int, int, int] | None:
    corners = crop_corners_in_frame(matrix, size)
    x0 = max(0, math.floor(corners[:, 0].min()) - margin)
    y0 = max(0, math.floor(corners[:, 1].min()) - margin)
    x1 = min(frame.shape[1], math.ceil(corners[:, 0].max()) + margin + 1)
    y1 = min(frame.shape[0], math.ceil(corners[:, 1].max()) + margin + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1, y1


def _roi_inverse(matrix: Matrix, x0: int, y0: int) -> np.ndarray:
    inverse = cv2.invertAffineTransform(matrix)
    inverse[0, 2] -= x0
    inverse[1, 2] -= y0
    return inverse


def paste_swapped(frame: Frame, crop: np.ndarray, matrix: Matrix) -> bool:
    """Blend a swapped crop into `frame` in place; False when the face lies outside the frame."""
    size = crop.shape[0]
    corners = crop_corners_in_frame(matrix, size)
    extent = float(np.ptp(corners[:, 0]) * np.ptp(corners[:, 1]))
    upper = int(math.sqrt(max(extent, 1.0)))
    margin = max(upper // 10, 10) + 2 * max(upper // 20, 5) + 4
    bounds = _bounds(matrix, size, frame, margin)
    if bounds is None:
        return False
    x0, y0, x1, y1 = bounds
    w, h = x1 - x0, y1 - y0
    inverse = _roi_inverse(matrix, x0, y0)
    fake = cv2.warpAffine(crop, inverse, (w, h), borderValue=0.0)
    white = np.full((size, size), 255, dtype=np.float32)
    mask = cv2.warpAffine(white, inverse, (w, h), borderValue=0.0)
    mask[mask > 20] = 255
    # The extent of the 255 pixels (np.where's min/max, without its index arrays).
    _, _, span_x, span_y = cv2.boundingRect((mask == 255).view(np.uint8))
    if span_x == 0:
        return False
    mask_size = int(np.sqrt((span_y - 1) * (span_x - 1)))
    k = max(mask_size // 10, 10)
    mask = cv2.erode(mask, np.ones((k, k), np.uint8), iterations=1)
    k = max(mask_size // 20, 5)
    mask = cv2.GaussianBlur(mask, (2 * k + 1, 2 * k + 1), 0)
    alpha = (mask / 255).reshape((h, w, 1))
    region = frame[y0:y1, x0:x1]
    # alpha * fake + (1 - alpha) * region, the same float32 operations in place (bit-identical,
    # fewer frame-sized temporaries), truncated to uint8 as insightface does.
    merged = fake.astype(np.float32)
    merged *= alpha
    rest = region.astype(np.float32)
    rest *= 1 - alpha
    merged += rest
    frame[y0:y1, x0:x1] = merged.astype(np.uint8)
    return True


def box_mask(size: int, blur: float = 0.3) -> np.ndarray:
    """facefusion's box mask: ones, borders zeroed, Gaussian-blurred (blur 0.3 is its default)."""
    blur_amount = int(size * 0.5 * blur)
    blur_area = max(blur_amount // 2, 1)
    mask = np.ones((size, size), np.float32)
    mask[:blur_area, :] = 0
    mask[-blur_area:, :] = 0
    mask[:, :blur_area] = 0
    mask[:, -blur_area:] = 0
    if blur_amount > 0:
        return np.asarray(cv2.GaussianBlur(mask, (0, 0), blur_amount * 0.25), np.float32)
    return mask


def paste_crop(frame: Frame, crop: np.ndarray, matrix: Matrix, mask: np.ndarray) -> None:
    """Blend `crop` (cut from `frame` by `matrix`) back in place under `mask` (size x size, 0-1)."""
    bounds = _bounds(matrix, crop.shape[0], frame, 0)
    if bounds is None:
        return
    x0, y0, x1, y1 = bounds
    w, h = x1 - x0, y1 - y0
    inverse = _roi_inverse(matrix, x0, y0)
    m = cv2.warpAffine(mask, inverse, (w, h)).clip(0, 1)[:, :, None]
    warped = cv2.warpAffine(crop, inverse, (w, h), borderMode=cv2.BORDER_REPLICATE)
    region = frame[y0:y1, x0:x1]
    frame[y0:y1, x0:x1] = (region * (1 - m) + warped * m).astype(frame.dtype)
