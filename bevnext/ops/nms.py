"""Bird's-eye-view box overlap and non-maximum suppression (inference only, no gradients).

A BEV box is ``[x, y, l, w, yaw]`` in a right-handed ground frame (x forward, y left in the ego frame):
centre ``(x, y)``, extent ``l`` along the box's own x axis and ``w`` across it, and ``yaw`` the angle of
the box's x axis measured from +x towards +y (radians). This is columns ``[0, 1, 3, 4, 6]`` of the
project's 9-vector box (``bevnext.structures.boxes``).

Everything here is vectorised PyTorch and runs on any device; only the greedy selection loop of the
NMS functions runs on the host (it is inherently sequential and touches at most ``pre_max_size`` rows).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bev_box_corners", "circle_nms", "nms_rotated_bev", "rotated_iou_bev"]

# Vertex slots kept after each of the four clipping steps. Exact clipping of a rectangle by k half-planes
# yields at most 4 + k vertices (5, 6, 7, 8); the spare slots absorb the extra vertices that rounding can
# create when an edge is (nearly) collinear with a clip line.
_CLIP_SLOTS = (6, 8, 10, 12)
# Pairs processed per batch in rotated_iou_bev, to bound temporary memory (~ a few tens of MB).
_PAIR_CHUNK = 1 << 16


def bev_box_corners(boxes: Tensor) -> Tensor:
    """Corners of BEV boxes in counter-clockwise order.

    Args:
        boxes: (N, 5) ``[x, y, l, w, yaw]``.

    Returns:
        (N, 4, 2) corners ``(x, y)``: front-left, rear-left, rear-right, front-right (box frame
        ``(+l/2, +w/2), (-l/2, +w/2), (-l/2, -w/2), (+l/2, -w/2)``), which is counter-clockwise
        (positive shoelace area) for any yaw when l, w >= 0.
    """
    half_l = boxes[:, 2:3] * 0.5
    half_w = boxes[:, 3:4] * 0.5
    local_x = torch.cat((half_l, -half_l, -half_l, half_l), dim=1)  # (N, 4)
    local_y = torch.cat((half_w, half_w, -half_w, -half_w), dim=1)
    cos, sin = torch.cos(boxes[:, 4:5]), torch.sin(boxes[:, 4:5])
    corner_x = boxes[:, 0:1] + cos * local_x - sin * local_y
    corner_y = boxes[:, 1:2] + sin * local_x + cos * local_y
    return torch.stack((corner_x, corner_y), dim=-1)


def rotated_iou_bev(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Exact IoU of every pair of rotated BEV rectangles.

    The intersection polygon is computed by Sutherland-Hodgman clipping of each box of ``boxes_a`` by the
    four edge half-planes of each box of ``boxes_b``; its area by the shoelace formula. Pairs whose
    circumscribed circles do not overlap are skipped (IoU 0). Boxes with zero area have IoU 0 with
    everything (including themselves); the result never contains NaN for finite inputs.

    Args:
        boxes_a: (M, 5) ``[x, y, l, w, yaw]``; negative sizes are treated as 0.
        boxes_b: (K, 5) ``[x, y, l, w, yaw]``.

    Returns:
        (M, K) IoU in [0, 1], dtype ``promote(a, b, float32)``, on ``boxes_a``'s device.
    """
    return _rotated_iou(boxes_a, boxes_b, upper_only=False)


def nms_rotated_bev(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    pre_max_size: int | None = None,
    post_max_size: int | None = None,
) -> Tensor:
    """Greedy NMS with rotated BEV IoU.

    Boxes are visited in descending score order (ties: lower index first); a box is kept unless its IoU
    with an already kept box is ``> iou_threshold``.

    Args:
        boxes: (N, 5) ``[x, y, l, w, yaw]``.
        scores: (N,) scores.
        iou_threshold: suppression threshold on IoU (strictly greater suppresses).
        pre_max_size: only the top-``pre_max_size`` boxes by score take part (None: all).
        post_max_size: at most this many indices are returned (None: all kept).

    Returns:
        (num_kept,) int64 indices into ``boxes``, in descending score order, on ``boxes``' device.
    """
    order = _score_order(scores, pre_max_size)
    if order.numel() == 0:
        return order
    candidates = boxes[order]
    # The greedy pass only asks whether a kept box suppresses a *later* one: compute i < j pairs only.
    overlapping = _rotated_iou(candidates, candidates, upper_only=True) > iou_threshold
    return order[_greedy_keep(overlapping, post_max_size).to(order.device)]


