"""Losses of the proposal (heatmap) and regression heads (reference §2.7, §2.9).

All functions compute in the dtype they are given; the heads cast predictions to float32 first (the reference
computes its head losses in float32).

Multi-process normalisation: the reference divides each loss by a count (positive heatmap pixels, objects of
a task) averaged over all processes, so every process uses the same normaliser. The math here stays free of
``torch.distributed``: functions take an optional ``reduce_fn`` that maps a local 0-d count tensor to its mean
over processes (the trainer passes an all-reduce-mean; ``None`` means a single process). Counts stay on the
device, so no host synchronisation is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "REG_SLICES",
    "ReduceFn",
    "clip_sigmoid",
    "gaussian_focal_loss",
    "regression_losses",
    "weighted_l1_loss",
]

ReduceFn = Callable[[Tensor], Tensor]
"""Maps a local 0-d float count to its mean over all processes (same shape, dtype and device)."""

REG_SLICES: tuple[tuple[str, int, int], ...] = (
    ("xy", 0, 2),
    ("z", 2, 3),
    ("whl", 3, 6),
    ("yaw", 6, 8),
    ("vel", 8, 10),
)
"""``(name, start, stop)`` of the regression-target slices that get separate losses (``task_specific=True``)."""

# mmdet adds float32 epsilon to every avg_factor denominator; kept so loss values match the reference.
_AVG_EPS = torch.finfo(torch.float32).eps
# Inside the logs of the Gaussian focal loss (mmdet's value).
_LOG_EPS = 1e-12


def clip_sigmoid(x: Tensor, eps: float = 1e-4) -> Tensor:
    """Sigmoid clamped to ``[eps, 1 - eps]`` so that the focal loss' logs stay finite.

    Args:
        x: logits of any shape.
        eps: clamp margin.

    Returns:
        Probabilities, same shape and dtype as ``x`` (not in place, unlike the reference).
    """
    return torch.clamp(torch.sigmoid(x), min=eps, max=1.0 - eps)


def _mean_count(count: Tensor, reduce_fn: ReduceFn | None) -> Tensor:
    return count if reduce_fn is None else reduce_fn(count)


def gaussian_focal_loss(
    pred: Tensor,
    target: Tensor,
    alpha: float = 2.0,
    gamma: float = 4.0,
    reduce_fn: ReduceFn | None = None,
) -> Tensor:
    """CenterNet's penalty-reduced focal loss on Gaussian heatmaps, summed and normalised by the positives.

    Per pixel, with ``p`` the prediction and ``t`` the target::

        t == 1:  -log(p + 1e-12) * (1 - p)^alpha
        always:  -log(1 - p + 1e-12) * p^alpha * (1 - t)^gamma   (zero where t == 1)

    The sum over all pixels is divided by ``max(1, mean over processes of #(t == 1)) + eps32``.

    Args:
        pred: (...) probabilities, already clamped away from 0 and 1 (``clip_sigmoid``).
        target: (...) Gaussian target heatmap in [0, 1], same shape.
        alpha: focusing exponent on the prediction.
        gamma: exponent of the penalty reduction around centres.
        reduce_fn: averages the positive count over processes (``None``: this process only).

    Returns:
        0-d loss tensor.
    """
    positive = target.eq(1)
    pos_loss = -torch.log(pred + _LOG_EPS) * (1 - pred).pow(alpha) * positive
    neg_loss = -torch.log(1 - pred + _LOG_EPS) * pred.pow(alpha) * (1 - target).pow(gamma)
    num_pos = _mean_count(positive.sum().to(pred.dtype), reduce_fn)
    avg_factor = torch.clamp(num_pos, min=1.0)
    return (pos_loss + neg_loss).sum() / (avg_factor + _AVG_EPS)


def weighted_l1_loss(pred: Tensor, target: Tensor, weight: Tensor, avg_factor: Tensor | float) -> Tensor:
    """``sum(|pred - target| * weight) / (avg_factor + eps32)``.

    Elements whose weight is 0 contribute exactly 0 even when the target is not finite (the reference would
    produce NaN there).

    Args:
        pred: (...) predictions.
        target: (...) targets, same shape.
        weight: (...) non-negative weights, broadcastable to ``pred``.
        avg_factor: normaliser (0-d tensor or float).

    Returns:
        0-d loss tensor.
    """
    weight = weight.expand_as(pred)
    # Replace unused targets before the subtraction (not after): a NaN that only a zero weight masks would
    # still turn the gradient into NaN.
    target = torch.where(weight > 0, target, torch.zeros_like(target))
    return ((pred - target).abs() * weight).sum() / (avg_factor + _AVG_EPS)


def regression_losses(
    pred: Tensor,
    target: Tensor,
    mask: Tensor,
    code_weights: Sequence[float],
    loss_weight: float = 0.25,
    reduce_fn: ReduceFn | None = None,
    prefix: str = "",
) -> dict[str, Tensor]:
    """L1 box-regression losses of one task, one per slice of ``REG_SLICES``.

    Each slice loss is ``loss_weight * sum(|pred - target| * code_weight * mask) / (n + 1e-4)`` over that
    slice's components, where ``n`` = max(1e-4, mean over processes of the number of objects of the task)
    (the reference's normaliser).

    Args:
        pred: (B, M, 10) predictions gathered at the object cells, in the target layout
            ``[x_frac, y_frac, z, log l, log w, log h, sin, cos, vx, vy]``.
        target: (B, M, 10) regression targets.
        mask: (B, M) bool, slots that hold an object.
        code_weights: 10 per-component weights (stage 1: velocity 0.2; stage 2: all 1).
        loss_weight: overall factor (0.25).
        reduce_fn: averages the object count over processes (``None``: this process only).
        prefix: key prefix, e.g. ``"task0."``.

    Returns:
        ``{prefix + "loss_xy": ..., prefix + "loss_z": ..., "loss_whl", "loss_yaw", "loss_vel"}``, 0-d tensors.
    """
    if len(code_weights) != target.shape[-1]:
        raise ValueError(f"code_weights has {len(code_weights)} values for targets of size {target.shape[-1]}")
    valid = mask.unsqueeze(-1) & torch.isfinite(target)
    weights = valid.to(pred.dtype) * pred.new_tensor(list(code_weights))
    num = _mean_count(mask.sum().to(pred.dtype), reduce_fn)
    avg_factor = torch.clamp(num, min=1e-4) + 1e-4
    losses = {}
    for name, start, stop in REG_SLICES:
        losses[f"{prefix}loss_{name}"] = loss_weight * weighted_l1_loss(
            pred[..., start:stop], target[..., start:stop], weights[..., start:stop], avg_factor
        )
    return losses
