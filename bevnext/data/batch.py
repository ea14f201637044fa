"""The typed batch that flows from the data pipeline into the model.

Layout (our choice, not the reference's mixed camera-major / frame-major packing): every per-camera
tensor is indexed ``[b, f, n]`` — sample, frame (0 = key frame, 1 = the previous key frame t-1, ...,
F-1 = the oldest), camera (in ``bevnext.data.infos.CAMERAS`` order). All 3D quantities are in the key
frame: the ego frame at the key sample's CAM_FRONT timestamp (x forward, y left, z up), BEV-augmented
boxes included. Cameras are optical frames (x right, y down, z forward); image coordinates are pixels
of the augmented input image, ``(u, v)`` = (column, row).

A pixel ``(u, v)`` at depth ``d`` of camera ``(b, f, n)`` lifts to the BEV-augmented key frame as
``bda @ (R @ K^-1 @ (d * post_rot^-1 @ ([u, v, 1] - post_trans)) + t)`` with ``R, t`` =
``cam2key_rot, cam2key_trans``, ``K`` = ``intrinsics`` (where ``post_rot``'s top-left 2x2 holds the
2D augmentation and its third row/column are the identity; ``post_trans[2]`` is 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class CameraGeometry:
    """The cameras of one frame of B samples x N cameras: everything needed to lift pixels to the key frame.

    A pixel ``(u, v)`` at depth ``d`` of camera ``(b, n)`` lifts to the BEV-augmented key frame as
    ``bda @ (R @ K^-1 @ (d * post_rot^-1 @ ([u, v, 1] - post_trans)) + t)`` with ``R, t`` =
    ``cam2key_rot, cam2key_trans`` and ``K`` = ``intrinsics``.

    Attributes:
        cam2key_rot: (B, N, 3, 3) camera (optical) -> key-ego rotation R.
        cam2key_trans: (B, N, 3) camera -> key-ego translation t (metres).
        intrinsics: (B, N, 3, 3) camera matrices K of the original (un-augmented) images.
        post_rot: (B, N, 3, 3) 2D image augmentation (original pixels -> augmented pixels), linear part; the
            third row/column are the identity.
        post_trans: (B, N, 3) 2D image augmentation, translation part (third entry 0).
        bda: (B, 3, 3) BEV augmentation (rotation, scale, flips) applied to key-frame 3D points; shared by the
            cameras (and by the frames) of a sample.
    """

    cam2key_rot: torch.Tensor
    cam2key_trans: torch.Tensor
    intrinsics: torch.Tensor
    post_rot: torch.Tensor
    post_trans: torch.Tensor
    bda: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The six tensors in field order (the argument order of ``lift_frustum`` / ``project_reference_points``).

        Unlike ``dataclasses.astuple`` this does not copy the tensors.
        """
        return self.cam2key_rot, self.cam2key_trans, self.intrinsics, self.post_rot, self.post_trans, self.bda


@dataclass
class Batch:
    """One batch of B samples, each with F frames of N cameras.

    Attributes:
        images: (B, F, N, 3, H, W) float32, normalised.
        cam2key_rot: (B, F, N, 3, 3) camera -> key-ego rotation.
        cam2key_trans: (B, F, N, 3) camera -> key-ego translation (metres).
        intrinsics: (B, F, N, 3, 3) camera matrices of the original (un-augmented) images.
        post_rot: (B, F, N, 3, 3) 2D image augmentation (original pixels -> augmented pixels), linear part.
        post_trans: (B, F, N, 3) 2D image augmentation, translation part (third entry 0).
        bda: (B, 3, 3) BEV augmentation (rotation, scale, flips) applied to key-frame 3D points.
        canvas: (B, N, H, W, 3) uint8 un-normalised augmented key-frame RGB images (the CRF's colour guide).
        gt_depth: (B, N, H, W) float32 sparse LiDAR depth in metres (0 = no point), or None at test time.
        gt_boxes: B tensors (M_i, 9) ``[x, y, z, l, w, h, yaw, vx, vy]`` in the BEV-augmented key frame.
        gt_labels: B tensors (M_i,) int64 class indices into ``bevnext.structures.CLASSES``.
        metas: B dicts with at least ``token`` (sample token) and ``key_ego2global`` (4x4 nested list).
    """

    images: torch.Tensor
    cam2key_rot: torch.Tensor
    cam2key_trans: torch.Tensor
    intrinsics: torch.Tensor
    post_rot: torch.Tensor
    post_trans: torch.Tensor
    bda: torch.Tensor
    canvas: torch.Tensor
    gt_depth: torch.Tensor | None = None
    gt_boxes: list[torch.Tensor] = field(default_factory=list)
    gt_labels: list[torch.Tensor] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)

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
        """The cameras of frame ``frame`` (0 = key frame) of every sample; ``bda`` is shared by the frames.

        Returns:
            A :class:`CameraGeometry` of (B, N, ...) views ``[:, frame]`` of the per-camera tensors (no copies).
        """
        return CameraGeometry(
            cam2key_rot=self.cam2key_rot[:, frame],
            cam2key_trans=self.cam2key_trans[:, frame],
            intrinsics=self.intrinsics[:, frame],
            post_rot=self.post_rot[:, frame],
            post_trans=self.post_trans[:, frame],
            bda=self.bda,
        )

    def _map(self, fn) -> Batch:
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = fn(value)
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                changes[f.name] = [fn(v) for v in value]
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device`` (metas stay on the host)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)`` on custom batch types."""
        return self._map(lambda t: t.pin_memory())