def circle_nms(
    centers: Tensor,
    scores: Tensor,
    dist_threshold: float,
    post_max_size: int | None = None,
) -> Tensor:
    """Greedy NMS on BEV centre distance (CenterPoint's circle NMS).

    Boxes are visited in descending score order (ties: lower index first); a box is suppressed when the
    **squared** distance between its centre and a kept box's centre is ``<= dist_threshold`` (the
    reference compares squared distances with its ``min_radius`` setting, so the threshold is in m²).

    Args:
        centers: (N, 2) BEV centres ``(x, y)``.
        scores: (N,) scores.
        dist_threshold: threshold on the squared centre distance.
        post_max_size: at most this many indices are returned (None: all kept).

    Returns:
        (num_kept,) int64 indices into ``centers``, in descending score order, on ``centers``' device.
    """
    order = _score_order(scores, None)
    if order.numel() == 0:
        return order
    dtype = torch.promote_types(centers.dtype, torch.float32)
    xy = centers[order].to(dtype)
    dist2 = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    return order[_greedy_keep(dist2 <= dist_threshold, post_max_size).to(order.device)]


def _rotated_iou(boxes_a: Tensor, boxes_b: Tensor, upper_only: bool) -> Tensor:
    """``rotated_iou_bev``; with ``upper_only`` only pairs i < j are computed (the rest stay 0)."""
    dtype = torch.promote_types(torch.promote_types(boxes_a.dtype, boxes_b.dtype), torch.float32)
    num_a, num_b = boxes_a.shape[0], boxes_b.shape[0]
    iou = torch.zeros((num_a, num_b), dtype=dtype, device=boxes_a.device)
    if num_a == 0 or num_b == 0:
        return iou
    a = _sanitise(boxes_a.to(dtype))
    b = _sanitise(boxes_b.to(device=boxes_a.device, dtype=dtype))
    area_a = a[:, 2] * a[:, 3]
    area_b = b[:, 2] * b[:, 3]

    # Cheap prefilter: two boxes can only overlap when their circumscribed circles do.
    radius_a = 0.5 * torch.hypot(a[:, 2], a[:, 3])
    radius_b = 0.5 * torch.hypot(b[:, 2], b[:, 3])
    centre_dist2 = (a[:, None, 0] - b[None, :, 0]) ** 2 + (a[:, None, 1] - b[None, :, 1]) ** 2
    candidate = centre_dist2 < (radius_a[:, None] + radius_b[None, :]) ** 2
    candidate &= (area_a[:, None] > 0) & (area_b[None, :] > 0)
    if upper_only:
        candidate = candidate.triu(diagonal=1)
    index_a, index_b = candidate.nonzero(as_tuple=True)

    for start in range(0, index_a.numel(), _PAIR_CHUNK):
        ia = index_a[start : start + _PAIR_CHUNK]
        ib = index_b[start : start + _PAIR_CHUNK]
        inter = _intersection_area(a[ia], b[ib])
        # Intersection can exceed neither box; clamping keeps identical boxes at IoU <= 1.
        inter = torch.minimum(inter, torch.minimum(area_a[ia], area_b[ib]))
        iou[ia, ib] = (inter / (area_a[ia] + area_b[ib] - inter)).clamp(0.0, 1.0)
    return iou


def _sanitise(boxes: Tensor) -> Tensor:
    """Clamp negative sizes to zero (a negative extent would flip the corner orientation)."""
    return torch.cat((boxes[:, :2], boxes[:, 2:4].clamp(min=0.0), boxes[:, 4:5]), dim=1)


def _intersection_area(a: Tensor, b: Tensor) -> Tensor:
    """Intersection area of aligned pairs of boxes: (P, 5), (P, 5) -> (P,).

    Works in each b box's own frame, where b is the axis-aligned window [-l/2, l/2] x [-w/2, w/2]: the
    four clip half-planes become ``±x <= l/2`` and ``±y <= w/2`` (cheap, and exact crossing coordinates),
    and coordinates stay small (good rounding for boxes far from the origin).
    """
    # Box a expressed in b's frame (centre difference first, then rotation by -yaw_b: a rigid motion, so
    # the corners stay counter-clockwise).
    cos_b, sin_b = torch.cos(b[:, 4]), torch.sin(b[:, 4])
    dx, dy = a[:, 0] - b[:, 0], a[:, 1] - b[:, 1]
    a_in_b = torch.stack((cos_b * dx + sin_b * dy, cos_b * dy - sin_b * dx, a[:, 2], a[:, 3], a[:, 4] - b[:, 4]), 1)
    corners = bev_box_corners(a_in_b)  # (P, 4, 2)
    x, y = corners[..., 0], corners[..., 1]
    half_l = 0.5 * b[:, 2:3]
    half_w = 0.5 * b[:, 3:4]
    x, y = _clip_axis(x, y, half_l, 1.0, _CLIP_SLOTS[0])  # x <= l/2
    y, x = _clip_axis(y, x, half_w, 1.0, _CLIP_SLOTS[1])  # y <= w/2
    x, y = _clip_axis(x, y, half_l, -1.0, _CLIP_SLOTS[2])  # x >= -l/2
    y, x = _clip_axis(y, x, half_w, -1.0, _CLIP_SLOTS[3])  # y >= -w/2
    return _shoelace(x, y).clamp(min=0.0)


