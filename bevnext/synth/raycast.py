"""Ray / oriented-box intersection (slab test), shared by the camera renderer and the LiDAR caster.

Rays are given in the box's own frame (centre at the origin, axes along length, width, height):
a common origin ``o`` and per-ray directions whose components are broadcastable arrays, so callers
can pass outer sums/products (one array op per ray) instead of full (..., 3) direction arrays.
A point on ray ``r`` is ``o + t * d_r``; ``t`` is in whatever unit the directions carry (metres
for unit directions, camera depth for directions with optical z = 1).
"""

from __future__ import annotations

import numpy as np


def slab_interval(
    dx: np.ndarray, dy: np.ndarray, dz: np.ndarray, origin: np.ndarray, half: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit parameters of rays through an axis-aligned box ``|p_k| <= half_k``.

    The origin must lie outside the box (cameras and the LiDAR never sit inside an object).
    A ray hits the box iff ``0 < t_in < t_out``; the first hit point is ``origin + t_in * d``.
    Divisions by zero components produce infinities that the comparisons treat correctly; call
    under ``np.errstate(divide="ignore", invalid="ignore")``.

    Args:
        dx, dy, dz: direction components in the box frame, float32, mutually broadcastable
            (e.g. (h, w), (h, w), (h, 1)).
        origin: (3,) ray origin in the box frame.
        half: (3,) half sizes (l/2, w/2, h/2).

    Returns:
        ``(t_in, t_out)``, float32 arrays of the broadcast shape.
    """
    t_in: np.ndarray | None = None
    t_out: np.ndarray | None = None
    for d, o, h in ((dx, float(origin[0]), float(half[0])), (dy, float(origin[1]), float(half[1])),
                    (dz, float(origin[2]), float(half[2]))):
        if -h <= o <= h:
            # Inside this slab: it bounds only the exit. (h - o) and (-h - o) have opposite signs,
            # so the larger quotient is the exit through the face the ray heads for.
            leave = np.maximum(np.float32(h - o) / d, np.float32(-h - o) / d)
            t_out = leave if t_out is None else np.minimum(t_out, leave)
            continue
        # Outside on one side: only rays heading towards the box can enter through the near face.
        near, far = (h - o, -h - o) if o > h else (-h - o, h - o)
        enter = np.float32(near) / d
        leave = np.float32(far) / d
        t_in = enter if t_in is None else np.maximum(t_in, enter)
        t_out = leave if t_out is None else np.minimum(t_out, leave)
    if t_in is None or t_out is None:
        raise ValueError(f"ray origin {origin.tolist()} lies inside the box of half sizes {half.tolist()}")
    return t_in, t_out


__all__ = ["slab_interval"]
