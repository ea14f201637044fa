"""Sample-level transforms of the data pipeline: augmentation sampling, BEV augmentation, boxes, depth targets.

Everything here is NumPy on one sample, deterministic given its arguments: randomness comes in as
a ``numpy.random.Generator`` that the dataset seeds per (seed, epoch, index), so a sample's
augmentation does not depend on which loader worker builds it. Semantics follow
``reference/bevnext-model.md`` §4.3-4.4.

Frames: boxes and points are in the key frame (ego at the key sample's CAM_FRONT timestamp, x
forward, y left, z up); ``BEVAug`` maps the key frame to the BEV-augmented key frame the model
and the targets live in. Image coordinates are continuous and corner-based (see
``bevnext.data.image_aug``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from bevnext.config.data import DataConfig
from bevnext.data.image_aug import ImageAug
from bevnext.structures.boxes import BOX_DIM, VX, VY, YAW, H, L, X, Y, Z
from bevnext.structures.transforms import RigidTransform, wrap_angle

# int() of a resized size computed in floating point: 1600 * 0.44 must give 704, not 703.
_SIZE_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# Image augmentation.


def sample_image_aug(cfg: DataConfig, rng: np.random.Generator | None) -> ImageAug:
    """The 2D augmentation of one camera: random (train) or the fixed test one (``rng=None``).

    Train, as the reference draws it: ``r = U(resize_lim) * resize_unit``; the resized image is
    ``(int(W r), int(H r))``; the crop window of ``input_size`` sits ``int((1 - U(crop_h)) * newH)``
    rows below the top minus its height (bottom crop) and ``int(U(0, max(0, newW - w)))`` columns
    from the left (when the resized image is narrower than the window the rest is black); flip with
    ``flip_prob``; rotate by U(``rot_lim``) degrees about the window centre.

    Test: ``r = resize_test * resize_unit``, the crop at ``int((1 - mean(crop_h)) * newH) - h`` rows
    and centred horizontally, no flip, no rotation; for nuScenes ``(0, 140, 704, 396)`` at r = 0.44.

    Args:
        cfg: data config (``input_size``, ``src_size`` and the augmentation ranges).
        rng: generator for the random draws; None for the deterministic test augmentation.

    Returns:
        The augmentation, in original-image pixel coordinates of a ``src_size`` image.
    """
    src_w, src_h = cfg.src_size
    out_h, out_w = cfg.input_size
    if rng is None:
        resize = cfg.resize_test * cfg.resize_unit
        crop_frac = 0.5 * (cfg.crop_h[0] + cfg.crop_h[1])
    else:
        resize = float(rng.uniform(*cfg.resize_lim)) * cfg.resize_unit
        crop_frac = float(rng.uniform(*cfg.crop_h))
    new_w, new_h = int(src_w * resize + _SIZE_EPS), int(src_h * resize + _SIZE_EPS)
    top = int((1.0 - crop_frac) * new_h + _SIZE_EPS) - out_h
    if rng is None:
        left = int(max(0, new_w - out_w) / 2)
        return ImageAug(resize=resize, crop=(left, top, left + out_w, top + out_h))
    left = int(rng.uniform(0.0, max(0, new_w - out_w)))
    flip = bool(rng.random() < cfg.flip_prob)
    rotate = float(rng.uniform(*cfg.rot_lim))
    return ImageAug(resize=resize, crop=(left, top, left + out_w, top + out_h), flip=flip, rotate_deg=rotate)


def shows_image(aug: ImageAug, src_size: tuple[int, int], uv: np.ndarray) -> np.ndarray:
    """Which original-image positions are actually shown by the augmented image.

    A position is shown when it lies inside the original image and, after resize + crop + flip
    but before the rotation, inside the crop window: the reference rotates the cropped window, so
    whatever the rotation brings in from outside the window is black, not image content.

    Args:
        aug: the augmentation.
        src_size: original image ``(W, H)``.
        uv: (P, 2) original-image coordinates (corner-based pixels).

    Returns:
        (P,) bool.
    """
    uv = np.asarray(uv, dtype=np.float64)
    inside = (uv[:, 0] >= 0) & (uv[:, 0] < src_size[0]) & (uv[:, 1] >= 0) & (uv[:, 1] < src_size[1])
    m = replace(aug, rotate_deg=0.0).matrix()
    win = uv @ m[:2, :2].T + m[:2, 2]
    out_w, out_h = aug.out_size
    return inside & (win[:, 0] >= 0) & (win[:, 0] < out_w) & (win[:, 1] >= 0) & (win[:, 1] < out_h)


# --------------------------------------------------------------------------------------------------
# BEV augmentation (BDA).


@dataclass(frozen=True)
class BEVAug:
    """The BEV data augmentation of one sample: rotation about +z, isotropic scale, mirror flips.

    Its matrix is ``flip @ scale @ rot`` (rotation first), with ``flip = diag(-1 if flip_x, -1 if
    flip_y, 1)``; it maps key-frame points to BEV-augmented key-frame points and is applied to the
    lifted frustum points of every frame (the model) and to the ground truth (here).

    Yaw under this map, for our yaw convention (heading angle from +x towards +y): a box's heading
    vector ``(cos yaw, sin yaw)`` turns with the rotation (``yaw + rot``); mirroring x maps it to
    ``(-cos yaw, sin yaw) = (cos(pi - yaw), sin(pi - yaw))``, so ``flip_x`` gives ``pi - yaw``;
    mirroring y gives ``(cos yaw, -sin yaw)``, i.e. ``-yaw``. These are the reference's rules, and
    ``tests/data/test_geometry.py`` checks that boxes transformed this way coincide with their
    corners and heading points transformed as points.

    Attributes:
        rotate_deg: rotation about +z, degrees, counter-clockwise seen from above.
        scale: isotropic scale factor.
        flip_x: mirror x -> -x.
        flip_y: mirror y -> -y.
    """

    rotate_deg: float = 0.0
    scale: float = 1.0
    flip_x: bool = False
    flip_y: bool = False

    def matrix(self) -> np.ndarray:
        """(3, 3) float64 ``flip @ scale @ rot``: key frame -> BEV-augmented key frame."""
        a = math.radians(self.rotate_deg)
        rot = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
        flip = np.diag([-1.0 if self.flip_x else 1.0, -1.0 if self.flip_y else 1.0, 1.0])
        return flip @ (self.scale * rot)

    def apply_points(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) key-frame points -> (..., 3) BEV-augmented points."""
        return np.asarray(points, dtype=np.float64) @ self.matrix().T

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Transform boxes; yaw is not wrapped here (``filter_boxes`` wraps it, as the reference does).

        Args:
            boxes: (M, 9) ``[x, y, z, l, w, h, yaw, vx, vy]`` in the key frame.

        Returns:
            (M, 9) float64 boxes in the BEV-augmented key frame: centres and velocities through the
            matrix, sizes times ``scale``, yaw as described in the class docstring.
        """
        boxes = np.array(boxes, dtype=np.float64).reshape(-1, BOX_DIM)
        m = self.matrix()
        boxes[:, X : Z + 1] = boxes[:, X : Z + 1] @ m.T
        boxes[:, L : H + 1] *= self.scale
        boxes[:, YAW] += math.radians(self.rotate_deg)
        if self.flip_x:
            boxes[:, YAW] = np.pi - boxes[:, YAW]
        if self.flip_y:
            boxes[:, YAW] = -boxes[:, YAW]
        # Velocities are planar vectors: the top-left 2x2 block (rotation, scale, flips) acts on them.
        boxes[:, VX : VY + 1] = boxes[:, VX : VY + 1] @ m[:2, :2].T
        return boxes


def sample_bev_aug(cfg: DataConfig, rng: np.random.Generator | None) -> BEVAug:
    """The BEV augmentation of one sample: random (train) or the identity (``rng=None``).

    Args:
        cfg: data config (``bda_rot_lim``, ``bda_scale_lim``, ``bda_flip_x_prob``, ``bda_flip_y_prob``).
        rng: generator for the random draws; None for the identity.
    """
    if rng is None:
        return BEVAug()
    return BEVAug(
        rotate_deg=float(rng.uniform(*cfg.bda_rot_lim)),
        scale=float(rng.uniform(*cfg.bda_scale_lim)),
        flip_x=bool(rng.random() < cfg.bda_flip_x_prob),
        flip_y=bool(rng.random() < cfg.bda_flip_y_prob),
    )


def filter_boxes(
    boxes: np.ndarray, labels: np.ndarray, point_cloud_range: Sequence[float], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep boxes whose BEV centre is strictly inside the range and whose label is a class; wrap yaw.

    As the reference's object range and name filters: ``x_min < x < x_max`` and
    ``y_min < y < y_max`` (z is not checked), then yaw wrapped into ``[-pi, pi)``.

    Args:
        boxes: (M, 9) boxes in the (BEV-augmented) key frame.
        labels: (M,) class indices.
        point_cloud_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)``.
        num_classes: labels must lie in ``[0, num_classes)``.

    Returns:
        ``(boxes (K, 9) float64, labels (K,) int64)``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, BOX_DIM)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    x_min, y_min, _, x_max, y_max, _ = point_cloud_range
    keep = (boxes[:, X] > x_min) & (boxes[:, X] < x_max) & (boxes[:, Y] > y_min) & (boxes[:, Y] < y_max)
    keep &= (labels >= 0) & (labels < num_classes)
    boxes, labels = boxes[keep].copy(), labels[keep]
    boxes[:, YAW] = wrap_angle(boxes[:, YAW])
    return boxes, labels


# --------------------------------------------------------------------------------------------------
# Images.


def normalize_images(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float], bgr: bool, out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 RGB images -> normalised float32 channel-first images.

    Args:
        images: (..., H, W, 3) uint8 RGB.
        mean: per-channel mean, RGB order (0-255 scale).
        std: per-channel std, RGB order.
        bgr: reproduce the reference's channel swap: output channel ``c`` is input channel
            ``2 - c`` (B, G, R), normalised with ``mean[c]`` / ``std[c]`` (see ``DataConfig``).
        out: optional (..., 3, H, W) float32 array to write into (e.g. a slice of a batch buffer).

    Returns:
        (..., 3, H, W) float32 (``out`` when given).
    """
    shape = (*images.shape[:-3], 3, *images.shape[-3:-1])
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"normalize_images: out is {out.dtype} {out.shape}, expected float32 {shape}")
    for c in range(3):
        src = images[..., 2 - c if bgr else c]
        dst = out[..., c, :, :]
        # One pass each, in float32 (a Python float operand would make NumPy compute in float64).
        np.subtract(src, np.float32(mean[c]), out=dst, dtype=np.float32)
        np.multiply(dst, np.float32(1.0 / std[c]), out=dst)
    return out