def _clip_axis(u: Tensor, v: Tensor, bound: Tensor, sign: float, max_vertices: int) -> tuple[Tensor, Tensor]:
    """One Sutherland-Hodgman step against the half-plane ``sign * u <= bound``.

    Args:
        u: (P, n) vertex coordinate along the half-plane's normal axis.
        v: (P, n) the other coordinate. Vertices are in polygon order; repeated vertices are allowed
            (they add no area).
        bound: (P, 1) half-plane bound.
        sign: +1 or -1 (which side of the window).
        max_vertices: vertex slots of the result.

    Returns:
        Clipped ``(u, v)``, each (P, n') with n' = min(2n, max_vertices), padded by repeating the last
        vertex (all zeros when nothing is left).
    """
    num_polys, num_vertices = u.shape
    side = bound - sign * u  # >= 0 inside
    inside = side >= 0
    prev_v, prev_side = v.roll(1, dims=1), side.roll(1, dims=1)
    crossing = inside != inside.roll(1, dims=1)
    # On crossing edges prev_side and side have different signs (one >= 0, one < 0), so the denominator
    # is non-zero there; elsewhere it is replaced by 1 and the result discarded.
    t = prev_side / torch.where(crossing, prev_side - side, torch.ones_like(side))
    cross_v = prev_v + t * (v - prev_v)
    # The crossing lies on the clip line itself: set that coordinate exactly.
    cross_u = (sign * bound).expand_as(u)

    # For each edge (prev -> current): [crossing point if the edge crosses] then [current if inside].
    cand_u = torch.stack((cross_u, u), dim=2).reshape(num_polys, 2 * num_vertices)
    cand_v = torch.stack((cross_v, v), dim=2).reshape(num_polys, 2 * num_vertices)
    keep = torch.stack((crossing, inside), dim=2).reshape(num_polys, 2 * num_vertices)

    # Compact the kept vertices to the front (order preserved); dropped ones go to a trash slot that is
    # cut off afterwards.
    slots = min(2 * num_vertices, max_vertices)
    position = keep.long().cumsum(dim=1) - 1
    target = torch.where(keep & (position < slots), position, torch.full_like(position, slots))
    count = keep.sum(dim=1, keepdim=True).clamp(max=slots)
    # Pad with copies of the last kept vertex: zero-length edges leave area and later clips unchanged.
    filled = torch.arange(slots, device=u.device).view(1, slots) < count
    last = (count - 1).clamp(min=0)
    out = []
    for cand in (cand_u, cand_v):
        compact = cand.new_zeros((num_polys, slots + 1)).scatter_(1, target, cand)[:, :slots]
        out.append(torch.where(filled, compact, compact.gather(1, last)))
    return out[0], out[1]


def _shoelace(x: Tensor, y: Tensor) -> Tensor:
    """Signed area of (P, n) polygons given as vertex coordinates (positive when counter-clockwise)."""
    return 0.5 * (x * y.roll(-1, dims=1) - x.roll(-1, dims=1) * y).sum(dim=1)


def _score_order(scores: Tensor, pre_max_size: int | None) -> Tensor:
    """Indices sorting ``scores`` descending (stable), truncated to ``pre_max_size``."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order if pre_max_size is None else order[:pre_max_size]


def _greedy_keep(suppresses: Tensor, max_keep: int | None) -> Tensor:
    """Greedy selection over candidates sorted by descending score.

    Args:
        suppresses: (n, n) bool; ``suppresses[i, j]`` means a kept ``i`` removes ``j``.
        max_keep: stop after this many kept (None: no limit).

    Returns:
        (num_kept,) int64 positions (CPU) into the sorted candidates, ascending.
    """
    # One host transfer, then a short sequential loop: at most one row operation per kept box.
    suppresses = suppresses.cpu()
    num = suppresses.shape[0]
    limit = num if max_keep is None else max(0, max_keep)
    removed = torch.zeros(num, dtype=torch.bool)
    keep: list[int] = []
    for i in range(num):
        if len(keep) >= limit:
            break
        if removed[i]:
            continue
        keep.append(i)
        removed |= suppresses[i]
    return torch.tensor(keep, dtype=torch.long)
