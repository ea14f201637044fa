"""Lift-splat view transform: image features + depth distribution -> BEV features in the key-ego frame.

Per frame: the depth net predicts depth logits and context features for every camera, the mean-field CRF refines
the depth distribution with the key-frame colours, and every (camera, depth bin, feature pixel) frustum point is
lifted into the BEV-augmented key-ego frame and splatted into its BEV voxel with weight depth-probability x context
(``bevnext.ops.bev_pool``). Temporal alignment happens here, not by warping BEV maps: an earlier frame's cameras
come with their camera -> key-ego transforms, so its frustum lands directly where it belongs in the key frame.

Frames (see ``bevnext.structures.cameras``): cameras are optical (x right, y down, z forward), image coordinates are
pixels ``(u, v)`` of the augmented input image, 3D points are in the key ego frame (x forward, y left, z up) after the
BEV augmentation ``bda``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevnext.config.model import num_depth_bins
from bevnext.errors import ConfigError
from bevnext.models.crf import MeanFieldCRF
from bevnext.models.depth_net import DepthNet, camera_aware_input
from bevnext.ops.bev_pool import bev_pool, voxelize_points
from bevnext.structures.cameras import CameraGeometry, inverse_3x3

__all__ = ["LSSViewTransformer", "lift_frustum", "make_frustum"]


def make_frustum(
    input_size: tuple[int, int],
    downsample: int,
    depth_range: Sequence[float],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Image-space frustum: one ``(u, v, d)`` per depth bin and feature pixel.

    Feature pixel ``(i, j)`` of an ``h x w = (H / downsample) x (W / downsample)`` map sits at ``u =
    linspace(0, W - 1, w)[j]``, ``v = linspace(0, H - 1, h)[i]`` (the reference spreads the feature pixels over the
    full image extent, first and last pixel at the image borders, rather than at patch centres).

    Args:
        input_size: (H, W) of the network input images.
        downsample: feature stride.
        depth_range: (start, stop, step) in metres; ``d = arange(start, stop, step)``.
        dtype: float dtype of the result.
        device: device of the result.

    Returns:
        (D, h, w, 3) with ``[..., 0] = u``, ``[..., 1] = v``, ``[..., 2] = d``.
    """
    H, W = (int(s) for s in input_size)
    h, w = H // downsample, W // downsample
    start, stop, step = (float(v) for v in depth_range)
    depth = torch.arange(num_depth_bins(depth_range), dtype=torch.float64) * step + start
    u = torch.linspace(0, W - 1, w, dtype=torch.float64)
    v = torch.linspace(0, H - 1, h, dtype=torch.float64)
    D = depth.numel()
    frustum = torch.stack(
        (u.view(1, 1, w).expand(D, h, w), v.view(1, h, 1).expand(D, h, w), depth.view(D, 1, 1).expand(D, h, w)),
        dim=-1,
    )
    return frustum.to(dtype=dtype, device=device)


def lift_frustum(frustum: Tensor, cams: CameraGeometry) -> Tensor:
    """Frustum points of every camera in the BEV-augmented key-ego frame.

    For ``(u, v, d)``: undo the image augmentation ``(u', v', d') = post_rot^-1 @ ((u, v, d) - post_trans)``, form the
    camera point ``K^-1 @ (u' d', v' d', d')``, move it to the key ego frame ``R @ . + t`` and apply ``bda``. With
    ``post_rot``'s third row/column the identity and ``post_trans[2] = 0`` (``bevnext.structures.cameras``) this is
    ``bda @ (R @ K^-1 @ (d * post_rot^-1 @ ([u, v, 1] - post_trans)) + t)``.

    Args:
        frustum: (D, h, w, 3) from :func:`make_frustum`.
        cams: one frame's (B, N) cameras.

    Returns:
        (B, N, D, h, w, 3) points (x, y, z) in metres, dtype of ``frustum``.
    """
    if cams.num_frames is not None:
        raise ValueError("lift_frustum: cams must be one frame's (B, N) cameras; use cams.frame(f)")
    if frustum.dim() != 4 or frustum.shape[-1] != 3:
        raise ValueError(f"frustum must have shape (D, h, w, 3), got {tuple(frustum.shape)}")
    # In the frustum's dtype even under autocast: bf16 matrices would move the points by decimetres.
    with torch.autocast(device_type=frustum.device.type, enabled=False):
        return _lift(frustum, cams.to(frustum.dtype))


