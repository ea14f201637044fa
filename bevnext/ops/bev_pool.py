"""Lift-splat voxel pooling ("bev_pool"): frustum points weighted by depth probability, summed per BEV voxel.

Two public functions:

* :func:`voxelize_points` turns the frustum points of every (camera, depth bin, pixel) into three flat index
  vectors over the points that fall inside the BEV grid (the rank tables of BEVPoolv2, without sorting).
* :func:`bev_pool` sums ``depth[point] * feat[pixel of point, :]`` into the voxel of each kept point.

Dispatch (DESIGN principle 3): NPU tensors use ``mx_driving.bev_pool_v3`` when it is importable and its
constraints hold; everything else (CPU, CUDA, NPU without a usable fast path, empty rank vectors, or
``BEVNEXT_OPS=reference``) runs the pure-PyTorch reference below. The call into ``bev_pool_v3`` follows its
Python wrapper (mx-driving 26.2.0.post2, ``mx_driving/ops/bev_pool_v3.py``): ``bev_feat_shape`` is
``[B, Z, Y, X, C]``, depth and feat are fp32 and contiguous, the ranks int32; the wrapper returns
(B, C, Z, Y, X) and routes both gradients through the kernel's backward.

The reference never holds all ``points x channels`` products at once. A naive splat gathers one feature row
per point (about 1.5 M points x 160 channels = 1 GB in fp32 for one stage-2 frame) and autograd keeps that
and more for the backward. Here an ``autograd.Function`` walks the points in chunks, reusing one small
buffer per chunk, and recomputes the gathers chunk by chunk in the backward; it saves only its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from bevnext.ops._dispatch import fast_module, warn_once

__all__ = ["bev_pool", "bev_pool_v3_unsupported_reason", "voxelize_points"]

_OP = "bev_pool"
# Elements (points x channels) of one chunk's work buffer: 2 M fp32 = 8 MB, which stays cache-friendly on
# CPUs and still gives accelerators large enough launches. Measured on the stage-2 shape (C=160), chunks of
# 8 k-16 k points were fastest on CPU; much larger chunks fall out of cache, much smaller ones pay per-call
# overhead.
_CHUNK_ELEMENTS = 1 << 21
_INT32_MAX = 2**31 - 1


def voxelize_points(
    points: Tensor,
    grid_lower: Sequence[float],
    grid_interval: Sequence[float],
    grid_size: Sequence[int],
    truncate: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank tables of the frustum points that fall inside the BEV voxel grid.

    The voxel coordinate along each axis is ``(p - lower) / interval`` turned into an integer, and a point is
    kept when all three integer coordinates lie in ``[0, size)``. Kept points stay in their original
    (b, n, d, h, w) order; nothing is sorted (neither the reference nor ``mx_driving.bev_pool_v3`` needs it).

    Args:
        points: (B, N, D, H, W, 3) float point positions (x, y, z) in the BEV (key-ego) frame, one per camera
            n, depth bin d and feature pixel (h, w).
        grid_lower: (3,) lower bound (x, y, z) of the grid in metres.
        grid_interval: (3,) voxel size (x, y, z) in metres.
        grid_size: (3,) number of voxels (X, Y, Z).
        truncate: True reproduces the BEVDet/BEVNeXt reference, which converts with truncation toward zero, so
            a point up to one voxel *below* the lower bound is assigned to voxel 0 (e.g. the effective z range
            of the stage-2 grid is (-13, 3) instead of [-5, 3)). False uses floor, the geometrically correct
            assignment, which drops those points.

    Returns:
        ``(ranks_bev, ranks_depth, ranks_feat)``, each a (P',) integer vector over the P' kept points:

        * ``ranks_bev``: voxel index ``b*(Z*Y*X) + z*(Y*X) + y*X + x``;
        * ``ranks_depth``: flat index of the point in the (B*N*D*H*W,) depth tensor;
        * ``ranks_feat``: flat index of the point's pixel in the (B*N*H*W,) feature pixels.

        The dtype is int32 (what ``mx_driving.bev_pool_v3`` takes; half the memory of int64) on every device,
        unless an index would overflow int32, in which case all three are int64.
    """
    if points.dim() != 6 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (B, N, D, H, W, 3), got {tuple(points.shape)}")
    if not points.is_floating_point():
        raise TypeError(f"points must be a float tensor, got {points.dtype}")
    if len(grid_lower) != 3 or len(grid_interval) != 3 or len(grid_size) != 3:
        raise ValueError("grid_lower, grid_interval and grid_size must each have 3 entries (x, y, z)")
    B, N, D, H, W, _ = points.shape
    size_x, size_y, size_z = (int(s) for s in grid_size)
    device = points.device

    # Compute in the points' own precision (fp32 in the model, as in the reference, so points on a cell boundary
    # land in the same cell). fp16/bf16 are upcast: 0.8 m cells 50 m from the ego need more than 8-11 bits.
    calc_dtype = points.dtype if points.dtype in (torch.float32, torch.float64) else torch.float32
    lower = torch.tensor([float(v) for v in grid_lower], dtype=calc_dtype, device=device)
    interval = torch.tensor([float(v) for v in grid_interval], dtype=calc_dtype, device=device)
    upper = torch.tensor([size_x, size_y, size_z], dtype=calc_dtype, device=device)
    coords = (points.reshape(-1, 3).to(calc_dtype) - lower) / interval  # (P, 3) voxel units

    # Decide in float so that NaN/inf points and huge values never reach an integer conversion:
    # trunc(c) is in [0, size) iff -1 < c < size; floor(c) is in [0, size) iff 0 <= c < size.
    inside_low = coords > -1 if truncate else coords >= 0
    keep = (inside_low & (coords < upper)).all(dim=1)  # (P,)
    ranks_depth = keep.nonzero().squeeze(1)  # int64 flat point index, ascending
    kept = coords.index_select(0, ranks_depth)
    # Float -> int conversion truncates toward zero, so with truncate=True a coordinate in (-1, 0) lands on 0;
    # the masks above already guarantee every converted coordinate is in [0, size).
    voxel = (kept if truncate else kept.floor()).to(torch.int64)

    hw = H * W
    per_batch = N * D * hw
    batch = ranks_depth // per_batch
    camera_and_batch = ranks_depth // (D * hw)  # b*N + n
    ranks_feat = camera_and_batch * hw + ranks_depth % hw
    ranks_bev = ((batch * size_z + voxel[:, 2]) * size_y + voxel[:, 1]) * size_x + voxel[:, 0]

    if max(B * per_batch, B * size_z * size_y * size_x) - 1 <= _INT32_MAX:
        return ranks_bev.to(torch.int32), ranks_depth.to(torch.int32), ranks_feat.to(torch.int32)
    return ranks_bev, ranks_depth, ranks_feat


