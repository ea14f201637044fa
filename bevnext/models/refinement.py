"""Perspective refinement: BEV queries look back into the key-frame camera features (reference §2.8).

After the BEV encoder, every BEV cell becomes a query that is refined by one BEVFormer-style decoder
layer: spatial cross-attention (deformable attention around the cell's pillar projected into each
camera) -> LayerNorm -> FFN -> LayerNorm. The result replaces the BEV map that the regression head sees.

Frames: the BEV grid and the pillar reference points live in the BEV-augmented key ego frame (x forward,
y left, z up); cameras are optical frames (x right, y down, z forward); image coordinates are pixels of
the augmented input image, ``(u, v)`` = (column, row). A BEV map is ``(B, C, Y, X)`` and query ``q`` is
cell ``(y, x) = divmod(q, X)``.

Unlike the reference, the spatial cross-attention does not re-batch the visible queries of every camera
with a Python loop over ``nonzero`` (host synchronisations, data-dependent shapes): it attends with every
query in every camera in one batched call and masks the (camera, query) pairs that see nothing. An
invisible pair contributes zero in the reference, so the result is the same (see ``SpatialCrossAttention``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bevnext.config.model import whole_steps
from bevnext.errors import ConfigError
from bevnext.models.blocks import ConvBNReLU
from bevnext.ops import multi_scale_deformable_attn
from bevnext.structures.cameras import CameraGeometry, inverse_3x3

__all__ = [
    "FFN",
    "LearnedPositionalEncoding",
    "MSDeformableAttention",
    "PerspectiveRefinement",
    "SpatialCrossAttention",
    "SpatialDecoder",
    "SpatialDecoderLayer",
    "make_depth_embedding",
    "pillar_centres",
    "project_reference_points",
]

# Depth clamp of the perspective divide and margin of the "inside the image" test (reference values).
_EPS = 1e-5
# The reference initialises the sampling-offset bias for 4 height anchors (its module default) although
# it is then used with 8: point p starts at (p // 4 + 1) times the head's direction.
_OFFSET_INIT_ANCHORS = 4


def make_depth_embedding(depth_bins: int, channels: int) -> nn.Sequential:
    """The reference's ``depth_emb``: embeds the (detached) depth distribution into the context features.

    ``Conv1x1(D -> D, bias) -> BN -> ReLU -> Conv1x1(D -> C, bias)``; state-dict keys ``0.*``, ``1.*``, ``3.*``.

    Args:
        depth_bins: D, number of depth bins of the depth distribution (118 in the reference).
        channels: C, the context / refinement width (80 stage 1, 160 stage 2).

    Returns:
        A module mapping (B*N, D, h, w) depth probabilities to (B*N, C, h, w).
    """
    if depth_bins < 1:
        raise ConfigError(f"depth_bins must be >= 1, got {depth_bins}")
    if channels < 1:
        raise ConfigError(f"channels must be >= 1, got {channels}")
    return nn.Sequential(*ConvBNReLU(depth_bins, depth_bins, 1, bias=True), nn.Conv2d(depth_bins, channels, 1))


def pillar_centres(
    bev_shape: tuple[int, int],
    grid_lower: tuple[float, float],
    grid_interval: tuple[float, float],
    heights: Sequence[float],
    device: torch.device | None = None,
) -> Tensor:
    """3D reference points: the centre of every BEV cell at each pillar height.

    Args:
        bev_shape: (Y, X) cells.
        grid_lower: (x, y) lower edge of the grid in metres (key ego frame).
        grid_interval: (x, y) cell size in metres.
        heights: Z heights (metres) of the reference points of each pillar.
        device: where to build them.

    Returns:
        (Y, X, Z, 3) float32 ``(x, y, z)`` in the (BEV-augmented) key ego frame; cell ``(iy, ix)`` has
        ``x = grid_lower[0] + (ix + 0.5) * grid_interval[0]`` and likewise ``y``.
    """
    num_y, num_x = bev_shape
    xs = grid_lower[0] + (torch.arange(num_x, dtype=torch.float64, device=device) + 0.5) * grid_interval[0]
    ys = grid_lower[1] + (torch.arange(num_y, dtype=torch.float64, device=device) + 0.5) * grid_interval[1]
    zs = torch.as_tensor(list(heights), dtype=torch.float64, device=device)
    grid_y, grid_x, grid_z = torch.meshgrid(ys, xs, zs, indexing="ij")
    return torch.stack((grid_x, grid_y, grid_z), dim=-1).float()


def _matvec(mat: Tensor, vec: Tensor) -> Tensor:
    """``mat @ vec`` over the last dims as multiply-and-sum, so autocast cannot lower it to half precision."""
    return (mat * vec.unsqueeze(-2)).sum(-1)


def project_reference_points(
    points: Tensor, cams: CameraGeometry, image_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Project BEV-augmented key-frame points into every (augmented) camera image, as the reference does.

    Undo the BEV augmentation (``bda^-1``), subtract the camera position, rotate and project with
    ``(R @ K^-1)^-1`` (= ``K @ R^T`` for a rotation), divide by the depth clamped at 1e-5, apply the image
    augmentation (``post_rot @ (u, v, d) + post_trans``), normalise ``u`` by the image width and ``v`` by its
    height. A point is valid when its depth is > 1e-5 and ``1e-5 < u, v < 1 - 1e-5``. Computed in fp32.

    Args:
        points: (..., 3) ``(x, y, z)`` in the BEV-augmented key ego frame (no batch dimension).
        cams: one frame's (B, N) cameras.
        image_size: (H, W) of the augmented input image in pixels.

    Returns:
        ``uv`` (B, N, ..., 2) normalised ``(u / W, v / H)`` and ``valid`` (B, N, ...) bool.
    """
    if cams.num_frames is not None:
        raise ValueError("project_reference_points: cams must be one frame's (B, N) cameras; use cams.frame(f)")
    # fp32 even under autocast: a bf16 camera matrix would move the projections by pixels.
    with torch.autocast(device_type=points.device.type, enabled=False):
        return _project(points, cams.to(torch.float32), image_size)


