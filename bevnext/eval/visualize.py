"""Draw 3-D boxes onto a sample's six camera images and a bird's-eye view (PIL only).

Two uses: ``bevnext check-data`` draws one set of boxes (the ground truth) in class colours, and
``bevnext eval --show N`` draws predictions (class colours, with class name and score) against the
ground truth (white outlines on a dark halo), so that misses, false positives and offsets are visible at
a glance in every camera and from above.

Boxes are in the key ego frame (the ego pose at the sample's CAM_FRONT timestamp). Each camera took
its picture at its own time, from its own ego pose, so a box goes key ego -> global -> that camera's
ego pose -> camera -> pixels; drawing with the key pose alone would shift boxes in the side and back
cameras of a moving car by the distance driven between the exposures.

Edges that pass behind a camera are cut at a near plane (``z = 0.1 m`` in the camera frame) rather than
dropped, so a box the ego vehicle is next to still shows its visible part.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bevnext.data.info_record import InfoRecord, key_ego2global, sensor2global
from bevnext.errors import DataError
from bevnext.io import atomic_write_bytes
from bevnext.structures.boxes import CLASSES, VX, VY, box_corners
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

GT_COLOUR: tuple[int, int, int] = (255, 255, 255)
"""Ground truth drawn against predictions: white, thinner than the predictions and on top of them, so a
matched pair shows as a white line inside a class-coloured band."""

HALO_COLOUR: tuple[int, int, int] = (0, 0, 0)
"""Outline under ground-truth lines in the camera panels, so white stays visible on bright image areas."""

TEXT_BACKING: tuple[int, int, int] = (0, 0, 0)
"""Fill of the box behind every text, so labels read on any image."""

ARROW_SECONDS = 1.0
"""Velocity arrows in the bird's-eye panel show this many seconds of motion: the tip is at centre + v * t."""

BOX_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 0),  # bottom face
    (4, 5), (5, 6), (6, 7), (7, 4),  # top face
    (0, 4), (1, 5), (2, 6), (3, 7),  # verticals
)
"""The 12 edges of a box as index pairs into ``box_corners``' corner order."""

def key_ego_to_camera(info: InfoRecord, channel: str) -> RigidTransform:
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
    return sensor2global(cam).inverse() @ key_ego2global(info)


