"""Turn head outputs into boxes: CenterPoint decoding and per-task Scale-NMS (reference §2.9, §3.4).

Frames: boxes leave here as ``[x, y, z, l, w, h, yaw, vx, vy]`` in the (BEV-augmented) key ego frame, ``z`` the
**gravity centre** (``bevnext.structures.boxes``). The reference lowers ``z`` by ``h / 2`` at the very end
(mmdet3d's bottom-centre ``LiDARInstance3DBoxes``) and its result formatting reads that bottom centre; our
result formatting takes the gravity centre, so we keep it (the same physical box either way).

Decoding of one task (the reference's ``CenterPointBBoxCoder``): take the ``topk`` highest heatmap scores over
(class, row, column); at cell ``(row, col)`` the box is
``x = (col + reg_x) * cell_x + x_min``, ``y = (row + reg_y) * cell_y + y_min``, ``z = height``,
``(l, w, h) = exp(dim)``, ``yaw = atan2(sin, cos)``, velocity as predicted; keep scores ``> score_threshold`` whose
centre lies inside ``post_center_range``.

Scale-NMS per task: ``rotate`` tasks run greedy rotated-BEV-IoU NMS on boxes whose ``l, w`` are multiplied by a
per-class factor (small classes are enlarged so that near-duplicates overlap; the returned boxes keep their
predicted sizes); ``circle`` tasks suppress by squared centre distance.

On the box order given to the rotated IoU: the reference converts boxes to ``(x1, y1, x2, y2, yaw)`` with
``x2 - x1 = l`` and ``y2 - y1 = w`` and back to ``(cx, cy, l, w, yaw)`` before mmcv's ``nms_rotated``, whose
``(x, y, w, h, theta)`` box has its first size along the direction ``theta`` (its corners are the local corners
rotated by ``+theta``). So the reference's "w" slot holds our length and its IoU is the IoU of the boxes as
they are — no l/w swap. ``nms_rotated_bev`` takes ``[x, y, l, w, yaw]`` with the same meaning, so the IoUs agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from bevnext.errors import ConfigError
from bevnext.models.targets import TASKS, check_tasks
from bevnext.ops import circle_nms, nms_rotated_bev
from bevnext.structures.detections import Detections

__all__ = [
    "NMS_RESCALE_FACTOR",
    "NMS_THR",
    "NMS_TYPE",
    "MIN_RADIUS",
    "decode_boxes",
    "decode_task",
    "scale_nms",
]

NMS_TYPE: tuple[str, ...] = ("rotate", "rotate", "rotate", "circle", "rotate", "rotate")
"""Reference NMS kind per task of ``TASKS``."""
NMS_THR: tuple[float, ...] = (0.2, 0.2, 0.2, 0.2, 0.2, 0.5)
"""Reference rotated-IoU threshold per task (suppress when IoU > threshold)."""
NMS_RESCALE_FACTOR: tuple[float | tuple[float, ...], ...] = (1.0, (0.7, 0.7), (0.4, 0.55), 1.1, (1.0, 1.0), (4.5, 9.0))
"""Reference Scale-NMS size factors per task: one factor for the task, or one per class of the task."""
MIN_RADIUS: tuple[float, ...] = (4.0, 12.0, 10.0, 1.0, 0.85, 0.175)
"""Reference circle-NMS thresholds per task, on the **squared** centre distance (m^2); only circle tasks use it."""

_BOX = 9


def decode_task(
    heatmap: Tensor,
    preds: Mapping[str, Tensor],
    point_cloud_range: Sequence[float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
    voxel_size: Sequence[float] = (0.1, 0.1),
    out_size_factor: int = 8,
    score_threshold: float = 0.1,
    post_center_range: Sequence[float] | None = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0),
    topk: int = 500,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Candidate boxes of one task, before NMS.

    Args:
        heatmap: (B, k, Y, X) class scores in [0, 1] (after sigmoid).
        preds: ``{"reg": (B, 2, Y, X), "height": (B, 1, ..), "dim": (B, 3, ..), "rot": (B, 2, ..)}`` and optionally
            ``"vel": (B, 2, ..)`` (zeros when absent), as ``CenterHeadReg`` predicts them.
        point_cloud_range: BEV grid range; only ``x_min, y_min`` are used.
        voxel_size: ``(vx, vy[, ...])``; a cell is ``voxel_size * out_size_factor`` metres.
        out_size_factor: feature stride in voxels.
        score_threshold: keep scores strictly above this.
        post_center_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` the centre must lie in (inclusive);
            None disables the check.
        topk: candidates taken per sample (over class x cells).

    Returns:
        Per sample ``Detections(boxes (K, 9) float32, scores (K,), labels (K,) int64 class within the task)``, sorted by
        descending score.
    """
    b, k, grid_y, grid_x = heatmap.shape
    cells = grid_y * grid_x
    num = min(int(topk), k * cells)
    scores, flat = heatmap.reshape(b, k * cells).float().topk(num, dim=1)
    labels = flat // cells
    cell = flat % cells
    row = (cell // grid_x).to(torch.float32)
    col = (cell % grid_x).to(torch.float32)

    def at(name: str, channels: int) -> Tensor:
        value = preds.get(name)
        if value is None:
            return scores.new_zeros((b, num, channels))
        index = cell.unsqueeze(1).expand(b, channels, num)
        return value.float().reshape(b, channels, cells).gather(2, index).transpose(1, 2)

    reg = at("reg", 2)
    rot = at("rot", 2)
    step_x = out_size_factor * voxel_size[0]
    step_y = out_size_factor * voxel_size[1]
    xs = (col + reg[..., 0]) * step_x + point_cloud_range[0]
    ys = (row + reg[..., 1]) * step_y + point_cloud_range[1]
    boxes = torch.cat(
        (
            xs.unsqueeze(-1),
            ys.unsqueeze(-1),
            at("height", 1),
            torch.exp(at("dim", 3)),
            torch.atan2(rot[..., 0], rot[..., 1]).unsqueeze(-1),
            at("vel", 2),
        ),
        dim=-1,
    )
    keep = scores > score_threshold
    if post_center_range is not None:
        bounds = boxes.new_tensor(list(post_center_range))
        keep &= (boxes[..., :3] >= bounds[:3]).all(-1) & (boxes[..., :3] <= bounds[3:]).all(-1)
    return [(boxes[i][keep[i]], scores[i][keep[i]], labels[i][keep[i]]) for i in range(b)]


def scale_nms(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    nms_type: str,
    iou_threshold: float,
    rescale_factor: float | Sequence[float] = 1.0,
    circle_threshold: float = 1.0,
    pre_max_size: int | None = 1000,
    post_max_size: int | None = 83,
) -> Tensor:
    """Scale-NMS of one task's candidates.

    Args:
        boxes: (K, 9) ``[x, y, z, l, w, h, yaw, vx, vy]``.
        scores: (K,).
        labels: (K,) int64 class within the task (indexes a per-class ``rescale_factor``).
        nms_type: ``"rotate"`` (rotated BEV IoU) or ``"circle"`` (squared centre distance).
        iou_threshold: ``rotate``: suppress when IoU > threshold.
        rescale_factor: ``rotate``: factor on ``l`` and ``w`` before the IoU, one for all classes or one per class.
        circle_threshold: ``circle``: suppress when the squared centre distance <= threshold (m^2).
        pre_max_size: ``rotate``: only the best this many candidates take part (the reference applies no such
            limit to circle NMS).
        post_max_size: at most this many are kept.

    Returns:
        (num_kept,) int64 indices into ``boxes``, by descending score.
    """
    if nms_type == "circle":
        return circle_nms(boxes[:, :2], scores, circle_threshold, post_max_size)
    if nms_type != "rotate":
        raise ConfigError(f"nms_type must be 'rotate' or 'circle', got {nms_type!r}")
    if isinstance(rescale_factor, (int, float)):
        factor = boxes.new_full((boxes.shape[0],), float(rescale_factor))
    else:
        table = boxes.new_tensor([float(f) for f in rescale_factor])
        # Classes without a factor keep their size, as in the reference.
        in_table = (labels >= 0) & (labels < table.numel())
        factor = torch.where(in_table, table[labels.clamp(0, table.numel() - 1)], torch.ones_like(table[:1]))
    bev = torch.stack(
        (boxes[:, 0], boxes[:, 1], boxes[:, 3] * factor, boxes[:, 4] * factor, boxes[:, 6]), dim=1
    )
    return nms_rotated_bev(bev, scores, iou_threshold, pre_max_size, post_max_size)


def decode_boxes(
    heatmaps: Sequence[Tensor],
    reg_preds: Sequence[Mapping[str, Tensor]],
    tasks: Sequence[Sequence[int]] = TASKS,
    point_cloud_range: Sequence[float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
    voxel_size: Sequence[float] = (0.1, 0.1),
    out_size_factor: int = 8,
    score_threshold: float = 0.1,
    post_center_range: Sequence[float] | None = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0),
    topk: int = 500,
    nms_type: Sequence[str] = NMS_TYPE,
    nms_thr: Sequence[float] = NMS_THR,
    nms_rescale_factor: Sequence[float | Sequence[float]] = NMS_RESCALE_FACTOR,
    min_radius: Sequence[float] = MIN_RADIUS,
    pre_max_size: int | None = 1000,
    post_max_size: int | None = 83,
) -> list[Detections]:
    """Final detections per sample: decode every task, Scale-NMS it, concatenate the tasks.

    Args:
        heatmaps: per task (B, k_t, Y, X) scores after sigmoid (the proposal head's heatmaps).
        reg_preds: per task the ``CenterHeadReg`` outputs (see ``decode_task``).
        tasks: class groups (indices into ``CLASSES``); local label ``j`` of task ``t`` becomes ``tasks[t][j]``.
        point_cloud_range, voxel_size, out_size_factor, score_threshold, post_center_range, topk: see
            ``decode_task``.
        nms_type, nms_thr, nms_rescale_factor, min_radius: per task, see ``scale_nms`` (``min_radius`` is the
            circle threshold on the squared distance).
        pre_max_size, post_max_size: see ``scale_nms``.

    Returns:
        Per sample ``Detections(boxes (K, 9) float32 [x, y, z, l, w, h, yaw, vx, vy] key frame, gravity centre,
        scores (K,) float32, labels (K,) int64 indices into CLASSES)``, task by task, by descending score within
        a task.
    """
    check_tasks(tasks)
    num_tasks = len(tasks)
    for name, value in (
        ("heatmaps", heatmaps),
        ("reg_preds", reg_preds),
        ("nms_type", nms_type),
        ("nms_thr", nms_thr),
        ("nms_rescale_factor", nms_rescale_factor),
        ("min_radius", min_radius),
    ):
        if len(value) != num_tasks:
            raise ConfigError(f"{name} has {len(value)} entries for {num_tasks} tasks")
    for t, group in enumerate(tasks):
        if heatmaps[t].shape[1] != len(group):
            raise ValueError(f"heatmaps[{t}] has {heatmaps[t].shape[1]} channels for a task of {len(group)} classes")
        factor = nms_rescale_factor[t]
        if not isinstance(factor, (int, float)) and len(factor) != len(group):
            raise ConfigError(f"nms_rescale_factor[{t}] has {len(factor)} values for a task of {len(group)} classes")

    batch = heatmaps[0].shape[0]
    device = heatmaps[0].device
    per_sample: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(batch)]
    for t, group in enumerate(tasks):
        candidates = decode_task(
            heatmaps[t],
            reg_preds[t],
            point_cloud_range,
            voxel_size,
            out_size_factor,
            score_threshold,
            post_center_range,
            topk,
        )
        to_global = torch.tensor(group, dtype=torch.long, device=device)
        for i, (boxes, scores, labels) in enumerate(candidates):
            keep = scale_nms(
                boxes,
                scores,
                labels,
                nms_type[t],
                nms_thr[t],
                nms_rescale_factor[t],
                min_radius[t],
                pre_max_size,
                post_max_size,
            )
            per_sample[i].append((boxes[keep], scores[keep], to_global[labels[keep]]))
    return [
        Detections(
            torch.cat([p[0] for p in parts]).reshape(-1, _BOX),
            torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]),
        )
        for parts in per_sample
    ]