def _project(points: Tensor, c: CameraGeometry, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``project_reference_points`` with fp32 cameras ``c``, autocast off."""
    batch, num_cams = c.batch_size, c.num_cams
    point_dims = points.shape[:-1]
    world_to_pixel = inverse_3x3(c.cam2key_rot @ inverse_3x3(c.intrinsics))  # (B, N, 3, 3)
    extra = (1,) * len(point_dims)
    pts = points.to(torch.float32).reshape(1, 1, *point_dims, 3)
    pts = _matvec(inverse_3x3(c.bda).view(batch, 1, *extra, 3, 3), pts)  # (B, 1, ..., 3)
    pts = pts - c.cam2key_trans.view(batch, num_cams, *extra, 3)
    cam = _matvec(world_to_pixel.view(batch, num_cams, *extra, 3, 3), pts)  # (d*u, d*v, d)
    depth = cam[..., 2:3]
    cam = torch.cat((cam[..., :2] / depth.clamp(min=_EPS), depth), dim=-1)
    cam = _matvec(c.post_rot.view(batch, num_cams, *extra, 3, 3), cam)
    cam = cam + c.post_trans.view(batch, num_cams, *extra, 3)
    height, width = image_size
    uv = cam[..., :2] / cam.new_tensor([float(width), float(height)])
    valid = (cam[..., 2] > _EPS) & (uv > _EPS).all(-1) & (uv < 1.0 - _EPS).all(-1)
    return uv, valid


class LearnedPositionalEncoding(nn.Module):
    """Learned BEV positional encoding: ``pos(y, x) = concat(col_embed[x], row_embed[y])``.

    Args:
        num_feats: channels of each half (C / 2).
        row_num_embed: number of rows Y it can encode.
        col_num_embed: number of columns X it can encode.
    """

    def __init__(self, num_feats: int, row_num_embed: int, col_num_embed: int) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(row_num_embed, num_feats)
        self.col_embed = nn.Embedding(col_num_embed, num_feats)

    def forward(self, height: int, width: int) -> Tensor:
        """Encodings of a (height, width) grid, row-major.

        Returns:
            (height * width, 2 * num_feats); row ``y * width + x`` is ``concat(col_embed[x], row_embed[y])``.
        """
        cols = self.col_embed.weight[:width]  # (X, F)
        rows = self.row_embed.weight[:height]  # (Y, F)
        pos = torch.cat(
            (cols.unsqueeze(0).expand(height, -1, -1), rows.unsqueeze(1).expand(-1, width, -1)),
            dim=-1,
        )
        return pos.reshape(height * width, -1)


class MSDeformableAttention(nn.Module):
    """Deformable attention of BEV queries into camera feature maps (no output projection; see SCA).

    Each head samples ``num_points`` points per level around the query's reference points and averages
    them with softmax weights (softmax over the level*point samples of the head). Point ``p`` belongs to
    height anchor ``p % Z`` (Z = number of reference points per query, which must divide ``num_points``):
    its location is that anchor's projected reference point plus a learned offset given in feature-map
    pixels (divided by the level's (w, h)).

    Args:
        embed_dims: C.
        num_heads: attention heads (C must be divisible by it).
        num_levels: feature levels.
        num_points: sampling points per head and level.
    """

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        if num_heads < 1 or embed_dims % num_heads != 0:
            raise ConfigError(f"embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})")
        if num_levels < 1:
            raise ConfigError(f"num_levels must be >= 1, got {num_levels}")
        if num_points < 1:
            raise ConfigError(f"num_points must be >= 1, got {num_points}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Reference init: zero offset weights, offset bias = per-head direction scaled 1 or 2, zero attention."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float64) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack((thetas.cos(), thetas.sin()), dim=-1)
        # Scaled so that the larger component is +-1 (a point on the unit square, not the circle).
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(self.num_points, dtype=torch.float64) // _OFFSET_INIT_ANCHORS + 1  # (P,)
        bias = directions[:, None, None, :] * scale[None, None, :, None]  # (heads, 1, P, 2)
        bias = bias.expand(self.num_heads, self.num_levels, self.num_points, 2)
        self.sampling_offsets.bias.copy_(bias.reshape(-1).to(self.sampling_offsets.bias.dtype))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)

    def project_value(self, value: Tensor) -> Tensor:
        """Value projection, split out so that chunked callers project the (large) value map once.

        Args:
            value: (..., S, C).

        Returns:
            (..., S, heads, C / heads).
        """
        return self.value_proj(value).unflatten(-1, (self.num_heads, -1))

    def forward(
        self,
        query: Tensor,
        value: Tensor,
        reference_points: Tensor,
        level_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        """Attend with every query in every camera.

        Args:
            query: (B, Q, C) queries (positional encoding already added); the same queries for all cameras.
            value: (B, N, S, heads, C / heads) projected values (``project_value``) of all levels flattened
                row-major and concatenated, S = sum of h_l * w_l.
            reference_points: (B, N, Q, Z, 2) normalised ``(u, v)`` in [0, 1] of the Z anchors per camera.
            level_shapes: L pairs (h_l, w_l).

        Returns:
            (B, N, Q, C), head-major channels. Nothing is masked here.
        """
        batch, num_queries, _ = query.shape
        num_cams = value.shape[1]
        num_anchors = reference_points.shape[3]
        if self.num_points % num_anchors != 0:
            raise ValueError(
                f"num_points ({self.num_points}) must be a multiple of the anchors per query ({num_anchors})"
            )
        if len(level_shapes) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(level_shapes)}")
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        # Offsets and weights depend only on the query, so they are computed once for all cameras.
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        normaliser = query.new_tensor([[float(w), float(h)] for h, w in level_shapes], dtype=torch.float32)
        offsets = offsets / normaliser[:, None, :]  # per level (w, h)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        # Point p = i * Z + j belongs to anchor j (the reference views the P points as (P / Z, Z)).
        anchors = reference_points.repeat(1, 1, 1, points // num_anchors, 1)  # (B, N, Q, P, 2)
        locations = anchors[:, :, :, None, None] + offsets[:, None]  # (B, N, Q, heads, L, P, 2)
        weights = weights[:, None].expand(batch, num_cams, num_queries, heads, levels, points)
        shapes = torch.as_tensor(list(level_shapes), dtype=torch.long, device=query.device)
        starts = torch.cumsum(shapes.prod(1), 0) - shapes.prod(1)
        out = multi_scale_deformable_attn(
            value.flatten(0, 1),
            shapes,
            starts,
            locations.flatten(0, 1),
            weights.reshape(batch * num_cams, num_queries, heads, levels, points),
        )
        return out.view(batch, num_cams, num_queries, self.embed_dims)


class SpatialCrossAttention(nn.Module):
    """BEVFormer spatial cross-attention, batched over cameras without re-batching.

    For every camera, a query that has at least one valid height attends into that camera
    (``MSDeformableAttention``); the results are summed over the cameras that see the query and divided
    by their number (at least 1), projected by ``output_proj`` and added to the query (the residual is the
    query *without* the positional encoding).

    The reference gathers, per camera, the visible queries (``nonzero``) into a padded batch and scatters
    the results back. Here every (camera, query) pair is computed in one call and the pairs that see
    nothing are masked out: the same result without host synchronisation or data-dependent shapes, at
    the cost of computing the masked pairs too (about N / (average cameras per query) times the work).
    (The sampling op itself reads its level shapes on the host once per call, as every implementation does.)

    Memory with the pure-PyTorch sampling path (the CPU and CUDA path; on NPU the mx_driving kernel),
    measured on CPU at the stage-2 shape (B=1, N=6, Q=16384, C=160, 8 heads,
    8 points, one 32x88 level): the per-point samples alone are B*N*Q*C*P*4 bytes = 0.5 GB; the peak of one
    forward is about 1.7 GB, 1.8 GB with backward. ``query_chunk=4096`` lowers it to about 0.5 GB (no grad)
    / 1.1 GB (forward + backward) for 15-20 % more time on CPU. Memory scales linearly with B.

    Args:
        embed_dims: C.
        num_heads: attention heads.
        num_levels: feature levels.
        num_points: sampling points per head and level.
        query_chunk: if set, queries are processed in chunks of this size to bound the peak memory of the
            sampling step (the result does not depend on it).
    """

    def __init__(
        self, embed_dims: int, num_heads: int, num_levels: int, num_points: int, query_chunk: int | None = None
    ) -> None:
        super().__init__()
        if query_chunk is not None and query_chunk < 1:
            raise ConfigError(f"query_chunk must be >= 1 or None, got {query_chunk}")
        self.query_chunk = query_chunk
        self.deformable_attention = MSDeformableAttention(embed_dims, num_heads, num_levels, num_points)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        value: Tensor,
        level_shapes: Sequence[tuple[int, int]],
        reference_points: Tensor,
        valid: Tensor,
    ) -> Tensor:
        """Cross-attend from BEV queries into the camera features.

        Args:
            query: (B, Q, C) BEV queries (also the residual).
            query_pos: (B or 1, Q, C) positional encoding, added to the query for offsets and weights.
            value: (B, N, S, C) camera features of all levels, flattened row-major and concatenated.
            level_shapes: L pairs (h_l, w_l) describing ``value``.
            reference_points: (B, N, Q, Z, 2) normalised projected reference points.
            valid: (B, N, Q, Z) bool, which projections land in the image in front of the camera.

        Returns:
            (B, Q, C).
        """
        attn = self.deformable_attention
        projected = attn.project_value(value)  # (B, N, S, heads, d)
        pos_query = query + query_pos
        seen = valid.any(-1)  # (B, N, Q): the camera sees the query at >= 1 height
        num_queries = query.shape[1]
        chunk = num_queries if self.query_chunk is None else self.query_chunk
        slots = []
        for start in range(0, num_queries, chunk):
            stop = min(start + chunk, num_queries)
            out = attn(pos_query[:, start:stop], projected, reference_points[:, :, start:stop], level_shapes)
            # where (not multiply) so that an unseen pair contributes exactly 0, whatever it sampled.
            out = torch.where(seen[:, :, start:stop, None], out, out.new_zeros(()))
            slots.append(out.sum(1))  # (B, q, C)
        slot = torch.cat(slots, dim=1) if len(slots) > 1 else slots[0]
        count = seen.sum(1).clamp(min=1).to(slot.dtype)  # (B, Q) cameras that see each query
        return self.output_proj(slot / count[..., None]) + query


class FFN(nn.Module):
    """Feed-forward block with its own identity add: ``x + Linear(ReLU(Linear(x)))``.

    Args:
        embed_dims: C.
        feedforward_channels: hidden width (4C in the reference).
    """

    def __init__(self, embed_dims: int, feedforward_channels: int) -> None:
        super().__init__()
        # Nesting as in the reference state dict: layers.0.0 (first Linear), layers.1 (second Linear).
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True)),
            nn.Linear(feedforward_channels, embed_dims),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(..., C) -> (..., C)."""
        return x + self.layers(x)


class SpatialDecoderLayer(nn.Module):
    """One post-norm decoder layer: cross_attn -> LayerNorm -> FFN -> LayerNorm.

    Args:
        embed_dims: C.
        num_heads: attention heads.
        num_levels: feature levels.
        num_points: sampling points per head and level.
        feedforward_channels: FFN hidden width.
        query_chunk: see ``SpatialCrossAttention``.
    """

    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        feedforward_channels: int,
        query_chunk: int | None = None,
    ) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(
            [SpatialCrossAttention(embed_dims, num_heads, num_levels, num_points, query_chunk=query_chunk)]
        )
        self.ffns = nn.ModuleList([FFN(embed_dims, feedforward_channels)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims), nn.LayerNorm(embed_dims)])

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        value: Tensor,
        level_shapes: Sequence[tuple[int, int]],
        reference_points: Tensor,
        valid: Tensor,
    ) -> Tensor:
        """Arguments as ``SpatialCrossAttention.forward``; returns (B, Q, C)."""
        query = self.attentions[0](query, query_pos, value, level_shapes, reference_points, valid)
        query = self.norms[0](query)
        query = self.ffns[0](query)
        return self.norms[1](query)


