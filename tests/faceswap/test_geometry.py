"""Alignment equals scikit-image's similarity fit (what insightface's face_align calls)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import SimilarityTransform

from facefleet.consumer.processors.faceswap.geometry import ARCFACE_DST, arcface_template, umeyama


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed-{s}") for s in range(5)])
def test_umeyama_matches_skimage(seed: int) -> None:
    rng = np.random.default_rng(seed)
    src = ARCFACE_DST * rng.uniform(0.5, 4) + rng.uniform(-50, 300, 2) + rng.normal(0, 3, (5, 2))
    dst = arcface_template(128)
    expected = SimilarityTransform.from_estimate(src, dst).params
    np.testing.assert_allclose(umeyama(src, dst), expected, rtol=1e-5, atol=1e-5)


def test_template_sizes() -> None:
    np.testing.assert_allclose(arcface_template(112), ARCFACE_DST)
    np.testing.assert_allclose(arcface_template(128)[:, 0], ARCFACE_DST[:, 0] * 128 / 128 + 8)
    with pytest.raises(ValueError):
        arcface_template(100)
