"""CenterPoint-style heads: the proposal (heatmap) head and the box-regression head (reference §2.7, §2.9).

Both heads work on BEV maps ``(B, C, Y, X)`` on the key-ego BEV grid (reference: 128 x 128 cells of 0.8 m; row
``y`` along +y, column ``x`` along +x). Each has a shared 3x3 conv + BN + ReLU to ``head_channels`` and one
``SeparateHead`` per task (class group, see ``bevnext.models.targets.TASKS``).

* ``CenterHeadProposal`` predicts one heatmap per task from the BEV-encoder output (256 channels).
* ``CenterHeadReg`` predicts the box parameters per task (``reg`` sub-cell offset, ``height`` = gravity-centre z,
  ``dim`` = log sizes, ``rot`` = (sin, cos) of yaw, ``vel``) from the refined BEV (C channels). It has no
  heatmap branch: decoding uses the proposal heatmaps (``bevnext.models.decode``).

State-dict names and shapes equal the reference's (``shared_conv.conv.weight``, ``shared_conv.bn.*``,
``task_heads.{t}.{branch}.0.conv.weight``, ``.0.bn.*``, ``.1.weight``, ``.1.bias``), so reference weights load
without a key map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from bevnext.models.blocks import ConvBNReLU, check_config
from bevnext.models.losses import ReduceFn, clip_sigmoid, gaussian_focal_loss, regression_losses
from bevnext.models.targets import REG_TARGET_DIM, TASKS, TaskTargets, check_tasks

__all__ = ["REG_BRANCHES", "CenterHeadProposal", "CenterHeadReg", "SeparateHead", "gather_cells"]

REG_BRANCHES: dict[str, int] = {"reg": 2, "height": 1, "dim": 3, "rot": 2, "vel": 2}
"""Regression branches and their channels, in the order their outputs concatenate into the target layout
``[x_frac, y_frac, z, log l, log w, log h, sin, cos, vx, vy]``."""


def _init_conv(conv: nn.Conv2d) -> None:
    # The reference's Kaiming init (mmcv defaults): normal, fan_out, ReLU gain, zero bias.
    nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _head_conv(in_channels: int, out_channels: int, kernel_size: int) -> ConvBNReLU:
    """Conv (no bias) -> BN -> ReLU with the reference's head init; keys ``conv.*``, ``bn.*``.

    (B, in_channels, H, W) -> (B, out_channels, H, W).
    """
    unit = ConvBNReLU(in_channels, out_channels, kernel_size)
    # Initialised right after construction, before the next layer is built, so seeded runs draw the same weights.
    _init_conv(unit.conv)
    return unit


class SeparateHead(nn.Module):
    """One task's output branches, each conv/BN/ReLU (``head_channels``) x (num_convs - 1), then a conv with bias.

    Args:
        in_channels: input channels (the shared conv's output).
        branches: branch name -> output channels, in state-dict order (e.g. ``{"heatmap": k}``).
        head_channels: width of the intermediate convs (64).
        final_kernel: kernel size of every conv of a branch (3).
        num_convs: convs per branch including the last (2).
        init_bias: initial bias of the last conv of a ``"heatmap"`` branch (-2.19: sigmoid ~ 0.1, so the
            untrained heatmap starts near the background rate instead of 0.5).
        heatmap_init_std: None keeps the reference's Kaiming init of that conv's weights (initial logits spread by
            several units around the bias); a value draws them from N(0, std^2) instead, so that every cell starts
            at the bias (CenterNet's choice).
    """

    def __init__(
        self,
        in_channels: int,
        branches: Mapping[str, int],
        head_channels: int = 64,
        final_kernel: int = 3,
        num_convs: int = 2,
        init_bias: float = -2.19,
        heatmap_init_std: float | None = None,
    ) -> None:
        super().__init__()
        check_config(len(branches) > 0, "SeparateHead: branches must name at least one output")
        check_config(num_convs >= 1, f"SeparateHead: num_convs must be >= 1, got {num_convs}")
        check_config(head_channels >= 1, f"SeparateHead: head_channels must be >= 1, got {head_channels}")
        check_config(
            final_kernel >= 1 and final_kernel % 2 == 1, f"SeparateHead: final_kernel must be odd, got {final_kernel}"
        )
        self.branch_names = tuple(branches)
        for name, out_channels in branches.items():
            check_config(
                out_channels >= 1, f"SeparateHead: branch {name!r} needs >= 1 output channels, got {out_channels}"
            )
            layers: list[nn.Module] = []
            prev = in_channels
            for _ in range(num_convs - 1):
                layers.append(_head_conv(prev, head_channels, final_kernel))
                prev = head_channels
            last = nn.Conv2d(prev, out_channels, final_kernel, padding=final_kernel // 2, bias=True)
            _init_conv(last)
            if name == "heatmap":
                nn.init.constant_(last.bias, init_bias)
                if heatmap_init_std is not None:
                    nn.init.normal_(last.weight, std=heatmap_init_std)
            layers.append(last)
            self.add_module(name, nn.Sequential(*layers))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(B, in_channels, Y, X) -> {branch: (B, channels, Y, X)}."""
        return {name: getattr(self, name)(x) for name in self.branch_names}


def gather_cells(feature: Tensor, index: Tensor) -> Tensor:
    """Values of a map at flat cell indices.

    Args:
        feature: (B, C, Y, X).
        index: (B, M) int64 flat indices ``row * X + column``.

    Returns:
        (B, M, C).
    """
    b, c = feature.shape[:2]
    flat = feature.reshape(b, c, -1)
    return flat.gather(2, index.unsqueeze(1).expand(b, c, index.shape[1])).transpose(1, 2)


class CenterHeadProposal(nn.Module):
    """Proposal head: per-task class heatmaps (logits) from the BEV-encoder output.

    Args:
        in_channels: input channels (256, the BEV neck width).
        tasks: class groups (indices into ``CLASSES``); task ``t`` predicts ``len(tasks[t])`` heatmaps.
        head_channels: shared conv and branch width (64).
        final_kernel: branch conv kernel size (3).
        init_bias: initial bias of the heatmap logits (-2.19).
        heatmap_init_std: see ``SeparateHead`` (None: the reference's Kaiming init).
    """

    def __init__(
        self,
        in_channels: int = 256,
        tasks: Sequence[Sequence[int]] = TASKS,
        head_channels: int = 64,
        final_kernel: int = 3,
        init_bias: float = -2.19,
        heatmap_init_std: float | None = None,
    ) -> None:
        super().__init__()
        check_tasks(tasks)
        check_config(in_channels >= 1, f"CenterHeadProposal: in_channels must be >= 1, got {in_channels}")
        self.tasks = tuple(tuple(group) for group in tasks)
        self.shared_conv = _head_conv(in_channels, head_channels, 3)
        self.task_heads = nn.ModuleList(
            SeparateHead(head_channels, {"heatmap": len(group)}, head_channels, final_kernel, 2, init_bias,
                         heatmap_init_std)
            for group in self.tasks
        )

    def forward(self, x: Tensor) -> list[dict[str, Tensor]]:
        """Heatmap logits per task.

        Args:
            x: (B, in_channels, Y, X) BEV features.

        Returns:
            Per task ``{"heatmap": (B, k_t, Y, X)}`` logits (apply ``sigmoid`` for scores).
        """
        shared = self.shared_conv(x)
        return [head(shared) for head in self.task_heads]

    def loss(
        self,
        preds: Sequence[Mapping[str, Tensor]],
        targets: Sequence[TaskTargets],
        reduce_fn: ReduceFn | None = None,
    ) -> dict[str, Tensor]:
        """Gaussian focal loss of every task's heatmap (computed in float32).

        Args:
            preds: ``forward`` output.
            targets: one ``TaskTargets`` per task (``TargetBuilder``).
            reduce_fn: averages positive counts over processes (see ``bevnext.models.losses``).

        Returns:
            ``{"task{t}.loss_heatmap": 0-d tensor}``.
        """
        _check_lengths(len(self.tasks), preds, targets)
        losses = {}
        for t, (pred, target) in enumerate(zip(preds, targets)):
            prob = clip_sigmoid(pred["heatmap"].float())
            losses[f"task{t}.loss_heatmap"] = gaussian_focal_loss(prob, target.heatmap.float(), reduce_fn=reduce_fn)
        return losses


class CenterHeadReg(nn.Module):
    """Regression head: per-task box parameters at every BEV cell, from the refined BEV.

    Args:
        in_channels: input channels (C: 80 stage 1, 160 stage 2).
        tasks: class groups (as for ``CenterHeadProposal``).
        head_channels: shared conv and branch width (64).
        branches: branch name -> channels; must be ``REG_BRANCHES`` (the loss relies on this layout).
        final_kernel: branch conv kernel size (3).
        code_weights: 10 L1 weights of ``[x_frac, y_frac, z, log l, log w, log h, sin, cos, vx, vy]``, from the
            model config (``ModelConfig.code_weights``; the reference uses 0.2 for velocity in stage 1, 1 in stage 2).
        loss_weight: overall L1 weight (0.25).
    """

    def __init__(
        self,
        in_channels: int,
        tasks: Sequence[Sequence[int]] = TASKS,
        head_channels: int = 64,
        branches: Mapping[str, int] = REG_BRANCHES,
        final_kernel: int = 3,
        *,
        code_weights: Sequence[float],
        loss_weight: float = 0.25,
    ) -> None:
        super().__init__()
        check_tasks(tasks)
        check_config(in_channels >= 1, f"CenterHeadReg: in_channels must be >= 1, got {in_channels}")
        check_config(
            list(branches.items()) == list(REG_BRANCHES.items()),
            f"CenterHeadReg: branches must be {REG_BRANCHES} (in this order), got {dict(branches)}",
        )
        check_config(
            len(code_weights) == REG_TARGET_DIM and all(w >= 0 for w in code_weights),
            f"CenterHeadReg: code_weights must be {REG_TARGET_DIM} non-negative values, got {tuple(code_weights)}",
        )
        check_config(loss_weight >= 0, f"CenterHeadReg: loss_weight must be >= 0, got {loss_weight}")
        self.tasks = tuple(tuple(group) for group in tasks)
        self.code_weights = tuple(float(w) for w in code_weights)
        self.loss_weight = float(loss_weight)
        self.shared_conv = _head_conv(in_channels, head_channels, 3)
        self.task_heads = nn.ModuleList(
            SeparateHead(head_channels, branches, head_channels, final_kernel, 2) for _ in self.tasks
        )

    def forward(self, x: Tensor) -> list[dict[str, Tensor]]:
        """Box parameters per task.

        Args:
            x: (B, in_channels, Y, X) refined BEV features.

        Returns:
            Per task ``{"reg": (B, 2, Y, X), "height": (B, 1, ..), "dim": (B, 3, ..), "rot": (B, 2, ..),
            "vel": (B, 2, ..)}``: sub-cell offset (cells), gravity-centre z (m), log (l, w, h), (sin, cos) of
            yaw, velocity (m/s), all in the key frame.
        """
        shared = self.shared_conv(x)
        return [head(shared) for head in self.task_heads]

    def loss(
        self,
        preds: Sequence[Mapping[str, Tensor]],
        targets: Sequence[TaskTargets],
        reduce_fn: ReduceFn | None = None,
    ) -> dict[str, Tensor]:
        """L1 losses of every task's box parameters at the object cells (computed in float32).

        Args:
            preds: ``forward`` output.
            targets: one ``TaskTargets`` per task (``TargetBuilder``).
            reduce_fn: averages object counts over processes (see ``bevnext.models.losses``).

        Returns:
            ``{"task{t}.loss_xy", "task{t}.loss_z", "task{t}.loss_whl", "task{t}.loss_yaw", "task{t}.loss_vel"}``
            0-d tensors.
        """
        _check_lengths(len(self.tasks), preds, targets)
        losses: dict[str, Tensor] = {}
        for t, (pred, target) in enumerate(zip(preds, targets)):
            maps = torch.cat([pred[name].float() for name in REG_BRANCHES], dim=1)  # (B, 10, Y, X)
            gathered = gather_cells(maps, target.index)
            losses.update(
                regression_losses(
                    gathered,
                    target.reg_target.float(),
                    target.mask,
                    self.code_weights,
                    self.loss_weight,
                    reduce_fn,
                    prefix=f"task{t}.",
                )
            )
        return losses


def _check_lengths(num_tasks: int, preds: Sequence, targets: Sequence) -> None:
    if len(preds) != num_tasks or len(targets) != num_tasks:
        raise ValueError(f"expected {num_tasks} tasks, got {len(preds)} predictions and {len(targets)} targets")
