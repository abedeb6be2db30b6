"""paste_swapped against insightface's own full-frame paste-back (INSwapper.get, paste_back=True),
written out here as the reference: the region-of-interest version must match it up to OpenCV's
fixed-point warp rounding, and leave everything outside the face's neighbourhood untouched."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from facefleet.consumer.processors.faceswap.paste import paste_swapped


def insightface_paste(frame: np.ndarray, crop: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """insightface/model_zoo/inswapper.py, the paste_back branch, on the whole frame."""
    target_img = frame
    bgr_fake = crop
    IM = cv2.invertAffineTransform(matrix)
    img_white = np.full((crop.shape[0], crop.shape[1]), 255, dtype=np.float32)
    bgr_fake = cv2.warpAffine(
        bgr_fake, IM, (target_img.shape[1], target_img.shape[0]), borderValue=0.0
    )
    img_white = cv2.warpAffine(
        img_white, IM, (target_img.shape[1], target_img.shape[0]), borderValue=0.0
    )
    img_white[img_white > 20] = 255
    img_mask = img_white
    mask_h_inds, mask_w_inds = np.where(img_mask == 255)
    mask_h = np.max(mask_h_inds) - np.min(mask_h_inds)
    mask_w = np.max(mask_w_inds) - np.min(mask_w_inds)
    mask_size = int(np.sqrt(mask_h * mask_w))
    k = max(mask_size // 10, 10)
    img_mask = cv2.erode(img_mask, np.ones((k, k), np.uint8), iterations=1)
    k = max(mask_size // 20, 5)
    img_mask = cv2.GaussianBlur(img_mask, (2 * k + 1, 2 * k + 1), 0)
    img_mask = np.reshape(img_mask / 255, [img_mask.shape[0], img_mask.shape[1], 1])
    fake_merged = img_mask * bgr_fake + (1 - img_mask) * target_img.astype(np.float32)
    return np.asarray(fake_merged.astype(np.uint8))


def smooth(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Photo-like content: noise blurred to the smoothness of real pictures. (On raw noise a
    1/32-pixel difference in warp rounding moves a pixel by several levels; on pictures by three
    at most.)"""
    noise = rng.uniform(0, 255, (*shape, 3)).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), 3)
    spread = (blurred - blurred.mean()) * (120 / max(float(blurred.std()), 1e-6)) + 128
    return np.clip(spread, 0, 255).astype(np.uint8)


def similarity(scale: float, angle_deg: float, cx: float, cy: float) -> np.ndarray:
    """The frame-to-crop matrix of a face centred at (cx, cy), `scale` crop pixels per frame
    pixel, turned by `angle_deg`."""
    a = math.radians(angle_deg)
    c, s = scale * math.cos(a), scale * math.sin(a)
    return np.array([[c, -s, 64 - (c * cx - s * cy)], [s, c, 64 - (s * cx + c * cy)]])


@pytest.mark.parametrize(
    ("shape", "matrix"),
    [
        pytest.param((1080, 1920), similarity(128 / 360, 0, 960, 540), id="1080p-centred-face"),
        pytest.param((720, 1280), similarity(128 / 200, 25, 640, 300), id="turned-face"),
        pytest.param((480, 640), similarity(128 / 300, -10, 40, 60), id="face-over-the-corner"),
        pytest.param((400, 400), similarity(128 / 40, 5, 200, 200), id="tiny-face"),
        pytest.param((300, 300), similarity(128 / 900, 0, 150, 150), id="face-larger-than-frame"),
    ],
)
def test_matches_insightface_full_frame_paste(shape: tuple[int, int], matrix: np.ndarray) -> None:
    rng = np.random.default_rng(sum(shape))
    frame, crop = smooth(rng, shape), smooth(rng, (128, 128))
    expected = insightface_paste(frame.copy(), crop, matrix)
    got = frame.copy()
    assert paste_swapped(got, crop, matrix)
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 3, diff.max()
    assert (diff > 0).mean() < 0.01
    # the face changed something
    assert (got != frame).any()