class SpatialDecoder(nn.Module):
    """A stack of ``SpatialDecoderLayer`` (one in the reference); all layers use the same reference points.

    Args:
        layers: the decoder layers.
    """

    def __init__(self, layers: Sequence[SpatialDecoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        value: Tensor,
        level_shapes: Sequence[tuple[int, int]],
        reference_points: Tensor,
        valid: Tensor,
    ) -> Tensor:
        """Arguments as ``SpatialCrossAttention.forward``; returns (B, Q, C)."""
        for layer in self.layers:
            query = layer(query, query_pos, value, level_shapes, reference_points, valid)
        return query


class PerspectiveRefinement(nn.Module):
    """The reference's ``transformer_neck``: refines the BEV map with the key-frame camera features.

    BEV queries = learned ``bev_embedding`` + ``shared_conv(bev_x)`` (3x3 conv without bias, BN, ReLU);
    positional encoding = learned row/column embeddings; each query's pillar (the cell centre at the
    heights of ``pillar_z``) is projected into every key-frame camera and the decoder layer(s) refine the
    queries. ``init_weights`` (run by the constructor) re-initialises every >= 2-D parameter Xavier-uniform
    and then re-applies the deformable-attention init, as the reference does.

    Args:
        embed_dims: C (80 stage 1, 160 stage 2); must be even and divisible by ``num_heads``.
        in_channels: channels of the BEV encoder output ``bev_x`` (256).
        bev_shape: (Y, X) BEV cells.
        grid_lower: (x, y) lower edge of the BEV grid in metres.
        grid_interval: (x, y) cell size in metres.
        pillar_z: (lower, upper, step) in metres; the reference heights are the centres
            ``lower + (k + 0.5) * step`` below ``upper`` (-4.5 ... 2.5 for (-5, 3, 1)).
        num_heads: attention heads.
        num_points: sampling points per head and level; a multiple of the number of heights.
        num_levels: camera feature levels.
        ffn_ratio: FFN hidden width = ``ffn_ratio * embed_dims``.
        image_size: (H, W) of the augmented input images in pixels (normalises the projections).
        num_layers: decoder layers (1 in the reference).
        query_chunk: process the cross-attention in chunks of this many queries (memory bound; same result).
    """

    def __init__(
        self,
        embed_dims: int,
        in_channels: int = 256,
        bev_shape: tuple[int, int] = (128, 128),
        grid_lower: tuple[float, float] = (-51.2, -51.2),
        grid_interval: tuple[float, float] = (0.8, 0.8),
        pillar_z: tuple[float, float, float] = (-5.0, 3.0, 1.0),
        num_heads: int = 8,
        num_points: int = 8,
        num_levels: int = 1,
        ffn_ratio: int = 4,
        image_size: tuple[int, int] = (256, 704),
        num_layers: int = 1,
        query_chunk: int | None = None,
    ) -> None:
        super().__init__()
        if embed_dims < 2 or embed_dims % 2 != 0:
            raise ConfigError(f"embed_dims must be a positive even number (row/col halves), got {embed_dims}")
        if num_heads < 1 or embed_dims % num_heads != 0:
            raise ConfigError(f"embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})")
        if in_channels < 1:
            raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
        if len(bev_shape) != 2 or min(bev_shape) < 1:
            raise ConfigError(f"bev_shape must be two positive sizes (Y, X), got {bev_shape}")
        if len(grid_interval) != 2 or min(grid_interval) <= 0:
            raise ConfigError(f"grid_interval must be two positive sizes (x, y), got {grid_interval}")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ConfigError(f"image_size must be two positive sizes (H, W), got {image_size}")
        if ffn_ratio < 1:
            raise ConfigError(f"ffn_ratio must be >= 1, got {ffn_ratio}")
        if num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
        z_lower, z_upper, z_step = pillar_z
        num_heights = whole_steps(z_lower, z_upper, z_step, "pillar_z")
        if num_points < 1 or num_points % num_heights != 0:
            raise ConfigError(
                f"num_points ({num_points}) must be a positive multiple of the pillar heights ({num_heights})"
            )
        self.embed_dims = embed_dims
        self.in_channels = in_channels
        self.bev_shape = (int(bev_shape[0]), int(bev_shape[1]))
        self.grid_lower = (float(grid_lower[0]), float(grid_lower[1]))
        self.grid_interval = (float(grid_interval[0]), float(grid_interval[1]))
        self.heights = tuple(z_lower + (k + 0.5) * z_step for k in range(num_heights))
        self.num_levels = num_levels
        self.image_size = (int(image_size[0]), int(image_size[1]))

        # Registration order = the reference state-dict order.
        self.decoder = SpatialDecoder(
            [
                SpatialDecoderLayer(
                    embed_dims, num_heads, num_levels, num_points, ffn_ratio * embed_dims, query_chunk=query_chunk
                )
                for _ in range(num_layers)
            ]
        )
        num_y, num_x = self.bev_shape
        self.bev_embedding = nn.Embedding(num_y * num_x, embed_dims)
        self.positional_encoding = LearnedPositionalEncoding(embed_dims // 2, num_y, num_x)
        self.shared_conv = ConvBNReLU(in_channels, embed_dims, 3)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Xavier-uniform on every >= 2-D parameter, then the deformable-attention init again."""
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for module in self.modules():
            if isinstance(module, MSDeformableAttention):
                module.init_weights()

    def reference_points(self, cams: CameraGeometry) -> tuple[Tensor, Tensor]:
        """Pillar reference points projected into every camera of ``cams`` (see ``project_reference_points``).

        Returns:
            ``uv`` (B, N, Q, Z, 2) normalised image coordinates and ``valid`` (B, N, Q, Z) bool, Q = Y * X.
        """
        centres = pillar_centres(
            self.bev_shape, self.grid_lower, self.grid_interval, self.heights, device=cams.device
        )
        centres = centres.flatten(0, 1)  # (Q, Z, 3), row-major cells
        return project_reference_points(centres, cams, self.image_size)

    def forward(
        self,
        bev_x: Tensor,
        img_feats: Tensor | Sequence[Tensor],
        cams: CameraGeometry,
    ) -> Tensor:
        """Refine the BEV map.

        Args:
            bev_x: (B, in_channels, Y, X) BEV encoder output.
            img_feats: (B, N, C, h, w) key-frame camera features (context + depth embedding), or a
                sequence of ``num_levels`` such tensors (levels may differ in h, w).
            cams: the key frame's cameras (B, N) that saw ``img_feats``.

        Returns:
            (B, C, Y, X) refined BEV features.
        """
        levels = [img_feats] if isinstance(img_feats, Tensor) else list(img_feats)
        num_y, num_x = self.bev_shape
        batch = bev_x.shape[0]
        if bev_x.dim() != 4 or tuple(bev_x.shape[1:]) != (self.in_channels, num_y, num_x):
            raise ValueError(f"bev_x must be (B, {self.in_channels}, {num_y}, {num_x}), got {tuple(bev_x.shape)}")
        if len(levels) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} image feature levels, got {len(levels)}")
        for feat in levels:
            if feat.dim() != 5 or feat.shape[0] != batch or feat.shape[2] != self.embed_dims:
                raise ValueError(f"img_feats must be (B={batch}, N, {self.embed_dims}, h, w), got {tuple(feat.shape)}")
        level_shapes = [(int(f.shape[3]), int(f.shape[4])) for f in levels]
        # (B, N, C, h, w) -> (B, N, h*w, C), levels concatenated along the flattened pixels.
        value = torch.cat([f.flatten(3).transpose(2, 3) for f in levels], dim=2)

        query = self.bev_embedding.weight.unsqueeze(0) + self.shared_conv(bev_x).flatten(2).transpose(1, 2)
        query_pos = self.positional_encoding(num_y, num_x).unsqueeze(0)  # (1, Q, C)
        uv, valid = self.reference_points(cams)
        out = self.decoder(query, query_pos, value, level_shapes, uv, valid)
        return out.transpose(1, 2).reshape(batch, self.embed_dims, num_y, num_x)
