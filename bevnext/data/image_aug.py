"""The 2D image augmentation of one camera, as parameters and as the affine map it induces.

Pixel coordinates are continuous and corner-based: pixel ``(c, r)`` covers ``[c, c+1) x [r, r+1)``,
so its centre is ``(c + 0.5, r + 0.5)`` and a 3D point projecting to ``(u, v)`` through the intrinsics
lands in pixel ``(floor(u), floor(v))`` (the synthetic renderer's convention too).

The reference's augmentation is, in order: resize by ``resize``, crop the window ``crop`` (which
may extend past the resized image; outside is black), flip horizontally, rotate by ``rotate_deg``
about the crop centre (PIL's positive angle = counter-clockwise on screen). ``matrix()`` gives the
3x3 affine taking original-image coordinates to output-image coordinates; ``post_rot`` / ``post_trans``
of the batch are its linear part (padded to 3x3) and its translation (padded with 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageAug:
    """Augmentation parameters of one camera image.

    Attributes:
        resize: scale factor applied to the original image.
        crop: ``(x0, y0, x1, y1)`` window in resized-image pixels; its size is the output size.
        flip: horizontal flip of the cropped window.
        rotate_deg: rotation about the window centre, degrees, counter-clockwise on screen.
    """

    resize: float
    crop: tuple[int, int, int, int]
    flip: bool = False
    rotate_deg: float = 0.0

    @property
    def out_size(self) -> tuple[int, int]:
        """Output ``(W, H)``."""
        x0, y0, x1, y1 = self.crop
        return x1 - x0, y1 - y0

    def matrix(self) -> np.ndarray:
        """(3, 3) affine: original pixel coordinates -> augmented pixel coordinates (homogeneous)."""
        x0, y0, _, _ = self.crop
        out_w, out_h = self.out_size
        m = np.diag([self.resize, self.resize, 1.0])
        m = _translation(-x0, -y0) @ m
        if self.flip:
            m = np.array([[-1.0, 0.0, out_w], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
        if self.rotate_deg:
            a = math.radians(self.rotate_deg)
            # Counter-clockwise on screen with y pointing down: (u, v) -> R (u - c) + c.
            rot = np.array([[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
            cx, cy = out_w / 2.0, out_h / 2.0
            m = _translation(cx, cy) @ rot @ _translation(-cx, -cy) @ m
        return m

    def post_rot_trans(self) -> tuple[np.ndarray, np.ndarray]:
        """``post_rot`` (3, 3) and ``post_trans`` (3,) as the batch stores them."""
        m = self.matrix()
        post_rot = np.eye(3)
        post_rot[:2, :2] = m[:2, :2]
        post_trans = np.zeros(3)
        post_trans[:2] = m[:2, 2]
        return post_rot, post_trans


def _translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])