# --------------------------------------------------------------------------------------------------
# Depth targets.


def depth_map(
    points: np.ndarray,
    lidar2cams: Sequence[RigidTransform],
    intrinsics: Sequence[np.ndarray],
    augs: Sequence[ImageAug],
    src_size: tuple[int, int],
    depth_range: tuple[float, float],
) -> np.ndarray:
    """Sparse depth targets: LiDAR points projected into each augmented camera image, nearest per pixel.

    A point goes LiDAR -> camera (``lidar2cams``, which the caller composes through the LiDAR's
    and each camera's own ego poses and the global frame), -> original image (intrinsics) ->
    augmented image (``aug.matrix()``), and lands in pixel ``(floor(u), floor(v))`` (corner-based
    pixels, like the renderer and ``ImageAug``). Kept: camera depth in ``[min, max)``, inside the
    output image, and shown by it (``shows_image``: no targets on the black padding, which has no
    image content to infer depth from — the reference keeps such points; a deliberate difference).
    Where several points share a pixel the nearest wins.

    Args:
        points: (P, 3) LiDAR-frame points.
        lidar2cams: per camera, LiDAR -> camera (optical frame) transform.
        intrinsics: per camera, (3, 3) camera matrix of the original image.
        augs: per camera, its image augmentation; all must have the same output size.
        src_size: original image ``(W, H)``.
        depth_range: ``(min, max)`` camera depth in metres.

    Returns:
        (N, H, W) float32 depth in metres, 0 where no point lands.
    """
    n_cams = len(augs)
    out_w, out_h = augs[0].out_size
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    flat_parts, depth_parts = [], []
    for n in range(n_cams):
        cam = lidar2cams[n].apply(points)
        depth = cam[:, 2]
        ok = (depth >= depth_range[0]) & (depth < depth_range[1])
        cam, depth = cam[ok], depth[ok]
        uv = cam[:, :2] / depth[:, None] @ np.asarray(intrinsics[n], dtype=np.float64)[:2, :2].T
        uv += np.asarray(intrinsics[n], dtype=np.float64)[:2, 2]
        m = augs[n].matrix()
        out = uv @ m[:2, :2].T + m[:2, 2]
        col, row = np.floor(out[:, 0]), np.floor(out[:, 1])
        ok = (col >= 0) & (col < out_w) & (row >= 0) & (row < out_h) & shows_image(augs[n], src_size, uv)
        flat_parts.append((n * out_h + row[ok].astype(np.int64)) * out_w + col[ok].astype(np.int64))
        depth_parts.append(depth[ok])
    flat = np.concatenate(flat_parts) if flat_parts else np.zeros(0, dtype=np.int64)
    depth = np.concatenate(depth_parts) if depth_parts else np.zeros(0)
    result = np.zeros(n_cams * out_h * out_w, dtype=np.float32)
    if flat.size:
        # Sort by pixel, then by depth within a pixel: the first entry of each pixel run is its nearest point.
        order = np.lexsort((depth, flat))
        flat, depth = flat[order], depth[order]
        first = np.ones(flat.size, dtype=bool)
        first[1:] = flat[1:] != flat[:-1]
        result[flat[first]] = depth[first]
    return result.reshape(n_cams, out_h, out_w)


__all__ = [
    "BEVAug",
    "depth_map",
    "filter_boxes",
    "normalize_images",
    "sample_bev_aug",
    "sample_image_aug",
    "shows_image",
]
