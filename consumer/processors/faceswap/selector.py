"""Which target faces get swapped: `one` (the largest), `many` (all), or `reference` (every face
whose identity is within `reference_distance` of a reference face).

Distance is facefusion's: (1 - cosine similarity) / 2 of normalised embeddings, in [0, 1]; 0.3 is
its default threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from facefleet.consumer.processors.faceswap.geometry import Face
from facefleet.consumer.processors.faceswap.options import FaceSelector


def by_size(faces: Sequence[Face]) -> list[Face]:
    """Largest first (stable, so equal sizes keep detection order)."""
    return sorted(faces, key=lambda f: -f.area)


def face_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float((1.0 - float(np.dot(a, b))) / 2.0)


def select_faces(
    faces: Sequence[Face],
    selector: FaceSelector,
    reference: np.ndarray | None = None,
    max_distance: float = 0.3,
) -> list[Face]:
    ordered = by_size(faces)
    if selector == "one":
        return ordered[:1]
    if selector == "many":
        return ordered
    if reference is None:
        raise ValueError("reference selection needs a reference embedding")
    return [
        f
        for f in ordered
        if f.embedding is not None and face_distance(f.embedding, reference) < max_distance
    ]
