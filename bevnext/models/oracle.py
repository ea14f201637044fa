"""Head outputs of a perfect detector: the ground truth encoded exactly as the heads are trained to predict it.

Decoding these must give the ground-truth boxes back, so they test everything downstream of the network —
decoding, Scale-NMS, result formatting and the official evaluation — with known answers (mAP 1.0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bevnext.models.heads import REG_BRANCHES
from bevnext.models.targets import TaskTargets

__all__ = ["oracle_head_outputs"]

# sigmoid(30) rounds to exactly 1.0 in fp32 and sigmoid(-30) is ~1e-13: far from any score threshold.
CONFIDENT_LOGIT = 30.0


def oracle_head_outputs(
    targets: Sequence[TaskTargets], tail_scale: float = 0.0
) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """Heatmap logits and regression maps that a perfect network would produce for ``targets``.

    Args:
        targets: per task, the ``TargetBuilder`` targets of a batch (key frame, BEV grid of the heads).
        tail_scale: 0 puts every non-centre cell at a confident "no object"; a value in (0, 1) keeps the
            Gaussian tails of the target heatmap scaled by it (below a 0.1 threshold for a scale < 0.1), to
            check that decoding drops them.

    Returns:
        ``(proposals, regression)`` in the heads' layout: per task ``{"heatmap": (B, k, Y, X)}`` logits
        (``+CONFIDENT_LOGIT`` at object centres) and the ``REG_BRANCHES`` maps, each (B, channels, Y, X), holding
        every object's regression target at its centre cell and zero elsewhere.
    """
    proposals, regression = [], []
    for task in targets:
        peak = task.heatmap == 1
        if tail_scale == 0:
            elsewhere = torch.full_like(task.heatmap, -CONFIDENT_LOGIT)
        else:
            elsewhere = torch.logit((task.heatmap * tail_scale).clamp(1e-12, 1 - 1e-6))
        logits = torch.where(peak, torch.full_like(task.heatmap, CONFIDENT_LOGIT), elsewhere)
        proposals.append({"heatmap": logits})
        b, _, grid_y, grid_x = task.heatmap.shape
        maps = task.heatmap.new_zeros(b, task.reg_target.shape[-1], grid_y * grid_x)
        for i in range(b):
            slots = task.mask[i]
            maps[i][:, task.index[i][slots]] = task.reg_target[i][slots].T
        split = torch.split(maps.reshape(b, -1, grid_y, grid_x), list(REG_BRANCHES.values()), dim=1)
        regression.append(dict(zip(REG_BRANCHES, split)))
    return proposals, regression