def bev_pool_v3_unsupported_reason(
    num_channels: int,
    bev_shape: Sequence[int],
    dtype: torch.dtype,
    num_points: int | None = None,
    depth_numel: int | None = None,
    feat_numel: int | None = None,
) -> str | None:
    """Why ``mx_driving.bev_pool_v3`` cannot run this call, or None when its constraints hold.

    Documented (mx_driving docs, forward and backward alike): C a multiple of 8 and at most 360, and
    ``B*Z*Y*X*C <= 2**31``. From the kernel shipped in the wheel: depth, feat and the output are fp32 and the
    ranks int32 (op-info), and the kernel turns ``ranks_feat`` into element offsets ``ranks_feat * C`` in int32,
    so every index, and the feat element count, must fit int32. fp16/bf16 inputs are upcast by
    :func:`bev_pool`; fp64 would silently lose precision, so it is refused.

    Args:
        num_channels: C, the feature channels.
        bev_shape: (B, Z, Y, X) of the output grid.
        dtype: the computation dtype of the inputs.
        num_points: P', the length of the rank vectors, when known.
        depth_numel: B*N*D*H*W, the elements of ``depth`` (the range of ``ranks_depth``), when known.
        feat_numel: B*N*H*W*C, the elements of ``feat``, when known.
    """
    C = int(num_channels)
    if C % 8 != 0:
        return f"C={C} is not a multiple of 8"
    if C > 360:
        return f"C={C} exceeds 360"
    volume = C
    for s in bev_shape:
        volume *= int(s)
    if volume > 2**31:
        return f"B*Z*Y*X*C={volume} exceeds 2**31"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not supported (fp32 kernel)"
    if num_points is not None and num_points > _INT32_MAX:
        return f"{num_points} points exceed int32 ranks"
    if depth_numel is not None and depth_numel - 1 > _INT32_MAX:
        return f"depth has {depth_numel} elements: ranks_depth would overflow int32"
    if feat_numel is not None and feat_numel > 2**31:
        return f"feat has {feat_numel} elements: the kernel's int32 offsets ranks_feat * C would overflow"
    return None


