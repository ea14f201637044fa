"""Multi-scale deformable attention (the sampling core of Deformable-DETR / BEVFormer attention).

For every query and head, a handful of points is sampled bilinearly from each level's value map and
the samples are averaged with the given attention weights:

    out[b, q, h] = sum_{l, p} a[b, q, h, l, p] * bilinear(value_l[b, :, h], loc[b, q, h, l, p])

Sampling locations are normalised to the level's map: ``(x, y)`` in [0, 1] with ``x`` along the width
(columns) and ``y`` along the height (rows), where 0 and 1 are the outer *edges* of the map. Pixel
``(i, j)`` has its centre at ``((j + 0.5) / W, (i + 0.5) / H)``, i.e. pixel coordinates are
``loc * (W, H) - 0.5``; samples falling partly or wholly outside the map read zeros there. This is the
convention of mmcv's ``ms_deform_attn`` kernel and of ``F.grid_sample(align_corners=False)``.

Paths (chosen per call, see ``bevnext.ops._dispatch``): on NPU tensors ``mx_driving``'s kernel when
its constraints hold, otherwise (and on CPU / CUDA) the pure-PyTorch reference. The kernel uses the same
location convention (its sampling computes ``loc * (W, H) - 0.5`` and reads zeros outside the map).

What the kernel takes (mx-driving 26.2.0.post2, checked against its Python wrapper
``mx_driving/ops/multi_scale_deformable_attn.py`` and the kernel files shipped in the wheel):

* fp32 only: the op-info lists float32 for value, locations, weights and output, and the wheel ships no
  fp16 kernel binary; the wrapper's ``custom_fwd(cast_inputs=torch.float32)`` casts only under autocast.
  We cast to fp32 ourselves and the result back to ``value``'s dtype.
* The wrapper hands the tensors to the kernel as they are (it only casts ``spatial_shapes`` and
  ``level_start_index`` to int32), and the kernel reads raw memory, so we pass contiguous tensors.
* ``head_dim <= 256`` and ``levels * points <= 64`` (checked by the wrapper's compiled layer);
  ``heads <= 8`` (documented).
* Any head dim: the documentation says a multiple of 8, but the kernel has an unaligned variant (the tiling
  picks it when ``head_dim % 8 != 0``; its binaries ship for Atlas A2 forward and backward, and it copies
  rows with exact byte lengths). BEVNeXt's 10 / 20 channels per head therefore take the kernel, as in
  Ascend's own port; ``TORCH_DEVICE=npu python -m pytest tests/ops`` checks it against the reference.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from bevnext.ops._dispatch import fast_module, warn_once

__all__ = ["msda_fast_path_unsupported", "multi_scale_deformable_attn"]

_OP = "multi_scale_deformable_attn"

# mx_driving.multi_scale_deformable_attn's limits (Atlas A2; see the module docstring for where each comes from).
_MX_MAX_LEVELS_X_POINTS = 64
_MX_MAX_HEADS = 8
_MX_MAX_HEAD_DIM = 256
# Dtypes we hand to the kernel after casting them to fp32; fp64 would silently lose precision.
_MX_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def msda_fast_path_unsupported(
    num_heads: int, head_dim: int, num_levels: int, num_points: int, dtype: torch.dtype
) -> str | None:
    """Why ``mx_driving.multi_scale_deformable_attn`` cannot take these shapes, or None when it can.

    The kernel requires ``num_levels * num_points <= 64``, ``num_heads <= 8`` and ``head_dim <= 256``; it
    computes in fp32, to which fp16/bf16 inputs are cast (fp64 is refused). Head dims that are not a
    multiple of 8 are accepted (see the module docstring).

    Args:
        num_heads: attention heads.
        head_dim: channels per head (``d`` of the value tensor).
        num_levels: feature levels ``L``.
        num_points: sampling points per level and head ``P``.
        dtype: dtype of the value tensor.

    Returns:
        A human-readable reason, or None when the fast path may be used.
    """
    if num_levels * num_points > _MX_MAX_LEVELS_X_POINTS:
        return f"levels*points = {num_levels * num_points} > {_MX_MAX_LEVELS_X_POINTS}"
    if num_heads > _MX_MAX_HEADS:
        return f"heads = {num_heads} > {_MX_MAX_HEADS}"
    if head_dim > _MX_MAX_HEAD_DIM:
        return f"head dim = {head_dim} > {_MX_MAX_HEAD_DIM}"
    if dtype not in _MX_DTYPES:
        return f"dtype {dtype} is not float32/float16/bfloat16"
    return None


def multi_scale_deformable_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention sampling (no projections; those belong to the module).

    Args:
        value: (bs, S, heads, d) values of all levels flattened row-major and concatenated,
            S = sum_l H_l * W_l.
        spatial_shapes: (L, 2) integer tensor, ``[H_l, W_l]`` per level.
        level_start_index: (L,) integer tensor, offset of level l in S (normally the exclusive cumsum
            of H_l * W_l).
        sampling_locations: (bs, Q, heads, L, P, 2) normalised ``(x, y)`` in [0, 1] (see module doc);
            values outside [0, 1] are allowed and read zeros beyond the map.
        attention_weights: (bs, Q, heads, L, P) weights (already normalised by the caller).

    Returns:
        (bs, Q, heads * d), head-major channels (head h occupies channels ``h*d : (h+1)*d``), in
        ``value``'s dtype.
    """
    bs, _, heads, dim = value.shape
    num_levels, num_points = sampling_locations.shape[3], sampling_locations.shape[4]
    fast = fast_module(_OP, value.device.type) if value.numel() > 0 and sampling_locations.numel() > 0 else None
    if fast is not None:
        reason = msda_fast_path_unsupported(heads, dim, num_levels, num_points, value.dtype)
        if reason is None:
            return _msda_mx(fast, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        warn_once(_OP, f"mx_driving kernel not applicable ({reason}); using the PyTorch reference")
    return _msda_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _msda_mx(
    mx_driving: ModuleType,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """``mx_driving.multi_scale_deformable_attn`` on fp32 contiguous copies; (bs, Q, heads * d) in value's dtype.

    Shapes as :func:`multi_scale_deformable_attn`. The casts and ``contiguous`` calls are no-ops for the fp32
    contiguous tensors the model passes; autograd routes the kernel's gradients back through them.
    """
    out = mx_driving.multi_scale_deformable_attn(
        value.float().contiguous(),
        spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        sampling_locations.float().contiguous(),
        attention_weights.float().contiguous(),
    )
    return out.to(value.dtype)


def _msda_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Pure-PyTorch reference: one ``grid_sample`` per level, batched over (batch, head, query, point)."""
    bs, _, heads, dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    out_dtype = value.dtype
    # Sample in at least fp32: the reference model uses mmcv's fp32 wrapper for this op, and half
    # precision locations would be off by up to ~0.05 pixels on an 88-wide map.
    compute_dtype = torch.promote_types(value.dtype, torch.float32)
    if bs * num_queries * heads * dim == 0:
        # Nothing to sample (older torch versions reject empty grids). Keep the result attached to the
        # inputs' graph so that a loss over an empty batch still backpropagates (zero gradients).
        anchor = value.sum() + sampling_locations.sum() + attention_weights.sum()
        return value.new_zeros((bs, num_queries, heads * dim)) + 0 * anchor.to(out_dtype)

    value = value.to(compute_dtype)
    # grid_sample's normalised coordinates: -1 and +1 are the outer edges with align_corners=False,
    # exactly the [0, 1] edge convention of the locations.
    grids = sampling_locations.to(compute_dtype) * 2.0 - 1.0
    # (bs, Q, heads, L, P, 2) -> (bs, heads, L, Q, P, 2) -> per level (bs*heads, Q, P, 2)
    grids = grids.permute(0, 2, 3, 1, 4, 5)
    # Python ints for slicing; one host sync per call, as in every implementation of this op.
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    sampled = []
    for level, ((height, width), start) in enumerate(zip(shapes, starts)):
        # (bs, H*W, heads, d) -> (bs, heads, d, H*W) -> (bs*heads, d, H, W)
        value_l = value[:, start : start + height * width].permute(0, 2, 3, 1)
        value_l = value_l.reshape(bs * heads, dim, height, width)
        grid_l = grids[:, :, level].reshape(bs * heads, num_queries, num_points, 2)
        # -> (bs*heads, d, Q, P)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (bs*heads, d, Q, L*P)
    samples = torch.stack(sampled, dim=3).flatten(3)
    # (bs, Q, heads, L, P) -> (bs, heads, Q, L*P) -> (bs*heads, 1, Q, L*P)
    weights = attention_weights.to(compute_dtype).permute(0, 2, 1, 3, 4)
    weights = weights.reshape(bs * heads, 1, num_queries, num_levels * num_points)
    out = (samples * weights).sum(-1)  # (bs*heads, d, Q)
    out = out.view(bs, heads * dim, num_queries).transpose(1, 2)
    return out.contiguous().to(out_dtype)
