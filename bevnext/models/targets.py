"""CenterPoint training targets of the proposal and regression heads (reference §2.7, §2.9).

Frames: ground-truth boxes are ``[x, y, z, l, w, h, yaw, vx, vy]`` in the (BEV-augmented) key ego frame
(x forward, y left, z up; ``z`` is the gravity centre; ``bevnext.structures.boxes``). The BEV target map is
``(Y, X)`` cells: column ``x`` covers ``[x_min + x * cx, x_min + (x + 1) * cx)`` with the cell size
``cx = voxel_size[0] * out_size_factor`` (0.8 m in the reference), likewise rows along y. Flat cell indices are
``row * X + column``, i.e. the order of ``feature.flatten(2)`` of a ``(B, C, Y, X)`` map.

Per task (a group of classes sharing one heatmap head) and sample the targets are:

* a heatmap ``(k, Y, X)`` with one Gaussian splat per object in its class channel (max-composited);
* for up to ``max_objs`` objects, in slot ``i``: the object's flat cell ``index[i]``, ``mask[i]`` (the slot holds
  an object) and the regression target ``reg_target[i]`` =
  ``[x_frac, y_frac, z, log l, log w, log h, sin yaw, cos yaw, vx, vy]`` where ``(x_frac, y_frac)`` is the
  centre's offset inside its cell, in cells (``[0, 1)``).

Objects fill the slots in the reference's order: grouped by class in the task's class order, then in input
order; the slot of a skipped object (centre off the map, or a non-positive size) stays empty (mask False).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bevnext.errors import ConfigError
from bevnext.ops import draw_gaussians, heatmap_radius
from bevnext.structures import CLASSES

__all__ = ["REG_TARGET_DIM", "TASKS", "TargetBuilder", "TaskTargets", "check_tasks"]

TASKS: tuple[tuple[int, ...], ...] = ((0,), (1, 2), (3, 4), (5,), (6, 7), (8, 9))
"""The reference's class groups, as indices into ``bevnext.structures.CLASSES``: [car], [truck,
construction_vehicle], [bus, trailer], [barrier], [motorcycle, bicycle], [pedestrian, traffic_cone]. Within a
task, class ``j`` is heatmap channel ``j``."""

REG_TARGET_DIM = 10
"""Length of a regression target: ``[x_frac, y_frac, z, log l, log w, log h, sin yaw, cos yaw, vx, vy]``."""


def check_tasks(tasks: Sequence[Sequence[int]], num_classes: int = len(CLASSES), name: str = "tasks") -> None:
    """Raise ConfigError unless ``tasks`` is a non-empty list of non-empty, disjoint class-index groups.

    Args:
        tasks: class groups, each a sequence of indices into the ``num_classes`` detection classes.
        num_classes: number of detection classes.
        name: the argument name used in the error message.
    """
    if len(tasks) == 0:
        raise ConfigError(f"{name}: expected at least one task (class group)")
    seen: set[int] = set()
    for t, group in enumerate(tasks):
        if len(group) == 0:
            raise ConfigError(f"{name}[{t}] is empty; every task needs at least one class")
        for cls in group:
            if not isinstance(cls, int) or not 0 <= cls < num_classes:
                raise ConfigError(f"{name}[{t}] contains {cls!r}; expected class indices in [0, {num_classes})")
            if cls in seen:
                raise ConfigError(f"{name}: class {cls} appears in more than one task (or twice in one)")
            seen.add(cls)


@dataclass(frozen=True)
class TaskTargets:
    """Batched targets of one task.

    Attributes:
        heatmap: (B, k, Y, X) float32 Gaussian heatmap, 1 exactly at object centre cells.
        reg_target: (B, max_objs, 10) float32 ``[x_frac, y_frac, z, log l, log w, log h, sin, cos, vx, vy]``;
            zeros in empty slots.
        index: (B, max_objs) int64 flat cell ``row * X + column`` of each slot (0 in empty slots).
        mask: (B, max_objs) bool, True where the slot holds an object.
    """

    heatmap: Tensor
    reg_target: Tensor
    index: Tensor
    mask: Tensor


class TargetBuilder:
    """Builds ``TaskTargets`` for every task from ground-truth boxes, vectorised over objects and samples.

    Args:
        tasks: class groups (indices into ``CLASSES``); the reference uses ``TASKS``.
        point_cloud_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` of the BEV grid, metres, key frame.
        voxel_size: ``(vx, vy[, vz])`` of the reference's voxel grid; only x and y are used.
        out_size_factor: stride of the head's feature map in voxels; the target cell is
            ``voxel_size * out_size_factor`` (reference: 0.1 m * 8 = 0.8 m -> 128 x 128).
        gaussian_overlap: ``min_overlap`` of the CenterNet radius rule (0.1).
        min_radius: smallest splat radius in cells (2).
        max_objs: object slots per task and sample (500); later objects are dropped.
        num_classes: number of detection classes (labels outside ``[0, num_classes)`` are ignored).

    Raises:
        ConfigError: a value out of range, or a range that is not a whole number of cells.
    """

    def __init__(
        self,
        tasks: Sequence[Sequence[int]] = TASKS,
        point_cloud_range: Sequence[float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
        voxel_size: Sequence[float] = (0.1, 0.1, 0.2),
        out_size_factor: int = 8,
        gaussian_overlap: float = 0.1,
        min_radius: int = 2,
        max_objs: int = 500,
        num_classes: int = len(CLASSES),
    ) -> None:
        check_tasks(tasks, num_classes)
        if len(point_cloud_range) != 6:
            raise ConfigError(f"point_cloud_range must have 6 values, got {len(point_cloud_range)}")
        if len(voxel_size) < 2 or voxel_size[0] <= 0 or voxel_size[1] <= 0:
            raise ConfigError(f"voxel_size must start with two positive values (vx, vy), got {tuple(voxel_size)}")
        if out_size_factor < 1:
            raise ConfigError(f"out_size_factor must be >= 1, got {out_size_factor}")
        if not 0.0 < gaussian_overlap < 1.0:
            raise ConfigError(f"gaussian_overlap must be in (0, 1), got {gaussian_overlap}")
        if min_radius < 0:
            raise ConfigError(f"min_radius must be >= 0, got {min_radius}")
        if max_objs < 1:
            raise ConfigError(f"max_objs must be >= 1, got {max_objs}")
        self.tasks = tuple(tuple(int(c) for c in group) for group in tasks)
        self.point_cloud_range = tuple(float(v) for v in point_cloud_range)
        self.voxel_size = (float(voxel_size[0]), float(voxel_size[1]))
        self.out_size_factor = int(out_size_factor)
        self.gaussian_overlap = float(gaussian_overlap)
        self.min_radius = int(min_radius)
        self.max_objs = int(max_objs)
        self.num_classes = int(num_classes)
        self.grid_shape = (self._cells(1), self._cells(0))

        # class index -> (task, channel within the task); -1 for classes in no task.
        self._task_of = torch.full((num_classes,), -1, dtype=torch.long)
        self._channel_of = torch.full((num_classes,), -1, dtype=torch.long)
        for t, group in enumerate(self.tasks):
            for j, cls in enumerate(group):
                self._task_of[cls] = t
                self._channel_of[cls] = j

    def _cells(self, axis: int) -> int:
        """Feature cells along x (axis 0) or y (axis 1); the range must be a whole number of them."""
        extent = self.point_cloud_range[axis + 3] - self.point_cloud_range[axis]
        voxels = extent / self.voxel_size[axis]
        name = "xy"[axis]
        if extent <= 0 or abs(voxels - round(voxels)) > 1e-6:
            raise ConfigError(
                f"point_cloud_range / voxel_size: the {name} extent {extent:g} m is not a positive whole number of "
                f"{self.voxel_size[axis]:g} m voxels"
            )
        voxels = int(round(voxels))
        if voxels % self.out_size_factor:
            raise ConfigError(
                f"out_size_factor={self.out_size_factor} does not divide the {voxels} voxels along {name}"
            )
        return voxels // self.out_size_factor

    def __call__(self, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor]) -> list[TaskTargets]:
        """Targets for a batch, built for all samples at once (a few host synchronisations per task, not per sample).

        Args:
            gt_boxes: B tensors (M_b, 9) ``[x, y, z, l, w, h, yaw, vx, vy]`` (gravity centre, key frame).
            gt_labels: B tensors (M_b,) int64 indices into ``CLASSES``.

        Returns:
            One ``TaskTargets`` per task, on the device of ``gt_boxes[0]``.
        """
        if len(gt_boxes) != len(gt_labels):
            raise ValueError(f"got {len(gt_boxes)} box tensors but {len(gt_labels)} label tensors")
        if len(gt_boxes) == 0:
            raise ValueError("targets need at least one sample")
        for b, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
            if boxes.ndim != 2 or boxes.shape[1] != 9:
                raise ValueError(f"boxes of sample {b} must be (M, 9), got {tuple(boxes.shape)}")
            if labels.shape != boxes.shape[:1]:
                raise ValueError(f"labels of sample {b} must be ({boxes.shape[0]},), got {tuple(labels.shape)}")
        device = gt_boxes[0].device
        batch = len(gt_boxes)
        counts = [int(b.shape[0]) for b in gt_boxes]
        # The reference computes targets in float32; doing the same keeps cells and offsets bit-identical.
        boxes = torch.cat([b.to(device=device, dtype=torch.float32) for b in gt_boxes])
        labels = torch.cat([lab.to(device=device, dtype=torch.long) for lab in gt_labels])
        sample = torch.repeat_interleave(
            torch.arange(batch, device=device), torch.tensor(counts, device=device), output_size=sum(counts)
        )
        known = (labels >= 0) & (labels < self.num_classes)
        safe_labels = torch.where(known, labels, torch.zeros_like(labels))
        task_of = torch.where(known, self._task_of.to(device)[safe_labels], torch.full_like(labels, -1))
        channel_of = self._channel_of.to(device)[safe_labels]
        return [self._task_targets(t, boxes, sample, task_of, channel_of, batch) for t in range(len(self.tasks))]

    def _task_targets(
        self, t: int, boxes: Tensor, sample: Tensor, task_of: Tensor, channel_of: Tensor, batch: int
    ) -> TaskTargets:
        """Task ``t``'s targets from the batch's boxes (M, 9), their sample (M,), task (M,) and channel (M,)."""
        device = boxes.device
        grid_y, grid_x = self.grid_shape
        x_min, y_min = self.point_cloud_range[0], self.point_cloud_range[1]
        vx, vy = self.voxel_size
        factor = self.out_size_factor
        k = len(self.tasks[t])
        heatmap = boxes.new_zeros((batch, k, grid_y, grid_x))
        reg_target = boxes.new_zeros((batch, self.max_objs, REG_TARGET_DIM))
        index = torch.zeros((batch, self.max_objs), dtype=torch.long, device=device)
        mask = torch.zeros((batch, self.max_objs), dtype=torch.bool, device=device)

        members = torch.nonzero(task_of == t).squeeze(1)
        # Slot order of the reference, per sample: class by class (task order), input order within a class.
        members = members[torch.sort(sample[members] * k + channel_of[members], stable=True).indices]
        owner = sample[members]
        per_sample = torch.bincount(owner, minlength=batch)
        slot = torch.arange(members.numel(), device=device) - (torch.cumsum(per_sample, 0) - per_sample)[owner]
        kept = slot < self.max_objs  # later objects of a sample are dropped, as in the reference
        members, owner, slot = members[kept], owner[kept], slot[kept]
        if members.numel() == 0:
            return TaskTargets(heatmap, reg_target, index, mask)
        box = boxes[members]
        cls = channel_of[members]
        # Same operation order as the reference (float32), so cells and offsets match it exactly.
        length_cells = box[:, 3] / vx / factor
        width_cells = box[:, 4] / vy / factor
        centre = torch.stack(((box[:, 0] - x_min) / vx / factor, (box[:, 1] - y_min) / vy / factor), 1)
        # floor, not the reference's truncation toward zero: a centre up to one cell below the lower
        # bound would otherwise land in cell 0 (never happens after the object range filter).
        cell = torch.floor(centre).to(torch.long)
        valid = (
            (length_cells > 0)
            & (width_cells > 0)
            & (box[:, 5] > 0)  # log h must be finite
            & (cell[:, 0] >= 0)
            & (cell[:, 0] < grid_x)
            & (cell[:, 1] >= 0)
            & (cell[:, 1] < grid_y)
        )
        # The radius rule is symmetric in its two sizes; the reference passes (w, l).
        radius = heatmap_radius(width_cells, length_cells, self.gaussian_overlap, self.min_radius)
        # One splat call for the whole batch: channel ``sample * k + class`` of the (B*k, Y, X) view; invalid
        # objects get channel -1, which draw_gaussians skips (no boolean indexing, no extra synchronisation).
        channel = torch.where(valid, owner * k + cls, torch.full_like(cls, -1))
        draw_gaussians(heatmap.view(batch * k, grid_y, grid_x), cell, radius, channel)

        yaw = box[:, 6]
        dims = torch.where(valid[:, None], box[:, 3:6], torch.ones_like(box[:, 3:6]))
        target = torch.cat(
            (
                centre - cell.to(centre.dtype),
                box[:, 2:3],
                torch.log(dims),
                torch.sin(yaw)[:, None],
                torch.cos(yaw)[:, None],
                box[:, 7:9],
            ),
            dim=1,
        )
        reg_target[owner, slot] = torch.where(valid[:, None], target, torch.zeros_like(target))
        index[owner, slot] = torch.where(valid, cell[:, 1] * grid_x + cell[:, 0], torch.zeros_like(cell[:, 0]))
        mask[owner, slot] = valid
        return TaskTargets(heatmap, reg_target, index, mask)

    def __repr__(self) -> str:
        return (
            f"TargetBuilder(tasks={self.tasks}, point_cloud_range={self.point_cloud_range}, "
            f"voxel_size={self.voxel_size}, out_size_factor={self.out_size_factor}, grid_shape={self.grid_shape}, "
            f"gaussian_overlap={self.gaussian_overlap}, min_radius={self.min_radius}, max_objs={self.max_objs})"
        )

