"""The typed sample that ``BEVDataset`` returns and ``Collate`` stacks into a ``Batch``.

It mirrors ``bevnext.structures.batch.Batch`` for one key sample, in the same frames (see there and
``bevnext.structures.cameras``), with two differences: the images are still the augmented uint8 RGB
pixels (``Collate`` normalises them straight into the batch tensor), and the cameras are a geometry of
a batch of one, (1, F, N), so that collation only concatenates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bevnext.structures.cameras import CameraGeometry

__all__ = ["Sample"]


@dataclass
class Sample:
    """One key sample with its history frames, augmented, before normalisation.

    Attributes:
        images: (F, N, H, W, 3) uint8 augmented RGB images (frame 0 = key frame).
        cams: the cameras as a geometry of one sample: (1, F, N) leading dimensions, ``bda`` (1, 3, 3).
        gt_depth: (N, H, W) float32 sparse LiDAR depth of the key frame in metres (0 = no point), or None
            (test pipeline).
        gt_boxes: (M, 9) float32 ``[x, y, z, l, w, h, yaw, vx, vy]`` in the BEV-augmented key frame.
        gt_labels: (M,) int64 indices into ``bevnext.structures.CLASSES``.
        meta: ``token``, ``scene_token``, ``timestamp``, ``key_ego2global`` (4x4 nested list), ``frame_tokens``,
            ``sample_index`` (the sample built), and from the dataset ``index`` (asked for), ``epoch``,
            ``replaced`` (tokens passed over).

    Raises:
        ValueError: on construction, when images, cameras, depth and boxes disagree in F, N, (H, W) or M.
    """

    images: torch.Tensor
    cams: CameraGeometry
    gt_boxes: torch.Tensor
    gt_labels: torch.Tensor
    gt_depth: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dim() != 5 or self.images.shape[-1] != 3 or self.images.dtype != torch.uint8:
            raise ValueError(f"Sample: images must be (F, N, H, W, 3) uint8, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        f, n, h, w, _ = self.images.shape
        if (self.cams.batch_size, self.cams.num_frames, self.cams.num_cams) != (1, f, n):
            raise ValueError(f"Sample: cams must be (1, F, N) = {(1, f, n)}, got "
                             f"{tuple(self.cams.cam2key_rot.shape[:-2])}")
        if self.gt_depth is not None and tuple(self.gt_depth.shape) != (n, h, w):
            raise ValueError(f"Sample: gt_depth must be {(n, h, w)}, got {tuple(self.gt_depth.shape)}")
        if self.gt_boxes.dim() != 2 or self.gt_boxes.shape[1] != 9 or self.gt_labels.shape != self.gt_boxes.shape[:1]:
            raise ValueError(f"Sample: gt_boxes (M, 9) and gt_labels (M,) expected, got {tuple(self.gt_boxes.shape)} "
                             f"and {tuple(self.gt_labels.shape)}")
