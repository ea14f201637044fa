"""A training process for ``test_faults.py`` whose model returns non-finite losses on chosen steps.

The fault is injected from outside the trainer: ``bevnext.engine.trainer.build_model`` is replaced (in this
process only) by a function that builds the real model and wraps its ``forward``. The real forward always
runs (its collectives included, so the ranks stay in step); on a chosen training call of a chosen rank its
losses are multiplied by NaN. With ``train.grad_accum=1`` and no resume, the N-th training forward is
global step N.

Environment:
    FAULT_NAN_STEPS: the steps (1-based training forward calls of this process) that return NaN losses:
        ``"2"``, ``"2,5"``, or ``"2-"`` (step 2 and every later one). Empty or unset: none.
    FAULT_NAN_RANK: the rank that returns them (default 0); ``"all"``: every rank.

Usage::

    python fault_worker.py cli [bevnext train arguments ...]
        ``bevnext train ...`` through the real CLI entry point (one-line errors, exit status 2); the process
        exits with the CLI's status.

    python fault_worker.py train OUT_DIR WORK_DIR CONFIG [key=value ...]
        ``bevnext.engine.trainer.train`` on this rank (launched with torchrun-like env vars), then writes
        ``OUT_DIR/state_rank{RANK}.pt``: ``{"params": {name: tensor}, "global_step": int,
        "optimizer_steps": [AdamW step count of each parameter], "bad_steps": skipped steps counted on this
        rank, "nan_steps": the steps this rank made non-finite}``.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path
from typing import Any

import torch

_CAPTURED: dict[str, Any] = {"nan_steps": [], "bad_steps": 0}


def _nan_steps() -> tuple[set[int], int | None]:
    """(explicit steps, first step of an open range or None) from ``FAULT_NAN_STEPS``."""
    spec = os.environ.get("FAULT_NAN_STEPS", "").strip()
    steps: set[int] = set()
    open_from: int | None = None
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part.endswith("-"):
            open_from = int(part[:-1])
        else:
            steps.add(int(part))
    return steps, open_from


def _this_rank_faults() -> bool:
    which = os.environ.get("FAULT_NAN_RANK", "0").strip()
    return which == "all" or int(which) == int(os.environ.get("RANK", "0"))


def _install_faults() -> None:
    """Replace the trainer's ``build_model`` by one whose model's training forward can return NaN losses."""
    from bevnext.engine import trainer

    steps, open_from = _nan_steps()
    active = _this_rank_faults()
    original_build = trainer.build_model

    def build_with_faults(cfg):
        model = original_build(cfg)
        _CAPTURED["model"] = model
        real_forward = model.forward
        calls = [0]

        def forward(*args, **kwargs):
            out = real_forward(*args, **kwargs)
            if not model.training:
                return out
            calls[0] += 1
            step = calls[0]
            if active and (step in steps or (open_from is not None and step >= open_from)):
                _CAPTURED["nan_steps"].append(step)
                return {name: value * float("nan") for name, value in out.items()}
            return out

        model.forward = forward
        return model

    trainer.build_model = build_with_faults

    # Observation only: the optimizer (its per-parameter step counts show which updates happened) and the
    # skipped-step count of this rank (rank 0 alone writes logs and metrics).
    original_optimizer = trainer._build_optimizer

    def build_and_keep_optimizer(model, run):
        optimizer = original_optimizer(model, run)
        _CAPTURED["optimizer"] = optimizer
        return optimizer

    trainer._build_optimizer = build_and_keep_optimizer
    original_skip = trainer._skip_step

    def skip_and_count(c, *args, **kwargs):
        try:
            return original_skip(c, *args, **kwargs)
        finally:
            _CAPTURED["bad_steps"] = c.bad_steps

    trainer._skip_step = skip_and_count


def _cli(args: list[str]) -> int:
    from bevnext.cli import main

    return main(["train", *args])


def _train(out_dir: Path, work_dir: Path, config: str, overrides: list[str]) -> None:
    from bevnext.config.run import load_run
    from bevnext.engine import dist as bdist
    from bevnext.engine.trainer import train

    result = train(load_run(config, overrides), work_dir)
    model, optimizer = _CAPTURED["model"], _CAPTURED["optimizer"]
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer_steps = sorted({int(float(s["step"])) for s in optimizer.state.values() if "step" in s})
    torch.save({"params": params, "global_step": result.global_step, "optimizer_steps": optimizer_steps,
                "bad_steps": _CAPTURED["bad_steps"], "nan_steps": _CAPTURED["nan_steps"]},
               out_dir / f"state_rank{bdist.get_rank()}.pt")
    bdist.barrier()
    bdist.cleanup_distributed()


def main(argv: list[str]) -> int:
    _install_faults()
    mode = argv[0]
    if mode == "cli":
        return _cli(argv[1:])
    if mode == "train":
        _train(Path(argv[1]), Path(argv[2]), argv[3], argv[4:])
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    # If anything hangs, print where and exit, so that the parent test reports it instead of waiting.
    faulthandler.dump_traceback_later(150, exit=True)
    sys.exit(main(sys.argv[1:]))
