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
from dataclasses import dataclass

import torch
from torch import Tensor

from bevnext.errors import ConfigError
from bevnext.models.targets import TASKS, check_tasks
from bevnext.ops import circle_nms, nms_rotated_bev
from bevnext.structures.boxes import BOX_DIM
from bevnext.structures.detections import Detections

__all__ = [
    "REFERENCE_TASK_DECODING",
    "DecodeConfig",
    "TaskDecoding",
    "decode_boxes",
    "decode_task",
    "post_center_range_for",
    "scale_nms",
]


@dataclass(frozen=True)
class TaskDecoding:
    """How the boxes of one task (class group) are decoded and suppressed.

    Attributes:
        classes: the task's classes as indices into ``CLASSES``; local label ``j`` is ``classes[j]``.
        nms_type: ``"rotate"`` (rotated BEV IoU) or ``"circle"`` (squared centre distance).
        iou_threshold: ``rotate``: suppress when IoU > threshold.
        rescale_factors: ``rotate``: one factor on ``l`` and ``w`` per class before the IoU (Scale-NMS).
        circle_threshold: ``circle``: suppress when the squared centre distance <= threshold (m^2).
    """

    classes: tuple[int, ...]
    nms_type: str = "rotate"
    iou_threshold: float = 0.2
    rescale_factors: tuple[float, ...] = ()
    circle_threshold: float = 1.0

    def __post_init__(self) -> None:
        if self.nms_type not in ("rotate", "circle"):
            raise ConfigError(f"nms_type must be 'rotate' or 'circle', got {self.nms_type!r}")
        if not self.rescale_factors:
            object.__setattr__(self, "rescale_factors", (1.0,) * len(self.classes))
        if len(self.rescale_factors) != len(self.classes):
            raise ConfigError(
                f"rescale_factors {self.rescale_factors} need one value per class of the task {self.classes}"
            )


