"""Learning-rate schedule of the reference: step decay by epoch with a linear warm-up by iteration.

The reference uses mmcv's ``step`` policy with ``step=[20]`` and a linear warm-up of 200 iterations from
``0.001 x lr``. Neither stage trains 20 epochs (2 and 12), so after warm-up the learning rate is constant;
the step decay is kept so that longer schedules behave as in mmcv. The schedule is a pure function of the
position in training, which makes resuming trivial: nothing but the iteration and epoch counters is stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["lr_factor", "set_lr"]


def lr_factor(
    iteration: int,
    epoch: int,
    warmup_iters: int = 200,
    warmup_ratio: float = 0.001,
    step_epochs: tuple[int, ...] = (20,),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base learning rate for the next optimizer step.

    Args:
        iteration: global 0-based iteration count before this step (across epochs).
        epoch: 0-based index of the current epoch.
        warmup_iters: length of the linear warm-up in iterations; 0 disables it.
        warmup_ratio: factor at iteration 0; it rises linearly to 1 at ``warmup_iters``.
        step_epochs: epochs at which the rate is multiplied by ``gamma`` (from that epoch on).
        gamma: decay per step.

    Returns:
        ``gamma ** (number of step_epochs <= epoch)``, times the warm-up factor
        ``1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio)`` while ``iteration < warmup_iters``.
    """
    if iteration < 0 or epoch < 0:
        raise ValueError(f"iteration and epoch must be >= 0, got iteration={iteration}, epoch={epoch}")
    if warmup_iters < 0:
        raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    factor = gamma ** sum(1 for step in step_epochs if step <= epoch)
    if iteration < warmup_iters:
        # mmcv's linear warm-up scales the regular (here: step-decayed) rate, it does not replace it.
        factor *= 1.0 - (1.0 - iteration / warmup_iters) * (1.0 - warmup_ratio)
    return factor


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], factor: float) -> None:
    """Set the learning rate of each parameter group to its base rate times ``factor``.

    ``base_lrs`` is one rate per parameter group (e.g. captured once from ``group["lr"]`` before training),
    so that per-group multipliers such as a backbone ``lr_mult`` survive the schedule.
    """
    if len(base_lrs) != len(optimizer.param_groups):
        raise ValueError(f"{len(base_lrs)} base learning rates for {len(optimizer.param_groups)} parameter groups")
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor
