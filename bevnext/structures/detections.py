"""The detector's output for one sample, as every consumer (evaluation, pictures, export) receives it."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Detections(NamedTuple):
    """Detected boxes of one sample in its key-ego frame (x forward, y left, z up; metres, radians, m/s).

    Attributes:
        boxes: (K, 9) float32 ``[x, y, z, l, w, h, yaw, vx, vy]``, z at the gravity centre (see
            ``bevnext.structures.boxes``).
        scores: (K,) float32 confidences in [0, 1].
        labels: (K,) int64 indices into ``bevnext.structures.CLASSES``.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor


__all__ = ["Detections"]