def _reference_tasks() -> tuple[TaskDecoding, ...]:
    # The reference's per-task settings, in the order of TASKS: car, truck + construction vehicle, bus + trailer,
    # barrier, motorcycle + bicycle, pedestrian + traffic cone. A task-wide factor is repeated per class.
    nms_type = ("rotate", "rotate", "rotate", "circle", "rotate", "rotate")
    iou = (0.2, 0.2, 0.2, 0.2, 0.2, 0.5)
    factors = ((1.0,), (0.7, 0.7), (0.4, 0.55), (1.1,), (1.0, 1.0), (4.5, 9.0))
    circle = (4.0, 12.0, 10.0, 1.0, 0.85, 0.175)
    return tuple(
        TaskDecoding(classes, kind, thr, factor * (len(classes) // len(factor)), radius)
        for classes, kind, thr, factor, radius in zip(TASKS, nms_type, iou, factors, circle)
    )


REFERENCE_TASK_DECODING: tuple[TaskDecoding, ...] = _reference_tasks()
"""The reference's decoding of the six tasks of ``TASKS`` (its ``test_cfg``)."""


@dataclass(frozen=True)
class DecodeConfig:
    """Everything decoding needs besides the head outputs; ``build_model`` builds it from the model config.

    Attributes:
        grid_lower: ``(x_min, y_min)`` of the BEV grid in the key frame (metres).
        cell_size: ``(dx, dy)`` of a heatmap cell (metres).
        tasks: one ``TaskDecoding`` per task, in the heads' task order.
        post_center_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` a box centre must lie in (inclusive);
            None disables the check.
        score_threshold: keep scores strictly above this.
        topk: candidates taken per sample and task (over class x cells).
        pre_max_size: ``rotate`` NMS: only the best this many candidates take part (None: all).
        post_max_size: at most this many boxes kept per task (None: all).
    """

    grid_lower: tuple[float, float] = (-51.2, -51.2)
    cell_size: tuple[float, float] = (0.8, 0.8)
    tasks: tuple[TaskDecoding, ...] = REFERENCE_TASK_DECODING
    post_center_range: tuple[float, ...] | None = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    score_threshold: float = 0.1
    topk: int = 500
    pre_max_size: int | None = 1000
    post_max_size: int | None = 83

    def __post_init__(self) -> None:
        check_tasks([t.classes for t in self.tasks])
        if self.post_center_range is not None and len(self.post_center_range) != 6:
            raise ConfigError(f"post_center_range must have 6 values, got {self.post_center_range}")


def post_center_range_for(point_cloud_range: Sequence[float], margin: float = 10.0) -> tuple[float, ...]:
    """The reference's ``post_center_range``: the grid widened by ``margin`` metres in x and y, z within +-margin.

    ``(-51.2, -51.2, -5, 51.2, 51.2, 3)`` gives ``(-61.2, -61.2, -10, 61.2, 61.2, 10)``.
    """
    x0, y0, _, x1, y1, _ = (float(v) for v in point_cloud_range)
    return (x0 - margin, y0 - margin, -margin, x1 + margin, y1 + margin, margin)


def decode_task(
    heatmap: Tensor, preds: Mapping[str, Tensor], cfg: DecodeConfig = DecodeConfig()
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Candidate boxes of one task, before NMS.

    Args:
        heatmap: (B, k, Y, X) class scores in [0, 1] (after sigmoid).
        preds: ``{"reg": (B, 2, Y, X), "height": (B, 1, ..), "dim": (B, 3, ..), "rot": (B, 2, ..)}`` and optionally
            ``"vel": (B, 2, ..)`` (zeros when absent), as ``CenterHeadReg`` predicts them.
        cfg: grid, score threshold, centre range and ``topk`` (the task settings are not used here).

    Returns:
        Per sample ``(boxes (K, 9) float32, scores (K,), labels (K,) int64 class within the task)``, sorted by
        descending score.
    """
    b, k, grid_y, grid_x = heatmap.shape
    cells = grid_y * grid_x
    num = min(int(cfg.topk), k * cells)
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
    xs = (col + reg[..., 0]) * cfg.cell_size[0] + cfg.grid_lower[0]
    ys = (row + reg[..., 1]) * cfg.cell_size[1] + cfg.grid_lower[1]
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
    keep = scores > cfg.score_threshold
    if cfg.post_center_range is not None:
        bounds = boxes.new_tensor(list(cfg.post_center_range))
        keep &= (boxes[..., :3] >= bounds[:3]).all(-1) & (boxes[..., :3] <= bounds[3:]).all(-1)
    return [(boxes[i][keep[i]], scores[i][keep[i]], labels[i][keep[i]]) for i in range(b)]


def scale_nms(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    task: TaskDecoding,
    pre_max_size: int | None = 1000,
    post_max_size: int | None = 83,
) -> Tensor:
    """Scale-NMS of one task's candidates.

    Args:
        boxes: (K, 9) ``[x, y, z, l, w, h, yaw, vx, vy]``.
        scores: (K,).
        labels: (K,) int64 class within the task (indexes ``task.rescale_factors``).
        task: the task's NMS settings.
        pre_max_size: ``rotate``: only the best this many candidates take part (the reference applies no such
            limit to circle NMS).
        post_max_size: at most this many are kept.

    Returns:
        (num_kept,) int64 indices into ``boxes``, by descending score.
    """
    if task.nms_type == "circle":
        return circle_nms(boxes[:, :2], scores, task.circle_threshold, post_max_size)
    table = boxes.new_tensor([float(f) for f in task.rescale_factors])
    # Labels outside the task keep their size, as in the reference.
    in_table = (labels >= 0) & (labels < table.numel())
    factor = torch.where(in_table, table[labels.clamp(0, table.numel() - 1)], torch.ones_like(table[:1]))
    bev = torch.stack(
        (boxes[:, 0], boxes[:, 1], boxes[:, 3] * factor, boxes[:, 4] * factor, boxes[:, 6]), dim=1
    )
    return nms_rotated_bev(bev, scores, task.iou_threshold, pre_max_size, post_max_size)


def decode_boxes(
    heatmaps: Sequence[Tensor], reg_preds: Sequence[Mapping[str, Tensor]], cfg: DecodeConfig = DecodeConfig()
) -> list[Detections]:
    """Final detections per sample: decode every task, Scale-NMS it, concatenate the tasks.

    Args:
        heatmaps: per task (B, k_t, Y, X) scores after sigmoid (the proposal head's heatmaps).
        reg_preds: per task the ``CenterHeadReg`` outputs (see ``decode_task``).
        cfg: the grid and the per-task settings; ``cfg.tasks[t]`` describes heatmap ``t``.

    Returns:
        Per sample ``Detections(boxes (K, 9) float32 [x, y, z, l, w, h, yaw, vx, vy] key frame, gravity centre,
        scores (K,) float32, labels (K,) int64 indices into CLASSES)``, task by task, by descending score within
        a task.
    """
    num_tasks = len(cfg.tasks)
    for name, value in (("heatmaps", heatmaps), ("reg_preds", reg_preds)):
        if len(value) != num_tasks:
            raise ValueError(f"{name} has {len(value)} entries for {num_tasks} tasks")
    for t, task in enumerate(cfg.tasks):
        if heatmaps[t].shape[1] != len(task.classes):
            raise ValueError(
                f"heatmaps[{t}] has {heatmaps[t].shape[1]} channels for a task of {len(task.classes)} classes"
            )

    batch = heatmaps[0].shape[0]
    device = heatmaps[0].device
    per_sample: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(batch)]
    for t, task in enumerate(cfg.tasks):
        to_global = torch.tensor(task.classes, dtype=torch.long, device=device)
        for i, (boxes, scores, labels) in enumerate(decode_task(heatmaps[t], reg_preds[t], cfg)):
            keep = scale_nms(boxes, scores, labels, task, cfg.pre_max_size, cfg.post_max_size)
            per_sample[i].append((boxes[keep], scores[keep], to_global[labels[keep]]))
    return [
        Detections(
            torch.cat([p[0] for p in parts]).reshape(-1, BOX_DIM),
            torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]),
        )
        for parts in per_sample
    ]
