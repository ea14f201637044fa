"""One rank of the multi-process tests in ``test_trainer.py`` (run with torchrun or torchrun-like env vars).

Usage::

    python train_worker.py grads OUT_DIR
        Build the tiny stage-1 model identically on every rank, wrap it in DistributedDataParallel and run
        one forward + backward of a different random batch per rank, twice: through the wrapper
        (``ddp(batch)``, gradients all-reduced) and, as the control, through ``ddp.module.loss(batch)``
        (which bypasses DDP's forward, so nothing is synchronised). Writes ``OUT_DIR/grads_rank{RANK}.pt``:
        ``{"ddp": {name: grad}, "module_loss": {name: grad}}``.

    python train_worker.py train OUT_DIR WORK_DIR CONFIG [key=value ...]
        ``bevnext.engine.trainer.train`` on this rank, then writes this rank's parameters and buffers to
        ``OUT_DIR/params_rank{RANK}.pt``: ``{"params": {name: tensor}, "buffers": {name: tensor}}``.
"""

from __future__ import annotations

import faulthandler
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from bevnext.engine import dist as bdist


def _grads(out_dir: Path) -> None:
    from bevnext.config.stages import tiny
    from bevnext.engine.trainer import _wrap
    from bevnext.models.detector import build_model
    from bevnext.synth.batches import ODD_PER_TASK, random_batch

    info = bdist.init_distributed("cpu", timeout_s=60)
    torch.set_num_threads(1)
    cfg = tiny(1)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = build_model(cfg).train()
    # The trainer's own wrapping (no buffer sync in forward, find_unused_parameters off).
    ddp = _wrap(model, info)
    assert isinstance(ddp, DistributedDataParallel)
    # A different batch per rank, so that unsynchronised gradients cannot agree by accident.
    # ODD_PER_TASK puts boxes in every task, so every head gets a non-zero gradient.
    batch = random_batch(cfg, batch_size=1, seed=100 + info.rank, labels=ODD_PER_TASK)
    reduce_fn = bdist.all_reduce_mean
    result: dict[str, dict[str, torch.Tensor]] = {}
    for mode in ("ddp", "module_loss"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1000 + info.rank)  # the same dropout masks in both modes (ASPP dropout is 0.5)
        losses = ddp(batch, reduce_fn=reduce_fn) if mode == "ddp" else ddp.module.loss(batch, reduce_fn=reduce_fn)
        sum(losses.values()).backward()
        result[mode] = {
            name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None
        }
    torch.save(result, out_dir / f"grads_rank{info.rank}.pt")
    bdist.barrier()
    bdist.cleanup_distributed()


def _train(out_dir: Path, work_dir: Path, config: str, overrides: list[str]) -> None:
    from bevnext.config.run import load_run
    from bevnext.engine.trainer import train

    run = load_run(config, overrides)
    result = train(run, work_dir)
    rank = bdist.get_rank()
    # ``train`` does not hand the model back: ``_capture_built_model`` kept this rank's instance.
    model = _CAPTURED.get("model")
    if model is None:
        raise RuntimeError("the trained model was not captured")
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    torch.save({"params": params, "buffers": buffers, "global_step": result.global_step},
               out_dir / f"params_rank{rank}.pt")
    bdist.barrier()
    bdist.cleanup_distributed()


_CAPTURED: dict[str, torch.nn.Module] = {}


def _capture_built_model() -> None:
    """Keep a reference to the model ``train`` builds (``build_model`` is looked up in the trainer module)."""
    from bevnext.engine import trainer

    original = trainer.build_model

    def build_and_keep(cfg):
        model = original(cfg)
        _CAPTURED["model"] = model
        return model

    trainer.build_model = build_and_keep


def main(argv: list[str]) -> None:
    mode, out_dir = argv[0], Path(argv[1])
    if mode == "grads":
        _grads(out_dir)
    elif mode == "train":
        _capture_built_model()
        _train(out_dir, Path(argv[2]), argv[3], argv[4:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    # If anything hangs, print where and exit, so that the parent test reports it instead of waiting.
    faulthandler.dump_traceback_later(150, exit=True)
    main(sys.argv[1:])
    print("worker done", flush=True)
