"""Draw 3-D boxes onto a sample's six camera images and a bird's-eye view (PIL only).

Boxes are in the key ego frame (the ego pose at the sample's CAM_FRONT timestamp). Each camera took
its picture at its own time, from its own ego pose, so a box goes key ego -> global -> that camera's
ego pose -> camera -> pixels; drawing with the key pose alone would shift boxes in the side and back
cameras of a moving car by the distance driven between the exposures.

Edges that pass behind a camera are cut at a near plane (``z = 0.1 m`` in the camera frame) rather than
dropped, so a box the ego vehicle is next to still shows its visible part.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bevnext.data.infos import key_ego2global
from bevnext.errors import DataError
from bevnext.io import atomic_write_bytes
from bevnext.structures.boxes import CLASSES, box_corners
from bevnext.structures.transforms import RigidTransform

NEAR_PLANE_M = 0.1
"""Depth (m, camera z) at which box edges are cut before projection."""

GRID: tuple[tuple[str, ...], ...] = (
    ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"),
    ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"),
)
"""Camera panel layout, row by row."""

BEV_RANGE_M = 55.0
"""Half-width of the bird's-eye panel in metres (ego at the centre)."""

CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "car": (255, 150, 20),
    "truck": (230, 60, 40),
    "construction_vehicle": (235, 225, 40),
    "bus": (250, 80, 180),
    "trailer": (150, 70, 30),
    "barrier": (150, 150, 160),
    "motorcycle": (160, 40, 220),
    "bicycle": (40, 200, 220),
    "pedestrian": (40, 90, 255),
    "traffic_cone": (60, 210, 60),
}
"""RGB colour per detection class."""

BOX_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 0),  # bottom face
    (4, 5), (5, 6), (6, 7), (7, 4),  # top face
    (0, 4), (1, 5), (2, 6), (3, 7),  # verticals
)
"""The 12 edges of a box as index pairs into ``box_corners``' corner order."""


def _pose(record: Mapping[str, Any]) -> RigidTransform:
    return RigidTransform.from_nusc(record["translation"], record["rotation"])


def key_ego_to_camera(info: Mapping[str, Any], channel: str) -> RigidTransform:
    """The transform key ego -> camera ``channel`` (optical frame) of one info.

    Args:
        info: an info dict (see ``bevnext.data.infos``).
        channel: a camera name, e.g. ``CAM_FRONT``.

    Returns:
        ``key_ego2cam`` = cam_ego -> cam composed with global -> cam_ego and key ego -> global.
    """
    try:
        cam = info["cams"][channel]
    except KeyError as err:
        raise DataError(f"sample {info.get('token')}: no camera {channel} in its info") from err
    ego2global_cam = _pose(cam["ego2global"])
    sensor2ego = _pose(cam["sensor2ego"])
    return sensor2ego.inverse() @ ego2global_cam.inverse() @ key_ego2global(info)


def project_to_image(
    points_key_ego: np.ndarray, info: Mapping[str, Any], channel: str
) -> tuple[np.ndarray, np.ndarray]:
    """Project key-ego points into one camera image.

    Args:
        points_key_ego: (M, 3) points in the key ego frame.
        info: the sample's info dict.
        channel: camera name.

    Returns:
        ``uv`` (M, 2) pixel coordinates (x right, y down, in the full-resolution image; NaN for points
        with depth <= 1e-6 m, which have no image) and ``depth`` (M,), the camera-frame z in metres
        (negative behind the camera).
    """
    points = np.asarray(points_key_ego, dtype=np.float64).reshape(-1, 3)
    cam_points = key_ego_to_camera(info, channel).apply(points)
    return _pinhole(cam_points, np.asarray(info["cams"][channel]["intrinsic"], dtype=np.float64))