def project_to_image(
    points_key_ego: np.ndarray, info: InfoRecord, channel: str
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
    boxes: np.ndarray, info: InfoRecord, channel: str, near: float = NEAR_PLANE_M
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



# --------------------------------------------------------------------------------------------------
# Drawing.


@dataclass(frozen=True)
class _BoxSet:
    """Boxes of one kind (predictions, or ground truth) in the key ego frame, validated.

    Attributes:
        boxes: (N, D) float64, D >= 7 (``[x, y, z, l, w, h, yaw, vx, vy]`` when D = 9).
        labels: (N,) int64 class indices into ``CLASSES``.
        scores: (N,) float64, or None.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def colour(self, i: int) -> tuple[int, int, int]:
        """The class colour of box ``i``."""
        return CLASS_COLOURS[CLASSES[int(self.labels[i])]]

    def velocities(self) -> np.ndarray:
        """(N, 2) planar velocities; NaN where the boxes carry none (7-value boxes)."""
        if self.boxes.shape[1] > VY:
            return self.boxes[:, [VX, VY]]
        return np.full((len(self), 2), np.nan)


def _box_set(
    what: str,
    boxes: np.ndarray | Sequence[Sequence[float]],
    labels: Sequence[int] | np.ndarray | None,
    scores: Sequence[float] | np.ndarray | None = None,
) -> _BoxSet:
    """Validate and convert one set of boxes; ``what`` names it in errors."""
    arr = np.asarray(boxes, dtype=np.float64)
    # An empty list or a (0,) array means "no boxes", whatever the caller's box width.
    arr = arr.reshape(-1, arr.shape[-1] if arr.size else 9)
    if arr.shape[1] < 7:
        raise ValueError(f"{what}: boxes need at least 7 values [x, y, z, l, w, h, yaw], got shape {arr.shape}")
    if labels is None:
        raise ValueError(f"{what}: boxes were given without labels")
    labels_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores_arr = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    n = arr.shape[0]
    if labels_arr.shape[0] != n or (scores_arr is not None and scores_arr.shape[0] != n):
        raise ValueError(f"{what}: got {n} boxes, {labels_arr.shape[0]} labels and "
                         f"{'no' if scores_arr is None else scores_arr.shape[0]} scores")
    bad = labels_arr[(labels_arr < 0) | (labels_arr >= len(CLASSES))]
    if bad.size:
        # Guessing a class for an unknown label would draw a plausible but wrong picture.
        raise ValueError(f"{what}: label {int(bad[0])} is not a class index (0..{len(CLASSES) - 1})")
    return _BoxSet(arr, labels_arr, scores_arr)


@dataclass(frozen=True)
class _Style:
    """Sizes that follow the panel height, so text and lines read the same at any resolution."""

    font: ImageFont.ImageFont | ImageFont.FreeTypeFont
    line: int  # predictions, or the only set of boxes
    gt_line: int  # ground truth, drawn thinner and on top
    pad: int  # around text in its backing box

    @classmethod
    def for_panel_height(cls, ph: int) -> _Style:
        """The style of a picture whose camera panels are ``ph`` pixels high (the BEV panel ``2 * ph``)."""
        # About 24 text lines per camera panel: 19 px at nuScenes' 450-px panels, never below 12 px.
        # Predictions at least 2 px wider than the ground truth on top of them, so that a prediction that
        # matches its ground truth still shows its colour on both sides of the white line.
        line = max(3, round(ph / 110))
        return cls(font=sized_font(max(12, round(ph / 24))), line=line, gt_line=max(1, line - 2), pad=2)


def sized_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A scalable font of ``size`` pixels where Pillow can give one, else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font; DejaVu ships with most Linux systems
        try:
            return ImageFont.truetype("DejaVuSans.ttf", size)
        except OSError:
            return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return math.ceil(right - left), math.ceil(bottom - top)


def _label_rect(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, style: _Style, bounds: tuple[int, int]
) -> tuple[float, float, float, float]:
    """The backing box (x0, y0, x1, y1) of ``text`` with its top-left at ``xy``, moved inside ``bounds``."""
    w, h = _text_size(draw, text, style.font)
    box_w, box_h = w + 2 * style.pad, h + 2 * style.pad
    x = min(max(0.0, xy[0]), max(0.0, bounds[0] - box_w))
    y = min(max(0.0, xy[1]), max(0.0, bounds[1] - box_h))
    return x, y, x + box_w - 1, y + box_h - 1


def _draw_label(
    draw: ImageDraw.ImageDraw, rect: tuple[float, float, float, float], text: str, fill: tuple[int, int, int],
    style: _Style,
) -> None:
    """``text`` in ``fill`` on a ``TEXT_BACKING`` box ``rect`` (from ``_label_rect``)."""
    draw.rectangle(rect, fill=TEXT_BACKING)
    # textbbox's ink may start right of / below the anchor; shift so the ink sits inside the padding.
    left, top, _, _ = draw.textbbox((0, 0), text, font=style.font)
    draw.text((rect[0] + style.pad - left, rect[1] + style.pad - top), text, fill=fill, font=style.font)


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _panel_segments(
    boxes: np.ndarray, info: InfoRecord, channel: str, full: tuple[int, int], size: tuple[int, int]
) -> list[list[tuple[tuple[float, float], tuple[float, float]]]]:
    """Per box, its edges in one camera as panel-pixel segments, cut to the image (empty: not seen)."""
    full_w, full_h = full
    sx, sy = size[0] / full_w, size[1] / full_h
    segments, visible = project_box_edges(boxes, info, channel)
    out = []
    for i in range(segments.shape[0]):
        drawn = []
        for e in np.nonzero(visible[i])[0]:
            clipped = _clip_segment_to_rect(segments[i, e, 0], segments[i, e, 1], full_w, full_h)
            if clipped is not None:
                (u0, v0), (u1, v1) = clipped
                drawn.append(((u0 * sx, v0 * sy), (u1 * sx, v1 * sy)))
        out.append(drawn)
    return out


def _draw_camera(
    data_root: Path,
    info: InfoRecord,
    channel: str,
    boxes: _BoxSet,
    gt: _BoxSet | None,
    size: tuple[int, int],
    style: _Style,
) -> Image.Image:
    cam = info["cams"][channel]
    path = data_root / cam["path"]
    try:
        with Image.open(path) as img:
            panel = img.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot decode camera image (expected a readable JPEG): {err}") from err
    full = panel.size
    panel = panel.resize(size, Image.BILINEAR)
    draw = ImageDraw.Draw(panel)
    box_segments = _panel_segments(boxes.boxes, info, channel, full, size)
    gt_segments = [] if gt is None else _panel_segments(gt.boxes, info, channel, full, size)

    # Order: the ground truth's dark halo, then the predictions, then the ground truth's white core on top.
    for segments in gt_segments:
        for seg in segments:
            draw.line(seg, fill=HALO_COLOUR, width=style.gt_line + 2)
    for i, segments in enumerate(box_segments):
        for seg in segments:
            draw.line(seg, fill=boxes.colour(i), width=style.line)
    for segments in gt_segments:
        for seg in segments:
            draw.line(seg, fill=GT_COLOUR, width=style.gt_line)

    # Labels after all lines so no line crosses a text; best score first, each just above its box (else just
    # below), and a label that would cover an earlier one is left out: in a crowded street unreadable piles
    # of text help nobody, and the box keeps its class colour.
    title = _label_rect(draw, (0, 0), channel, style, size)
    placed = [title]
    order = range(len(boxes)) if boxes.scores is None else np.argsort(-boxes.scores, kind="stable")
    for i in order:
        if not box_segments[i]:
            continue
        pts = np.asarray(box_segments[i]).reshape(-1, 2)
        name = CLASSES[int(boxes.labels[i])]
        text = name if boxes.scores is None else f"{name} {boxes.scores[i]:.2f}"
        _, text_h = _text_size(draw, text, style.font)
        u0, v0, v1 = pts[:, 0].min(), pts[:, 1].min(), pts[:, 1].max()
        for xy in ((u0, v0 - text_h - 2 * style.pad - 1), (u0, v1 + 1)):
            rect = _label_rect(draw, xy, text, style, size)
            if not any(_overlaps(rect, other) for other in placed):
                _draw_label(draw, rect, text, boxes.colour(i), style)
                placed.append(rect)
                break
    _draw_label(draw, title, channel, (255, 255, 255), style)
    return panel


def _bev_pixels(xy: np.ndarray, side: int) -> np.ndarray:
    """Key-ego (x, y) metres -> BEV panel pixels (u, v): x forward is up, y left is left, ego at the centre."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    scale = side / (2.0 * BEV_RANGE_M)
    centre = side / 2.0
    return np.stack([centre - xy[:, 1] * scale, centre - xy[:, 0] * scale], axis=1)


def _points(uv: np.ndarray) -> list[tuple[float, float]]:
    return [(float(u), float(v)) for u, v in uv]


def _draw_arrow(
    draw: ImageDraw.ImageDraw, start: np.ndarray, tip: np.ndarray, colour: tuple[int, int, int], width: int
) -> None:
    """A line from ``start`` to ``tip`` (pixels) with a filled head whose point is exactly ``tip``."""
    d = tip - start
    length = float(np.hypot(*d))
    if not np.isfinite(length) or length < 2.0:  # standing still: an arrow would be a dot on the centre
        return
    unit = d / length
    head = min(length, 3.0 * width + 4.0)
    base = tip - unit * head
    normal = np.array([-unit[1], unit[0]]) * head * 0.45
    draw.line(_points(np.stack([start, base])), fill=colour, width=width)
    draw.polygon(_points(np.stack([tip, base + normal, base - normal])), fill=colour, outline=colour)


def _draw_footprints(
    draw: ImageDraw.ImageDraw, boxes: _BoxSet, side: int, width: int, colour: tuple[int, int, int] | None
) -> None:
    """Footprints, heading ticks and velocity arrows of ``boxes``; ``colour`` None = class colours."""
    if not len(boxes):
        return
    corners = box_corners(boxes.boxes)[:, :4, :2]  # (N, 4, 2) bottom-face footprint
    velocities = boxes.velocities()
    for i in range(len(boxes)):
        c = boxes.colour(i) if colour is None else colour
        pts = _points(_bev_pixels(corners[i], side))
        draw.line(pts + pts[:1], fill=c, width=width)
        # Heading tick: centre -> middle of the front edge (corners 0 and 3 are the front ones).
        front = 0.5 * (corners[i, 0] + corners[i, 3])
        draw.line(_points(_bev_pixels(np.stack([boxes.boxes[i, :2], front]), side)), fill=c, width=width)
        if np.isfinite(velocities[i]).all():
            start, tip = _bev_pixels(np.stack([boxes.boxes[i, :2], boxes.boxes[i, :2] + velocities[i] * ARROW_SECONDS]),
                                     side)
            _draw_arrow(draw, start, tip, c, width)


def _draw_legend(draw: ImageDraw.ImageDraw, boxes: _BoxSet, gt: _BoxSet | None, style: _Style) -> None:
    """Top-left of the BEV panel: what each colour and line means."""
    # Rows of (swatch colour or None, text, text colour).
    rows: list[tuple[tuple[int, int, int] | None, str, tuple[int, int, int]]] = []
    if gt is not None:
        rows.append((GT_COLOUR, f"ground truth ({len(gt)})", GT_COLOUR))
        rows.append((None, f"predictions ({len(boxes)}):", (200, 200, 200)))
    for label in sorted({int(label) for label in boxes.labels}):
        name = CLASSES[label]
        rows.append((CLASS_COLOURS[name], name, CLASS_COLOURS[name]))
    rows.append((None, f"arrow: {ARROW_SECONDS:g} s of motion", (200, 200, 200)))
    sizes = [_text_size(draw, text, style.font) for _, text, _ in rows]
    line_h = max(h for _, h in sizes) + style.pad
    swatch = line_h
    width = max(w for w, _ in sizes) + swatch + 4 * style.pad
    draw.rectangle([0, 0, width, len(rows) * line_h + 2 * style.pad], fill=TEXT_BACKING)
    for row, ((colour, text, text_colour), (_, h)) in enumerate(zip(rows, sizes)):
        y = style.pad + row * line_h
        if colour is not None:
            # A line sample, drawn as the boxes are: thin for ground truth, thick for classes.
            thickness = style.gt_line if colour == GT_COLOUR and gt is not None else style.line
            mid = y + line_h // 2
            draw.line([(style.pad, mid), (style.pad + swatch - 2, mid)], fill=colour, width=thickness)
        left, top, _, _ = draw.textbbox((0, 0), text, font=style.font)
        draw.text((2 * style.pad + swatch - left, y + (line_h - h) // 2 - top), text, fill=text_colour,
                  font=style.font)


def _draw_bev(boxes: _BoxSet, gt: _BoxSet | None, side: int, style: _Style) -> Image.Image:
    panel = Image.new("RGB", (side, side), (18, 18, 24))
    draw = ImageDraw.Draw(panel)
    scale = side / (2.0 * BEV_RANGE_M)
    centre = side / 2.0
    for ring in range(10, int(BEV_RANGE_M) + 1, 10):
        r = ring * scale
        draw.ellipse([centre - r, centre - r, centre + r, centre + r], outline=(70, 70, 80))
        draw.text((centre + 3, centre - r + 2), f"{ring} m", fill=(110, 110, 120), font=style.font)
    draw.line([(centre, 0), (centre, side)], fill=(45, 45, 55))
    draw.line([(0, centre), (side, centre)], fill=(45, 45, 55))
    # The ego vehicle: a triangle pointing forward (up), about 4.5 m x 2 m, in grey so it is not taken for GT.
    ego = np.array([[2.25, 0.0], [-2.25, 1.0], [-2.25, -1.0]])
    draw.polygon(_points(_bev_pixels(ego, side)), outline=(170, 170, 170))
    _draw_footprints(draw, boxes, side, style.line, None)
    if gt is not None:
        _draw_footprints(draw, gt, side, style.gt_line, GT_COLOUR)
    _draw_legend(draw, boxes, gt, style)
    title = f"BEV +-{BEV_RANGE_M:.0f} m"
    title_w, _ = _text_size(draw, title, style.font)
    rect = _label_rect(draw, (side - title_w - 2 * style.pad, 0), title, style, (side, side))
    _draw_label(draw, rect, title, (200, 200, 200), style)
    return panel


def draw_sample(
    data_root: str | os.PathLike[str],
    info: InfoRecord,
    boxes: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    out_png: str | os.PathLike[str],
    scores: Sequence[float] | np.ndarray | None = None,
    max_panel_width: int = 800,
    gt_boxes: np.ndarray | None = None,
    gt_labels: Sequence[int] | np.ndarray | None = None,
) -> Path:
    """Draw one sample's boxes into its six camera images and a bird's-eye view; write one PNG.

    Two modes. Without ``gt_boxes``, ``boxes`` are drawn in class colours, labelled with their class name
    (and score, if given). With ``gt_boxes``, ``boxes``/``labels``/``scores`` are predictions, drawn the
    same way, and the ground truth is drawn over them as thin white outlines (on a dark halo in the camera
    panels), so a correct prediction shows a white line inside its coloured band.

    Layout: a 2 x 3 grid of camera panels (FRONT_LEFT, FRONT, FRONT_RIGHT / BACK_LEFT, BACK, BACK_RIGHT),
    each camera image scaled to width ``pw = min(W, max_panel_width)`` and height ``ph = round(H * pw / W)``
    (W x H: CAM_FRONT's size), then a square bird's-eye panel of side ``2 * ph`` on the right. The image is
    ``(3 * pw + 2 * ph) x (2 * ph)`` pixels.

    Camera panels: box edges projected through each camera's own ego pose; each box seen has its class name
    (and score) just above it (else just below) in its class colour on a black box, best score first, and a
    label that would cover an earlier one is left out; the camera name top-left.
    Bird's-eye panel: top-down, ±55 m (``BEV_RANGE_M``), ego at the centre, x forward pointing up, y left
    pointing left, range rings every 10 m; box footprints with a heading tick (centre -> front edge) and a
    velocity arrow from the centre to ``centre + (vx, vy) * ARROW_SECONDS`` (1 s of motion; none for
    boxes slower than about 2 px per second or without velocity); a legend top-left. Text sizes follow
    ``ph`` (about 1/24 of it, at least 12 px).

    Args:
        data_root: the dataset root the info's image paths are relative to.
        info: the sample's info dict (see ``bevnext.data.infos``).
        boxes: (N, 9) (or (N, 7)) boxes ``[x, y, z, l, w, h, yaw, vx, vy]`` in the key ego frame,
            z = gravity centre; velocities as stored in infos (m/s along the key ego axes). N may be 0.
        labels: (N,) class indices into ``CLASSES``.
        out_png: the PNG to write (atomically; parent folders are created).
        scores: optional (N,) scores, written after each box's class name in the camera panels.
        max_panel_width: the widest a camera panel may be, in pixels.
        gt_boxes: optional (M, 9) (or (M, 7)) ground-truth boxes in the same frame; turns on the
            predictions-against-ground-truth mode. M may be 0.
        gt_labels: (M,) class indices of ``gt_boxes``; required with them.

    Returns:
        The written path.

    Raises:
        DataError: a camera image is missing or unreadable.
        ValueError: box, label and score counts differ, a label is not a class index, or only one of
            ``gt_boxes`` and ``gt_labels`` is given.
    """
    data_root = Path(data_root)
    predictions = _box_set("boxes", boxes, labels, scores)
    if gt_boxes is None and gt_labels is not None:
        raise ValueError("gt_labels were given without gt_boxes")
    gt = None if gt_boxes is None else _box_set("gt_boxes", gt_boxes, gt_labels)

    front = info["cams"]["CAM_FRONT"]
    full_w, full_h = int(front["width"]), int(front["height"])
    pw = min(full_w, max_panel_width)
    ph = round(full_h * pw / full_w)
    side = 2 * ph
    style = _Style.for_panel_height(ph)
    canvas = Image.new("RGB", (3 * pw + side, 2 * ph), (0, 0, 0))
    for row, channels in enumerate(GRID):
        for col, channel in enumerate(channels):
            panel = _draw_camera(data_root, info, channel, predictions, gt, (pw, ph), style)
            canvas.paste(panel, (col * pw, row * ph))
    canvas.paste(_draw_bev(predictions, gt, side, style), (3 * pw, 0))

    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    out = Path(out_png)
    atomic_write_bytes(out, buffer.getvalue())
    return out


__all__ = [
    "ARROW_SECONDS",
    "BEV_RANGE_M",
    "BOX_EDGES",
    "CLASS_COLOURS",
    "GRID",
    "GT_COLOUR",
    "NEAR_PLANE_M",
    "clip_segments_near_plane",
    "draw_sample",
    "key_ego_to_camera",
    "project_box_edges",
    "project_to_image",
    "sized_font",
]