def bev_pool(
    depth: Tensor,
    feat: Tensor,
    ranks_depth: Tensor,
    ranks_feat: Tensor,
    ranks_bev: Tensor,
    bev_shape: tuple[int, int, int, int],
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Splat depth-weighted image features into BEV voxels.

    ``out[b, :, z, y, x] = sum over kept points j in voxel (b, z, y, x) of depth_flat[ranks_depth[j]] *
    feat_flat[ranks_feat[j], :]``, with rank tables as produced by :func:`voxelize_points` (any order; several
    points may share a voxel or a pixel). Differentiable w.r.t. ``depth`` and ``feat``, not the ranks.

    Args:
        depth: (B, N, D, H, W) depth probabilities.
        feat: (B, N, H, W, C) image features, channels last (a permuted view of (B, N, C, H, W) is fine).
        ranks_depth: (P',) int32/int64 flat indices into depth.
        ranks_feat: (P',) int32/int64 flat indices into the B*N*H*W feature pixels.
        ranks_bev: (P',) int32/int64 flat voxel indices ``b*(Z*Y*X) + z*(Y*X) + y*X + x``.
        bev_shape: (B, Z, Y, X) of the output grid.
        chunk_size: points per chunk in the reference; None picks about 2 M elements per chunk
            (``2**21 // C`` points). Only memory and speed depend on it, not the result (beyond float
            summation order).

    Returns:
        (B, C, Z, Y, X) contiguous tensor of dtype ``promote(depth.dtype, feat.dtype)``. The reference
        accumulates fp16/bf16 in fp32; empty rank vectors give zeros (and zero gradients).
    """
    _check_inputs(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_shape)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    B, Z, Y, X = (int(s) for s in bev_shape)
    C = feat.shape[-1]
    out_dtype = torch.promote_types(depth.dtype, feat.dtype)

    # No kernel launch for empty rank vectors (nothing falls in the grid): the reference returns the zeros
    # without a device kernel whose work split is sized by the rank count.
    mx = fast_module(_OP, depth.device.type) if ranks_bev.numel() > 0 else None
    if mx is not None:
        reason = bev_pool_v3_unsupported_reason(
            C, bev_shape, out_dtype, ranks_bev.numel(), depth_numel=depth.numel(), feat_numel=feat.numel()
        )
        if reason is None:
            return _bev_pool_mx(mx, depth, feat, ranks_depth, ranks_feat, ranks_bev, (B, Z, Y, X)).to(out_dtype)
        warn_once(_OP, f"mx_driving.bev_pool_v3 cannot run ({reason}); using the PyTorch reference")
    return _bev_pool_reference(depth, feat, ranks_depth, ranks_feat, ranks_bev, (B, Z, Y, X), chunk_size)


def _bev_pool_reference(
    depth: Tensor,
    feat: Tensor,
    ranks_depth: Tensor,
    ranks_feat: Tensor,
    ranks_bev: Tensor,
    bev_shape: tuple[int, int, int, int],
    chunk_size: int | None = None,
) -> Tensor:
    """The pure-PyTorch splat behind :func:`bev_pool` (same arguments, inputs already validated).

    depth (B, N, D, H, W) and feat (B, N, H, W, C) -> (B, C, Z, Y, X) contiguous in
    ``promote(depth.dtype, feat.dtype)``; fp16/bf16 accumulate in fp32.
    """
    B, Z, Y, X = bev_shape
    C = feat.shape[-1]
    out_dtype = torch.promote_types(depth.dtype, feat.dtype)
    acc_dtype = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(C, 1))
    # Flatten (copies only when the input is non-contiguous: input-sized, never points x channels) and
    # cast to the accumulation dtype; autograd routes the gradients back through these views/casts.
    depth_flat = depth.reshape(-1).to(acc_dtype)
    feat_flat = feat.reshape(-1, C).to(acc_dtype)
    out = _BevPoolReference.apply(
        depth_flat, feat_flat, ranks_depth, ranks_feat, ranks_bev, B * Z * Y * X, chunk_size
    )  # (B*Z*Y*X, C)
    return out.view(B, Z, Y, X, C).permute(0, 4, 1, 2, 3).to(out_dtype).contiguous()


def _check_inputs(
    depth: Tensor, feat: Tensor, ranks_depth: Tensor, ranks_feat: Tensor, ranks_bev: Tensor, bev_shape: Sequence[int]
) -> None:
    if depth.dim() != 5:
        raise ValueError(f"depth must have shape (B, N, D, H, W), got {tuple(depth.shape)}")
    if feat.dim() != 5:
        raise ValueError(f"feat must have shape (B, N, H, W, C), got {tuple(feat.shape)}")
    if depth.shape[:2] != feat.shape[:2] or depth.shape[3:] != feat.shape[2:4]:
        raise ValueError(
            f"depth (B, N, D, H, W)={tuple(depth.shape)} and feat (B, N, H, W, C)={tuple(feat.shape)} disagree"
        )
    if not (depth.is_floating_point() and feat.is_floating_point()):
        raise TypeError(f"depth and feat must be float tensors, got {depth.dtype} and {feat.dtype}")
    if len(bev_shape) != 4:
        raise ValueError(f"bev_shape must be (B, Z, Y, X), got {tuple(bev_shape)}")
    if int(bev_shape[0]) != depth.shape[0]:
        raise ValueError(f"bev_shape batch {bev_shape[0]} differs from the inputs' batch {depth.shape[0]}")
    ranks = (ranks_depth, ranks_feat, ranks_bev)
    for name, r in zip(("ranks_depth", "ranks_feat", "ranks_bev"), ranks):
        if r.dim() != 1 or r.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got {r.dtype} of shape {tuple(r.shape)}")
        if r.device != depth.device:
            raise ValueError(f"{name} is on {r.device}, the inputs on {depth.device}")
    if not ranks_depth.numel() == ranks_feat.numel() == ranks_bev.numel():
        raise ValueError(
            f"rank vectors differ in length: {ranks_depth.numel()}, {ranks_feat.numel()}, {ranks_bev.numel()}"
        )


def _bev_pool_mx(
    mx: ModuleType,
    depth: Tensor,
    feat: Tensor,
    ranks_depth: Tensor,
    ranks_feat: Tensor,
    ranks_bev: Tensor,
    bev_shape: tuple[int, int, int, int],
) -> Tensor:
    """``mx_driving.bev_pool_v3`` (BEVDet-v2 style: int32 ranks, no sorting, no intervals) -> (B, C, Z, Y, X).

    depth (B, N, D, H, W), feat (B, N, H, W, C); the wrapper unpacks ``bev_feat_shape`` as (B, D, H, W, C),
    which is our (B, Z, Y, X, C), and returns the kernel's channels-last grid permuted to (B, C, Z, Y, X).
    """
    B, Z, Y, X = bev_shape
    C = feat.shape[-1]
    # The kernel reads raw fp32 memory (op-info: fp32 only) with int32 ranks; the wrapper passes the tensors
    # through unchanged, so they are made contiguous fp32 / int32 here (no copies when they already are).
    return mx.bev_pool_v3(
        depth.float().contiguous(),
        feat.float().contiguous(),
        ranks_depth.to(torch.int32).contiguous(),
        ranks_feat.to(torch.int32).contiguous(),
        ranks_bev.to(torch.int32).contiguous(),
        [B, Z, Y, X, C],
    )


class _BevPoolReference(torch.autograd.Function):
    """Chunked splat on flat tensors: depth (P,), feat (F, C) -> out (V, C).

    Forward and backward walk the P' kept points in chunks of ``chunk_size``; each chunk gathers its depth
    weights and feature (or gradient) rows into one reused buffer, so the extra memory is
    O(chunk_size * C) regardless of P'. Only the inputs and the rank vectors are saved for the backward.
    """

    @staticmethod
    def forward(
        ctx,
        depth: Tensor,
        feat: Tensor,
        ranks_depth: Tensor,
        ranks_feat: Tensor,
        ranks_bev: Tensor,
        num_voxels: int,
        chunk_size: int,
    ) -> Tensor:
        ctx.save_for_backward(depth, feat, ranks_depth, ranks_feat, ranks_bev)
        ctx.chunk_size = chunk_size
        C = feat.shape[1]
        out = feat.new_zeros(num_voxels, C)
        chunks = _Chunks(ranks_depth.numel(), chunk_size, C, feat)
        for start, n in chunks:
            rows, weights = chunks.rows(n), chunks.weights(n)
            torch.index_select(feat, 0, ranks_feat[start : start + n], out=rows)
            torch.index_select(depth, 0, ranks_depth[start : start + n], out=weights)
            rows.mul_(weights.unsqueeze(1))
            out.index_add_(0, chunks.long_index(ranks_bev, start, n), rows)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        depth, feat, ranks_depth, ranks_feat, ranks_bev = ctx.saved_tensors
        need_depth, need_feat = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_depth = torch.zeros_like(depth) if need_depth else None
        grad_feat = torch.zeros_like(feat) if need_feat else None
        if not (need_depth or need_feat):
            return None, None, None, None, None, None, None
        grad_out = grad_out.contiguous()
        C = feat.shape[1]
        chunks = _Chunks(ranks_depth.numel(), ctx.chunk_size, C, feat, second_buffer=need_depth)
        for start, n in chunks:
            grad_rows, weights = chunks.rows(n), chunks.weights(n)
            idx_feat, idx_depth = ranks_feat[start : start + n], ranks_depth[start : start + n]
            torch.index_select(grad_out, 0, ranks_bev[start : start + n], out=grad_rows)
            if need_depth:
                # d out[bev_j] / d depth_j = feat[feat_j]: the per-point row dot product <grad_out, feat>.
                feat_rows = chunks.rows2(n)
                torch.index_select(feat, 0, idx_feat, out=feat_rows)
                feat_rows.mul_(grad_rows)
                torch.sum(feat_rows, dim=1, out=weights)
                grad_depth.index_add_(0, idx_depth, weights)
            if need_feat:
                # d out[bev_j] / d feat[feat_j] = depth_j: all D depths of a pixel add into one feature row.
                torch.index_select(depth, 0, idx_depth, out=weights)
                grad_rows.mul_(weights.unsqueeze(1))
                grad_feat.index_add_(0, chunks.long_index(ranks_feat, start, n), grad_rows)
        return grad_depth, grad_feat, None, None, None, None, None


class _Chunks:
    """Iterates over (start, length) chunks of the points and owns the reused per-chunk buffers.

    The row-wise ``index_add_`` gets its rank slice copied into a reused int64 buffer: with int32 indices it
    is several times slower on CPU (torch 2.x), while ``index_select`` and 1-D ``index_add_`` are not; converting
    whole rank vectors up front would add P'-sized temporaries, the per-chunk copy costs microseconds.
    """

    def __init__(self, total: int, chunk_size: int, channels: int, like: Tensor, second_buffer: bool = False):
        self.total = total
        self.size = max(1, min(chunk_size, total))
        self._rows = like.new_empty(self.size, channels)
        self._rows2 = like.new_empty(self.size, channels) if second_buffer else None
        self._weights = like.new_empty(self.size)
        self._index = torch.empty(self.size, dtype=torch.int64, device=like.device)

    def __iter__(self):
        for start in range(0, self.total, self.size):
            yield start, min(self.size, self.total - start)

    def rows(self, n: int) -> Tensor:
        return self._rows[:n]

    def rows2(self, n: int) -> Tensor:
        assert self._rows2 is not None
        return self._rows2[:n]

    def weights(self, n: int) -> Tensor:
        return self._weights[:n]

    def long_index(self, ranks: Tensor, start: int, n: int) -> Tensor:
        """``ranks[start:start+n]`` as int64 (a view when already int64, else the reused buffer)."""
        piece = ranks[start : start + n]
        if piece.dtype == torch.int64:
            return piece
        buf = self._index[:n]
        buf.copy_(piece)
        return buf