def _pinhole(cam_points: np.ndarray, intrinsic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    depth = cam_points[:, 2].copy()
    pix = cam_points @ intrinsic.T
    uv = np.full((cam_points.shape[0], 2), np.nan)
    front = depth > 1e-6
    uv[front] = pix[front, :2] / depth[front, None]
    return uv, depth


def clip_segments_near_plane(
    p0: np.ndarray, p1: np.ndarray, near: float = NEAR_PLANE_M
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut 3-D segments in a camera frame to the half space ``z >= near``.

    Args:
        p0, p1: (E, 3) segment end points in the camera frame (z forward).
        near: the near-plane depth in metres.

    Returns:
        ``q0``, ``q1`` (E, 3): the clipped end points (an end behind the plane is moved along the segment
        onto it), and ``keep`` (E,) bool, False for segments entirely behind the plane.
    """
    p0 = np.asarray(p0, dtype=np.float64).reshape(-1, 3)
    p1 = np.asarray(p1, dtype=np.float64).reshape(-1, 3)
    z0, z1 = p0[:, 2], p1[:, 2]
    keep = (z0 >= near) | (z1 >= near)
    q0, q1 = p0.copy(), p1.copy()
    dz = z1 - z0
    # Where exactly one end is behind the plane dz is non-zero, so the crossing parameter is defined.
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(dz != 0, (near - z0) / dz, 0.0)
    cross = (p0 + t[:, None] * (p1 - p0)).copy()
    cross[:, 2] = near  # exact, whatever the rounding of t
    move0 = keep & (z0 < near)
    move1 = keep & (z1 < near)
    q0[move0] = cross[move0]
    q1[move1] = cross[move1]
    return q0, q1, keep


def project_box_edges(
    boxes: np.ndarray, info: Mapping[str, Any], channel: str, near: float = NEAR_PLANE_M
) -> tuple[np.ndarray, np.ndarray]:
    """The 12 edges of each box as pixel segments in one camera, cut at the near plane.

    Args:
        boxes: (N, >=7) boxes ``[x, y, z, l, w, h, yaw, ...]`` in the key ego frame (z = gravity centre).
        info: the sample's info dict.
        channel: camera name.
        near: near-plane depth in metres.

    Returns:
        ``segments`` (N, 12, 2, 2) pixel end points ``[edge][end][u, v]`` (NaN for edges entirely behind
        the near plane) and ``visible`` (N, 12) bool. Segments may extend beyond the image; the drawing
        code clips them to it.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    n = boxes.shape[0] if boxes.ndim == 2 else 0
    if n == 0:
        return np.zeros((0, len(BOX_EDGES), 2, 2)), np.zeros((0, len(BOX_EDGES)), dtype=bool)
    corners = key_ego_to_camera(info, channel).apply(box_corners(boxes))  # (N, 8, 3) camera frame
    idx = np.asarray(BOX_EDGES)
    q0, q1, keep = clip_segments_near_plane(
        corners[:, idx[:, 0]].reshape(-1, 3), corners[:, idx[:, 1]].reshape(-1, 3), near
    )
    intrinsic = np.asarray(info["cams"][channel]["intrinsic"], dtype=np.float64)
    uv0, _ = _pinhole(q0, intrinsic)
    uv1, _ = _pinhole(q1, intrinsic)
    segments = np.stack([uv0, uv1], axis=1)
    segments[~keep] = np.nan
    return segments.reshape(n, len(BOX_EDGES), 2, 2), keep.reshape(n, len(BOX_EDGES))


def _clip_segment_to_rect(
    a: np.ndarray, b: np.ndarray, width: float, height: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """Liang-Barsky clipping of one 2-D segment to ``[0, width] x [0, height]``, or None if outside.

    Clipping before drawing keeps coordinates small: an end point cut at a 0.1 m near plane can land
    hundreds of thousands of pixels away, and PIL would walk that whole line.
    """
    d = b - a
    t0, t1 = 0.0, 1.0
    for p, q in ((-d[0], a[0]), (d[0], width - a[0]), (-d[1], a[1]), (d[1], height - a[1])):
        if p == 0:
            if q < 0:
                return None
            continue
        t = q / p
        if p < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
        if t0 > t1:
            return None
    return a + t0 * d, a + t1 * d


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap default font
        return ImageFont.load_default()


def _class_name(label: int) -> str:
    return CLASSES[int(label)] if 0 <= int(label) < len(CLASSES) else "car"


def _draw_camera(
    data_root: Path,
    info: Mapping[str, Any],
    channel: str,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray | None,
    size: tuple[int, int],
) -> Image.Image:
    cam = info["cams"][channel]
    path = data_root / cam["path"]
    try:
        with Image.open(path) as img:
            panel = img.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot decode camera image (expected a readable JPEG): {err}") from err
    full_w, full_h = panel.size
    panel = panel.resize(size, Image.BILINEAR)
    sx, sy = size[0] / full_w, size[1] / full_h
    draw = ImageDraw.Draw(panel)
    line_w = max(1, round(2 * sx))
    font = _font(max(10, size[1] // 28))
    segments, visible = project_box_edges(boxes, info, channel)
    for i in range(segments.shape[0]):
        colour = CLASS_COLOURS[_class_name(labels[i])]
        drawn = False
        for e in np.nonzero(visible[i])[0]:
            clipped = _clip_segment_to_rect(segments[i, e, 0], segments[i, e, 1], full_w, full_h)
            if clipped is None:
                continue
            (u0, v0), (u1, v1) = clipped
            draw.line([(u0 * sx, v0 * sy), (u1 * sx, v1 * sy)], fill=colour, width=line_w)
            drawn = True
        if drawn and scores is not None:
            uv, depth = project_to_image(boxes[i : i + 1, :3], info, channel)
            if depth[0] > NEAR_PLANE_M and 0 <= uv[0, 0] < full_w and 0 <= uv[0, 1] < full_h:
                draw.text((uv[0, 0] * sx, uv[0, 1] * sy), f"{scores[i]:.2f}", fill=colour, font=font)
    draw.text((6, 4), channel, fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return panel


def _draw_bev(boxes: np.ndarray, labels: np.ndarray, side: int) -> Image.Image:
    panel = Image.new("RGB", (side, side), (18, 18, 24))
    draw = ImageDraw.Draw(panel)
    scale = side / (2.0 * BEV_RANGE_M)
    centre = side / 2.0
    font = _font(max(10, side // 50))

    def to_px(xy: np.ndarray) -> list[tuple[float, float]]:
        # x forward is up, y left is left: u grows with -y, v grows with -x.
        return [(centre - y * scale, centre - x * scale) for x, y in np.asarray(xy).reshape(-1, 2)]

    for ring in range(10, int(BEV_RANGE_M) + 1, 10):
        r = ring * scale
        draw.ellipse([centre - r, centre - r, centre + r, centre + r], outline=(70, 70, 80))
        draw.text((centre + 3, centre - r + 2), f"{ring} m", fill=(110, 110, 120), font=font)
    draw.line([(centre, 0), (centre, side)], fill=(45, 45, 55))
    draw.line([(0, centre), (side, centre)], fill=(45, 45, 55))
    # The ego vehicle: a triangle pointing forward (up), about 4.5 m x 2 m.
    draw.polygon(to_px(np.array([[2.25, 0.0], [-2.25, 1.0], [-2.25, -1.0]])), outline=(255, 255, 255))
    if boxes.shape[0]:
        corners = box_corners(boxes)[:, :4, :2]  # (N, 4, 2) bottom-face footprint
        for i in range(boxes.shape[0]):
            colour = CLASS_COLOURS[_class_name(labels[i])]
            pts = to_px(corners[i])
            draw.line(pts + pts[:1], fill=colour, width=2)
            # Heading tick: centre -> middle of the front edge (corners 0 and 3 are the front ones).
            front = 0.5 * (corners[i, 0] + corners[i, 3])
            draw.line(to_px(np.stack([boxes[i, :2], front])), fill=colour, width=2)
    line_h = getattr(font, "size", 10) + 4
    present = sorted({_class_name(label) for label in labels}, key=CLASSES.index)
    for row, name in enumerate(present):
        draw.text((6, 4 + row * line_h), name, fill=CLASS_COLOURS[name], font=font)
    title = f"BEV +-{BEV_RANGE_M:.0f} m"
    draw.text((side - 6 - draw.textlength(title, font=font), 4), title, fill=(200, 200, 200), font=font)
    return panel


def draw_sample(
    data_root: str | os.PathLike[str],
    info: Mapping[str, Any],
    boxes: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    out_png: str | os.PathLike[str],
    scores: Sequence[float] | np.ndarray | None = None,
    max_panel_width: int = 800,
) -> Path:
    """Draw one sample's boxes into its six camera images and a bird's-eye view; write one PNG.

    Layout: a 2 x 3 grid of camera panels (FRONT_LEFT, FRONT, FRONT_RIGHT / BACK_LEFT, BACK, BACK_RIGHT),
    each CAM_FRONT's image scaled to width ``pw = min(W, max_panel_width)`` and height
    ``ph = round(H * pw / W)``, then a square bird's-eye panel of side ``2 * ph`` on the right (top-down,
    ±55 m, ego at the centre, x forward pointing up, range rings every 10 m, box footprints with a heading
    tick). The image is ``(3 * pw + 2 * ph) x (2 * ph)`` pixels. Each class has one colour.

    Args:
        data_root: the dataset root the info's image paths are relative to.
        info: the sample's info dict (see ``bevnext.data.infos``).
        boxes: (N, 9) (or (N, 7)) boxes ``[x, y, z, l, w, h, yaw, ...]`` in the key ego frame,
            z = gravity centre.
        labels: (N,) class indices into ``CLASSES``.
        out_png: the PNG to write (atomically; parent folders are created).
        scores: optional (N,) scores, written next to each box centre in the camera panels.
        max_panel_width: the widest a camera panel may be, in pixels.

    Returns:
        The written path.

    Raises:
        DataError: a camera image is missing or unreadable.
    """
    data_root = Path(data_root)
    boxes = np.asarray(boxes, dtype=np.float64)
    boxes = boxes.reshape(-1, boxes.shape[-1] if boxes.size else 9)
    labels_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores_arr = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    n = boxes.shape[0]
    if labels_arr.shape[0] != n or (scores_arr is not None and scores_arr.shape[0] != n):
        raise ValueError(f"got {boxes.shape[0]} boxes, {labels_arr.shape[0]} labels and "
                         f"{'no' if scores_arr is None else scores_arr.shape[0]} scores")

    front = info["cams"]["CAM_FRONT"]
    full_w, full_h = int(front["width"]), int(front["height"])
    pw = min(full_w, max_panel_width)
    ph = round(full_h * pw / full_w)
    side = 2 * ph
    canvas = Image.new("RGB", (3 * pw + side, 2 * ph), (0, 0, 0))
    for row, channels in enumerate(GRID):
        for col, channel in enumerate(channels):
            panel = _draw_camera(data_root, info, channel, boxes, labels_arr, scores_arr, (pw, ph))
            canvas.paste(panel, (col * pw, row * ph))
    canvas.paste(_draw_bev(boxes, labels_arr, side), (3 * pw, 0))

    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    out = Path(out_png)
    atomic_write_bytes(out, buffer.getvalue())
    return out


__all__ = [
    "BOX_EDGES",
    "CLASS_COLOURS",
    "GRID",
    "NEAR_PLANE_M",
    "clip_segments_near_plane",
    "draw_sample",
    "key_ego_to_camera",
    "project_box_edges",
    "project_to_image",
]
