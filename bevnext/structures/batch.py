"""The typed batch that flows from the data pipeline into the model.

Layout (our choice, not the reference's mixed camera-major / frame-major packing): every per-camera
tensor is indexed ``[b, f, n]`` — sample, frame (0 = key frame, 1 = the previous key frame t-1, ...,
F-1 = the oldest), camera (in ``bevnext.structures.sensors.CAMERAS`` order). All 3D quantities are in the
key frame: the ego frame at the key sample's CAM_FRONT timestamp (x forward, y left, z up),
BEV-augmented boxes included. The camera model and its frames are described in
``bevnext.structures.cameras``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bevnext.structures.cameras import CameraGeometry

__all__ = ["Batch"]


@dataclass
class Batch:
    """One batch of B samples, each with F frames of N cameras.

    Attributes:
        images: (B, F, N, 3, H, W) float32, normalised.
        cams: the cameras, (B, F, N) leading dimensions (``cams.frame(f)`` gives one frame's).
        canvas: (B, N, H, W, 3) uint8 un-normalised augmented key-frame RGB images (the CRF's colour guide).
        gt_depth: (B, N, H, W) float32 sparse LiDAR depth in metres (0 = no point), or None at test time.
        gt_boxes: B tensors (M_i, 9) ``[x, y, z, l, w, h, yaw, vx, vy]`` in the BEV-augmented key frame.
        gt_labels: B tensors (M_i,) int64 class indices into ``bevnext.structures.CLASSES``.
        metas: B dicts with at least ``token`` (sample token) and ``key_ego2global`` (4x4 nested list).

    Raises:
        ValueError: on construction, when the images, cameras, canvas and depth disagree in B, F, N or (H, W).
    """

    images: torch.Tensor
    cams: CameraGeometry
    canvas: torch.Tensor
    gt_depth: torch.Tensor | None = None
    gt_boxes: list[torch.Tensor] = field(default_factory=list)
    gt_labels: list[torch.Tensor] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dim() != 6 or self.images.shape[3] != 3:
            raise ValueError(f"Batch: images must be (B, F, N, 3, H, W), got {tuple(self.images.shape)}")
        b, f, n, _, h, w = self.images.shape
        if (self.cams.batch_size, self.cams.num_frames, self.cams.num_cams) != (b, f, n):
            raise ValueError(
                f"Batch: cams have (B, F, N) = {tuple(self.cams.cam2key_rot.shape[:-2])}, images {(b, f, n)}"
            )
        if tuple(self.canvas.shape) != (b, n, h, w, 3):
            raise ValueError(f"Batch: canvas must be {(b, n, h, w, 3)}, got {tuple(self.canvas.shape)}")
        if self.gt_depth is not None and tuple(self.gt_depth.shape) != (b, n, h, w):
            raise ValueError(f"Batch: gt_depth must be {(b, n, h, w)}, got {tuple(self.gt_depth.shape)}")

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_cams(self) -> int:
        return int(self.images.shape[2])

    def cameras(self, frame: int) -> CameraGeometry:
        """The (B, N) cameras of frame ``frame`` (0 = key frame) of every sample: views, no copies."""
        return self.cams.frame(frame)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        changes: dict[str, Any] = {"cams": self.cams.map(fn)}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = fn(value)
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                changes[f.name] = [fn(v) for v in value]
        return dataclasses.replace(self, **changes)

    def to(
        self, device: torch.device | str | None = None, non_blocking: bool = False, *, dtype: torch.dtype | None = None
    ) -> Batch:
        """A copy with every tensor on ``device`` (None: where it is; metas stay on the host) and, given ``dtype``,
        every floating-point tensor in that dtype (images, depth, boxes, cameras; labels and colours keep theirs)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            cast = dtype if dtype is not None and t.is_floating_point() else None
            return t.to(device=device, dtype=cast, non_blocking=non_blocking)

        return self._map(move)

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)`` on custom batch types."""
        return self._map(lambda t: t.pin_memory())
