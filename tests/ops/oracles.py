"""Loop oracles shared by the sampling-op tests (deformable attention and deformable convolution)."""

from __future__ import annotations

import math

import torch


def bilinear_zero_padded(image: torch.Tensor, px: float, py: float) -> torch.Tensor:
    """Oracle: bilinear sample of a (C, H, W) image at pixel coordinates (px, py); zeros outside.

    Pixel ``(i, j)`` has its centre at ``(px, py) = (j, i)``. Returns (C,) float64.
    """
    _, height, width = image.shape
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    out = torch.zeros(image.shape[0], dtype=torch.float64)
    for yy, wy in ((y0, 1.0 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1.0 - fx), (x0 + 1, fx)):
            if 0 <= yy < height and 0 <= xx < width:
                out += wy * wx * image[:, yy, xx].double()
    return out
