"""Landmark templates that are facts about the models, shared by the pipeline and the tiny models.

ARCFACE_DST is insightface's 112 px five-point template (left eye, right eye, nose, left and
right mouth corner) that ArcFace and inswapper crops are aligned to (`utils/face_align.py`).
"""

from __future__ import annotations

import numpy as np

ARCFACE_DST = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)
