"""CenterPoint heatmap targets: Gaussian radius rule and max-composited Gaussian splats.

Coordinates are feature-map cells: a centre ``(x, y)`` is ``(column, row)`` of the (H, W) heatmap, and box
sizes are in cells (metres / voxel size / out_size_factor), as in the reference head.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["draw_gaussians", "gaussian_radius", "heatmap_radius"]


def gaussian_radius(length_cells: Tensor, width_cells: Tensor, min_overlap: float = 0.1) -> Tensor:
    """CenterNet/CenterPoint Gaussian radius for boxes of the given size (vectorised).

    The rule considers three ways a corner-perturbed box can still overlap the true box by
    ``min_overlap`` (both corners moved inwards, both outwards, one each) and takes the smallest of the
    three quadratic roots. As in the reference (and CenterNet), each root is computed as
    ``(b + sqrt(b^2 - 4ac)) / 2`` rather than ``/ (2a)``; we keep that so targets match the reference.

    Args:
        length_cells: (...) box lengths in feature-map cells.
        width_cells: (...) box widths in feature-map cells (broadcastable with ``length_cells``).
        min_overlap: the overlap ("gaussian_overlap" in the reference config), in (0, 1).

    Returns:
        (...) float radius in cells (not yet truncated; see ``heatmap_radius``).
    """
    height = torch.as_tensor(length_cells)
    width = torch.as_tensor(width_cells, device=height.device)
    if not height.is_floating_point():
        height = height.float()
    width = width.to(height.dtype)
    overlap = min_overlap

    # Operation order follows the reference formula term by term, so float32 results (and therefore the
    # truncated integer radii) agree bit for bit.
    size_sum = height + width

    b1 = size_sum
    c1 = width * height * (1 - overlap) / (1 + overlap)
    r1 = (b1 + torch.sqrt((b1 * b1 - 4 * c1).clamp(min=0))) / 2

    a2 = 4.0
    b2 = 2 * size_sum
    c2 = (1 - overlap) * width * height
    r2 = (b2 + torch.sqrt((b2 * b2 - 4 * a2 * c2).clamp(min=0))) / 2

    a3 = 4 * overlap
    b3 = -2 * overlap * size_sum
    c3 = (overlap - 1) * width * height
    r3 = (b3 + torch.sqrt((b3 * b3 - 4 * a3 * c3).clamp(min=0))) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def heatmap_radius(length_cells: Tensor, width_cells: Tensor, min_overlap: float = 0.1, min_radius: int = 2) -> Tensor:
    """Integer splat radius as the reference head uses it: ``max(min_radius, int(gaussian_radius(l, w)))``.

    Args:
        length_cells: (...) box lengths in feature-map cells.
        width_cells: (...) box widths in feature-map cells.
        min_overlap: see ``gaussian_radius``.
        min_radius: lower bound on the radius (2 in the reference config).

    Returns:
        (...) int64 radii.
    """
    radius = gaussian_radius(length_cells, width_cells, min_overlap)
    # int() in the reference truncates toward zero; the radius is >= 0, so this is a floor.
    return radius.to(torch.long).clamp(min=min_radius)


def draw_gaussians(heatmap: Tensor, centers: Tensor, radii: Tensor, classes: Tensor) -> Tensor:
    """Splat one 2-D Gaussian per object into its class channel, composited with element-wise max.

    Object ``m`` writes ``exp(-(dx^2 + dy^2) / (2 sigma^2))``, ``sigma = (2 r + 1) / 6``, over the
    ``(2r + 1) x (2r + 1)`` window centred on its cell (clipped to the map) of channel ``classes[m]``;
    each cell keeps the maximum of its current value and all splats covering it (the reference's
    ``draw_heatmap_gaussian``, applied object by object, is the same because max is order-free). The
    Gaussian values are evaluated in float64 and rounded to the heatmap's dtype, as the reference does.
    Objects whose centre lies outside the map, or whose class is out of range, are ignored.

    Args:
        heatmap: (C, H, W) floating tensor, modified in place.
        centers: (M, 2) integer cell ``(x, y)`` = (column, row) of each object.
        radii: (M,) integer radii (>= 0).
        classes: (M,) int64 channel per object.

    Returns:
        ``heatmap`` (the same tensor).
    """
    num_objects = centers.shape[0]
    if num_objects == 0:
        return heatmap
    channels, height, width = heatmap.shape
    device = heatmap.device
    col = centers[:, 0].to(device=device, dtype=torch.long)
    row = centers[:, 1].to(device=device, dtype=torch.long)
    radius = radii.to(device=device, dtype=torch.long)
    cls = classes.to(device=device, dtype=torch.long)
    valid = (col >= 0) & (col < width) & (row >= 0) & (row < height) & (cls >= 0) & (cls < channels) & (radius >= 0)
    if not bool(valid.any()):
        return heatmap
    # Every object is padded to the largest radius so that all splats share one window shape.
    max_radius = int(radius[valid].max())
    table = _gaussian_table(max_radius).to(device=device, dtype=heatmap.dtype)
    values = table[radius.clamp(0, max_radius)]  # (M, 2R+1, 2R+1); < 0 outside the object's own window
    offsets = torch.arange(-max_radius, max_radius + 1, device=device)
    rows = row.view(-1, 1, 1) + offsets.view(1, -1, 1)
    cols = col.view(-1, 1, 1) + offsets.view(1, 1, -1)
    write = (values >= 0) & valid.view(-1, 1, 1) & (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    flat_index = (cls.view(-1, 1, 1) * height + rows) * width + cols

    target = heatmap if heatmap.is_contiguous() else heatmap.contiguous()
    # scatter_reduce_ with "amax" (torch >= 1.12) composes every splat with the existing value.
    target.view(-1).scatter_reduce_(0, flat_index[write], values[write], reduce="amax", include_self=True)
    if target is not heatmap:
        heatmap.copy_(target)
    return heatmap


@functools.lru_cache(maxsize=32)
def _gaussian_table(max_radius: int) -> Tensor:
    """(R+1, 2R+1, 2R+1) float64 CPU table: entry [r, R+dy, R+dx] is the radius-r splat at offset (dx, dy).

    Entries outside the radius-r window are -1 (a sentinel; Gaussian values are in (0, 1]).
    """
    size = 2 * max_radius + 1
    offsets = torch.arange(-max_radius, max_radius + 1, dtype=torch.float64)
    dist2 = offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2
    table = torch.full((max_radius + 1, size, size), -1.0, dtype=torch.float64)
    for r in range(max_radius + 1):
        sigma = (2 * r + 1) / 6
        window = slice(max_radius - r, max_radius + r + 1)
        splat = torch.exp(-dist2[window, window] / (2 * sigma * sigma))
        # The reference zeroes values below machine epsilon times the peak (never hit for sane radii).
        splat[splat < torch.finfo(torch.float64).eps * splat.max()] = 0
        table[r, window, window] = splat
    return table
