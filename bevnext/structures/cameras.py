"""Camera geometry: everything needed to move between the pixels of the input images and the key frame.

Frames: cameras are optical frames (x right, y down, z forward); image coordinates are pixels ``(u, v)`` =
(column, row) of the augmented input image; 3D points are in the key frame, the ego frame at the key sample's
CAM_FRONT timestamp (x forward, y left, z up), after the BEV augmentation ``bda``.

A pixel ``(u, v)`` at depth ``d`` of a camera lifts to the BEV-augmented key frame as
``bda @ (R @ K^-1 @ (d * post_rot^-1 @ ([u, v, 1] - post_trans)) + t)`` with ``R, t`` = ``cam2key_rot,
cam2key_trans`` and ``K`` = ``intrinsics``; ``post_rot``'s top-left 2x2 holds the 2D image augmentation and its
third row/column are the identity, ``post_trans[2]`` is 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CameraGeometry", "inverse_3x3"]


def inverse_3x3(m: Tensor) -> Tensor:
    """Inverse of (..., 3, 3) matrices by the adjugate: ``m^-1 = adj(m) / det(m)``.

    The portable choice for the small matrices of camera geometry: it is a handful of elementwise products, so it
    runs unchanged on every backend (CPU, CUDA, Ascend NPU — where ``torch.linalg`` solvers are not all
    available and may fall back to the host), batches over any leading dimensions, keeps the computation on
    the device without a host synchronisation for an error check, and stays differentiable. A singular
    matrix gives inf/nan rather than an error; camera matrices, rotations and image augmentations never are.

    Args:
        m: (..., 3, 3) matrices.

    Returns:
        (..., 3, 3) inverses, dtype and device of ``m``.
    """
    a, b, c = m[..., 0, :], m[..., 1, :], m[..., 2, :]

    def cross(x: Tensor, y: Tensor) -> Tensor:
        return torch.stack(
            (
                x[..., 1] * y[..., 2] - x[..., 2] * y[..., 1],
                x[..., 2] * y[..., 0] - x[..., 0] * y[..., 2],
                x[..., 0] * y[..., 1] - x[..., 1] * y[..., 0],
            ),
            dim=-1,
        )

    # The columns b x c, c x a, a x b satisfy m @ cols = det * I.
    cols = torch.stack((cross(b, c), cross(c, a), cross(a, b)), dim=-1)
    det = (a * cols[..., 0]).sum(dim=-1)
    return cols / det[..., None, None]


@dataclass(frozen=True)
class CameraGeometry:
    """The cameras of B samples: of F frames x N cameras each (a batch), or of N cameras (one frame).

    The leading dimensions ``L`` are ``(B, F, N)`` or ``(B, N)``; frame 0 is the key frame, frame f the key
    frame f steps back in time. The shapes are checked once, here, so the functions that take a
    ``CameraGeometry`` rely on them.

    Attributes:
        cam2key_rot: (*L, 3, 3) camera (optical) -> key-ego rotation R.
        cam2key_trans: (*L, 3) camera -> key-ego translation t (metres).
        intrinsics: (*L, 3, 3) camera matrices K of the original (un-augmented) images.
        post_rot: (*L, 3, 3) 2D image augmentation (original pixels -> augmented pixels), linear part; the third
            row/column are the identity.
        post_trans: (*L, 3) 2D image augmentation, translation part (third entry 0).
        bda: (B, 3, 3) BEV augmentation (rotation, scale, flips) applied to key-frame 3D points; shared by the
            frames and cameras of a sample.
    """

    cam2key_rot: Tensor
    cam2key_trans: Tensor
    intrinsics: Tensor
    post_rot: Tensor
    post_trans: Tensor
    bda: Tensor

    def __post_init__(self) -> None:
        lead = tuple(self.cam2key_rot.shape[:-2])
        if len(lead) not in (2, 3):
            shape = tuple(self.cam2key_rot.shape)
            raise ValueError(f"CameraGeometry: cam2key_rot must be (B, F, N, 3, 3) or (B, N, 3, 3), got {shape}")
        for name, shape in (
            ("cam2key_rot", (*lead, 3, 3)),
            ("cam2key_trans", (*lead, 3)),
            ("intrinsics", (*lead, 3, 3)),
            ("post_rot", (*lead, 3, 3)),
            ("post_trans", (*lead, 3)),
            ("bda", (lead[0], 3, 3)),
        ):
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(f"CameraGeometry: {name} must have shape {shape}, got {actual}")

    @property
    def batch_size(self) -> int:
        return int(self.cam2key_rot.shape[0])

    @property
    def num_cams(self) -> int:
        return int(self.cam2key_rot.shape[-3])

    @property
    def num_frames(self) -> int | None:
        """F for a batch's geometry, None for one frame's."""
        return int(self.cam2key_rot.shape[1]) if self.cam2key_rot.dim() == 5 else None

    @property
    def device(self) -> torch.device:
        return self.cam2key_rot.device

    def frame(self, f: int) -> CameraGeometry:
        """The (B, N) cameras of frame ``f`` (0 = key frame): views ``[:, f]``, no copies; ``bda`` is shared."""
        if self.num_frames is None:
            raise ValueError("CameraGeometry.frame: this geometry is already one frame's (B, N)")
        return CameraGeometry(
            cam2key_rot=self.cam2key_rot[:, f],
            cam2key_trans=self.cam2key_trans[:, f],
            intrinsics=self.intrinsics[:, f],
            post_rot=self.post_rot[:, f],
            post_trans=self.post_trans[:, f],
            bda=self.bda,
        )

    def with_extrinsics(self, other: CameraGeometry) -> CameraGeometry:
        """These cameras with ``other``'s camera -> key-ego transform (``cam2key_rot``, ``cam2key_trans``)."""
        return dataclasses.replace(self, cam2key_rot=other.cam2key_rot, cam2key_trans=other.cam2key_trans)

    def map(self, fn: Callable[[Tensor], Tensor]) -> CameraGeometry:
        """A geometry with ``fn`` applied to every tensor (device moves, dtype casts, pinning)."""
        return CameraGeometry(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self, *args, **kwargs) -> CameraGeometry:
        """``Tensor.to`` on every tensor."""
        return self.map(lambda t: t.to(*args, **kwargs))