def _lift(frustum: Tensor, c: CameraGeometry) -> Tensor:
    """``lift_frustum`` with cameras ``c`` in the frustum's dtype, autocast off."""
    B, N = c.batch_size, c.num_cams
    # Undo the image augmentation.
    points = frustum.unsqueeze(0).unsqueeze(0) - c.post_trans.view(B, N, 1, 1, 1, 3)
    points = torch.einsum("bnij,bndhwj->bndhwi", inverse_3x3(c.post_rot), points)
    # Pixel + depth -> camera ray scaled by depth, then one combined matrix camera -> augmented key ego.
    points = torch.cat((points[..., :2] * points[..., 2:3], points[..., 2:3]), dim=-1)
    bda = c.bda.unsqueeze(1)  # (B, 1, 3, 3), shared by the cameras
    combined = bda @ c.cam2key_rot @ inverse_3x3(c.intrinsics)
    offset = (bda @ c.cam2key_trans.unsqueeze(-1)).squeeze(-1)
    return torch.einsum("bnij,bndhwj->bndhwi", combined, points) + offset.view(B, N, 1, 1, 1, 3)


class LSSViewTransformer(nn.Module):
    """BEVNeXt's view transformer: DepthNet + mean-field CRF + lift-splat, plus the depth loss.

    State dict: ``depth_net.*`` and ``crf.ws.0``, as the reference's ``img_view_transformer``.

    Args:
        in_channels: channels of the image features (512).
        context_channels: C, BEV feature channels (80 stage 1, 160 stage 2).
        input_size: (H, W) of the input images (256, 704).
        downsample: feature stride (8); also the CRF's colour patch size.
        grid_lower: (x, y, z) lower corner of the BEV grid in metres.
        grid_interval: (x, y, z) voxel size in metres.
        grid_size: (X, Y, Z) voxels per axis.
        depth_range: (start, stop, step) of the depth bins in metres.
        crf_iters: mean-field iterations (20).
        crf_zeta: colour bandwidth of the CRF kernel (0.001).
        crf_init_weight: initial value of the CRF's learnable message weight (0.015).
        truncate_voxel_index: True reproduces the reference's truncation toward zero of voxel coordinates (points up
            to one voxel below the lower bound land in voxel 0); False floors (geometrically correct).
        use_dcn: deformable 3x3 conv in the context branch (reference) instead of a plain grouped conv.
        with_cp: activation checkpointing of the depth branch.
        depth_loss_weight: weight of the depth BCE (3.0).
        mid_channels: width of the depth net (256).
    """

    def __init__(
        self,
        in_channels: int = 512,
        context_channels: int = 80,
        input_size: tuple[int, int] = (256, 704),
        downsample: int = 8,
        grid_lower: Sequence[float] = (-51.2, -51.2, -5.0),
        grid_interval: Sequence[float] = (0.8, 0.8, 8.0),
        grid_size: Sequence[int] = (128, 128, 1),
        depth_range: Sequence[float] = (1.0, 60.0, 0.5),
        crf_iters: int = 20,
        crf_zeta: float = 0.001,
        crf_init_weight: float = 0.015,
        truncate_voxel_index: bool = True,
        use_dcn: bool = True,
        with_cp: bool = False,
        depth_loss_weight: float = 3.0,
        mid_channels: int = 256,
    ) -> None:
        super().__init__()
        if downsample < 1:
            raise ConfigError(f"downsample must be positive, got {downsample}")
        if len(input_size) != 2 or min(input_size) < 1 or any(s % downsample for s in input_size):
            raise ConfigError(
                f"input_size {tuple(input_size)} must be two positive multiples of downsample={downsample}"
            )
        if len(grid_lower) != 3:
            raise ConfigError(f"grid_lower must have 3 entries (x, y, z), got {list(grid_lower)}")
        if len(grid_interval) != 3 or not all(float(v) > 0 for v in grid_interval):
            raise ConfigError(f"grid_interval must be 3 positive voxel sizes (x, y, z), got {list(grid_interval)}")
        if len(grid_size) != 3 or not all(int(v) == v and v >= 1 for v in grid_size):
            raise ConfigError(f"grid_size must be 3 positive integers (X, Y, Z), got {list(grid_size)}")
        if len(depth_range) != 3:
            raise ConfigError(f"depth_range must be (start, stop, step), got {list(depth_range)}")
        if not (float(depth_range[2]) > 0 and float(depth_range[0]) > 0 and num_depth_bins(depth_range) >= 1):
            raise ConfigError(
                f"depth_range {list(depth_range)} must have start > 0, step > 0 and give at least one bin"
            )
        if depth_loss_weight < 0:
            raise ConfigError(f"depth_loss_weight must be >= 0, got {depth_loss_weight}")
        self.in_channels = in_channels
        self.out_channels = context_channels
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.downsample = downsample
        self.feature_size = (self.input_size[0] // downsample, self.input_size[1] // downsample)
        self.grid_lower = tuple(float(v) for v in grid_lower)
        self.grid_interval = tuple(float(v) for v in grid_interval)
        self.grid_size = tuple(int(v) for v in grid_size)
        self.depth_range = tuple(float(v) for v in depth_range)
        self.D = num_depth_bins(depth_range)
        self.truncate_voxel_index = truncate_voxel_index
        self.depth_loss_weight = float(depth_loss_weight)
        # Definition order = the reference's state-dict order (depth_net.*, then crf.ws.0).
        self.depth_net = DepthNet(in_channels, mid_channels, context_channels, self.D, use_dcn=use_dcn, with_cp=with_cp)
        self.crf = MeanFieldCRF(
            num_iters=crf_iters, zeta=crf_zeta, init_weight=crf_init_weight, patch_size=downsample, depth_bins=self.D
        )
        self.register_buffer("frustum", make_frustum(self.input_size, downsample, self.depth_range), persistent=False)

    @property
    def bev_channels(self) -> int:
        """Channels of the BEV output: C * Z."""
        return self.out_channels * self.grid_size[2]

    def forward(
        self,
        feat: Tensor | None,
        cams: CameraGeometry,
        canvas: Tensor,
        mlp_cams: CameraGeometry | None = None,
        reduced: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One frame of B samples x N cameras to BEV.

        Args:
            feat: (B*N, in_channels, h, w) image features (h, w = input_size / downsample), camera-major within a
                sample (index ``b * N + n``).
            cams: this frame's cameras (B, N); used for lifting and for the depth net's camera-aware input.
            canvas: (B, N, H, W, 3) RGB colour guide for the CRF (uint8 or float 0...255). The reference passes the
                key frame's canvas for every frame.
            mlp_cams: cameras whose EXTRINSICS (``cam2key_rot``, ``cam2key_trans``) replace those of ``cams`` in the
                depth net's camera-aware input (intrinsics and augmentations always come from ``cams``); None =
                ``cams``. The reference builds that input from the KEY frame's extrinsics for every frame (pass the
                key frame's cameras here for earlier frames to reproduce it).
            reduced: ``self.depth_net.reduce(feat)`` when already computed (``feat`` may then be None): the
                image-only part of the depth net, which evaluation reuses across the frames of a scene.

        Returns:
            ``(bev, depth_prob, context)``: (B, C*Z, Y, X) BEV features (channel ``z * C + c``; row y, column x of
            the grid), (B*N, D, h, w) CRF depth probabilities, (B*N, C, h, w) context features.
        """
        B, N = cams.batch_size, cams.num_cams
        h, w = self.feature_size
        if reduced is None and (feat is None or tuple(feat.shape) != (B * N, self.in_channels, h, w)):
            got = None if feat is None else tuple(feat.shape)
            raise ValueError(f"feat must have shape {(B * N, self.in_channels, h, w)}, got {got}")
        if reduced is not None and (reduced.shape[0], *reduced.shape[2:]) != (B * N, h, w):
            raise ValueError(f"reduced must have shape (B*N, C, h, w) with B*N={B * N}, h, w={h, w}, "
                             f"got {tuple(reduced.shape)}")
        if tuple(canvas.shape) != (B, N, *self.input_size, 3):
            raise ValueError(f"canvas must have shape {(B, N, *self.input_size, 3)}, got {tuple(canvas.shape)}")
        mlp_input = camera_aware_input(cams if mlp_cams is None else cams.with_extrinsics(mlp_cams))
        depth_logits, context = self.depth_net(feat, mlp_input.reshape(B * N, -1), reduced=reduced)
        depth_prob = self.crf(depth_logits, canvas.reshape(B * N, *self.input_size, 3))
        bev = self.splat(depth_prob, context, cams)
        return bev, depth_prob, context

    def lift(self, cams: CameraGeometry) -> Tensor:
        """(B, N, D, h, w, 3) frustum points of ``cams`` in the BEV-augmented key-ego frame (:func:`lift_frustum`)."""
        dtype = torch.promote_types(cams.intrinsics.dtype, torch.float32)
        return lift_frustum(self.frustum.to(dtype), cams)

    def splat(self, depth_prob: Tensor, context: Tensor, cams: CameraGeometry) -> Tensor:
        """Lift every frustum point and sum ``depth_prob x context`` into its BEV voxel.

        Args:
            depth_prob: (B*N, D, h, w) depth weights.
            context: (B*N, C, h, w) features.
            cams: the cameras (B, N) that saw ``depth_prob`` / ``context``.

        Returns:
            (B, C*Z, Y, X), channel ``z * C + c``. Differentiable w.r.t. ``depth_prob`` and ``context``.
        """
        B, N = cams.batch_size, cams.num_cams
        D, (h, w) = self.D, self.feature_size
        C = context.shape[1]
        if tuple(depth_prob.shape) != (B * N, D, h, w) or tuple(context.shape) != (B * N, C, h, w):
            raise ValueError(
                f"depth_prob {tuple(depth_prob.shape)} / context {tuple(context.shape)} do not match "
                f"(B*N, D, h, w) = {(B * N, D, h, w)}"
            )
        with torch.no_grad():  # geometry is data: no gradient to the cameras
            points = self.lift(cams)
            ranks_bev, ranks_depth, ranks_feat = voxelize_points(
                points, self.grid_lower, self.grid_interval, self.grid_size, truncate=self.truncate_voxel_index
            )
        X, Y, Z = self.grid_size
        bev = bev_pool(
            depth_prob.reshape(B, N, D, h, w),
            context.reshape(B, N, C, h, w).permute(0, 1, 3, 4, 2),
            ranks_depth,
            ranks_feat,
            ranks_bev,
            (B, Z, Y, X),
        )  # (B, C, Z, Y, X)
        # Fold Z into channels z-major, as the reference's concatenation of the Z slices does.
        return bev.permute(0, 2, 1, 3, 4).reshape(B, Z * C, Y, X)

    def depth_loss(self, gt_depth: Tensor, depth_prob: Tensor) -> Tensor:
        """Binary cross-entropy between the depth distribution and one-hot LiDAR depth bins (key frame).

        Each ``downsample x downsample`` block of ``gt_depth`` gives its minimum non-zero depth (0 = no LiDAR point).
        Its bin is ``trunc((d - (start - step)) / step) - 1``, i.e. bin k covers ``[start + k step, start + (k+1)
        step)``; blocks without a point or with a depth outside ``[start, stop + step)`` (in bins: index outside
        0...D-1) are excluded. Loss = ``depth_loss_weight * sum of BCE over the valid pixels and all D bins /
        max(1, #valid pixels)``, in float32 even under autocast.

        Args:
            gt_depth: (B, N, H, W) sparse depth in metres at input resolution, 0 where there is no point.
            depth_prob: (B*N, D, h, w) predicted probabilities.

        Returns:
            Scalar loss.
        """
        B, N, H, W = gt_depth.shape
        s, D = self.downsample, self.D
        h, w = H // s, W // s
        if H % s or W % s or tuple(depth_prob.shape) != (B * N, D, h, w):
            raise ValueError(
                f"gt_depth {tuple(gt_depth.shape)} and depth_prob {tuple(depth_prob.shape)} do not match "
                f"downsample={s} and D={D}"
            )
        start, _, step = self.depth_range
        with torch.no_grad():
            blocks = gt_depth.reshape(B * N, h, s, w, s).permute(0, 1, 3, 2, 4).reshape(B * N, h, w, s * s).float()
            nearest = torch.where(blocks == 0, torch.full_like(blocks, 1e5), blocks).amin(dim=-1)
            # Class index 1..D <-> bin 0..D-1; class 0 (and anything invalid) means "no depth".
            scaled = (nearest - (start - step)) / step
            cls = torch.where((scaled >= 0) & (scaled < D + 1), scaled, torch.zeros_like(scaled)).long()
            # Masking instead of boolean indexing keeps the loss free of host synchronisation.
            fg = (cls > 0).reshape(-1, 1)
            target = F.one_hot(cls.reshape(-1), num_classes=D + 1)[:, 1:].float()
        pred = depth_prob.permute(0, 2, 3, 1).reshape(-1, D)
        with torch.autocast(device_type=depth_prob.device.type, enabled=False):
            bce = F.binary_cross_entropy(pred.float(), target, reduction="none")
            bce = torch.where(fg, bce, torch.zeros_like(bce)).sum()
            return self.depth_loss_weight * bce / fg.sum().clamp(min=1).float()
