"""Exponential moving average of a model's weights, as the reference trains with it (MEGVII / BEVDepth style).

The decay grows with the number of updates ``t``::

    decay_t = decay * (1 - exp(-t / tau))

with ``decay=0.999`` and ``tau=2000``. The reference starts the counter at ``10560`` rather than 0, so the
very first update already averages with ``decay_t ~= 0.9939`` instead of copying the live weights; we keep
that default so that EMA checkpoints match the reference's. The counter is incremented *before* the decay
is computed, so the first update uses ``t = updates + 1``.

Every floating-point entry of the state dict is averaged (parameters and BatchNorm running statistics);
integer entries such as ``num_batches_tracked`` are copied. Entries are matched by state-dict name, not by
module structure, because the live model's BatchNorm layers may be converted to SyncBatchNorm mid-run
(stage 2 of the reference does so at epoch 8): the module classes change, the names do not.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bevnext.engine.dist import unwrap_model

__all__ = ["ModelEMA"]


class ModelEMA:
    """EMA copy of a model, updated after every optimizer step.

    Args:
        model: the live model, possibly wrapped in ``DistributedDataParallel``; the EMA holds a deep copy of
            the unwrapped model, in eval mode and without gradients.
        decay: asymptotic decay (0.999 in the reference).
        tau: time constant of the warm-up of the decay, in updates (2000 in the reference).
        updates: initial value of the update counter (10560 in the reference; stage 2 restarts at this
            value too, since the reference creates a new EMA after loading the stage-1 weights).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, tau: float = 2000.0, updates: int = 10560) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if tau <= 0.0:
            raise ValueError(f"EMA tau must be positive, got {tau}")
        if updates < 0:
            raise ValueError(f"EMA updates must be >= 0, got {updates}")
        self.decay = float(decay)
        self.tau = float(tau)
        self._updates = int(updates)
        # A deep copy, so that later in-place changes of the live weights (optimizer steps) never leak in.
        self._module = copy.deepcopy(unwrap_model(model))
        self._module.eval()
        self._module.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged model (eval mode, no gradients); use it for evaluation and EMA checkpoints."""
        return self._module

    @property
    def updates(self) -> int:
        """Number of updates so far, including the initial offset."""
        return self._updates

    def decay_at(self, updates: int) -> float:
        """The decay used by the update whose counter value (after incrementing) is ``updates``."""
        return self.decay * (1.0 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the live weights of ``model`` into the average: ``ema = d * ema + (1 - d) * live``."""
        self._updates += 1
        d = self.decay_at(self._updates)
        live = unwrap_model(model).state_dict()
        ema_state = self._module.state_dict()
        missing = [name for name in ema_state if name not in live]
        if missing:
            raise KeyError(f"the live model has no state-dict entries {missing[:5]} (of {len(missing)}) for the EMA")
        for name, ema_value in ema_state.items():
            live_value = live[name].detach()
            if ema_value.is_floating_point():
                # In place, so the EMA module's tensors (and anything holding them) stay the same objects.
                # ``to`` is a no-op when device and dtype already match, which is the common case.
                ema_value.mul_(d).add_(live_value.to(device=ema_value.device, dtype=ema_value.dtype), alpha=1.0 - d)
            else:
                ema_value.copy_(live_value)

    def state_dict(self) -> dict[str, Any]:
        """``{"state_dict": <EMA model state dict>, "updates": int}``, the reference's EMA checkpoint content."""
        return {"state_dict": self._module.state_dict(), "updates": self._updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (weights and update counter)."""
        self._module.load_state_dict(state["state_dict"])
        self._updates = int(state["updates"])
