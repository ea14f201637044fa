"""The training loop: ``train(run, work_dir, ...)`` runs one ``RunConfig`` on 1..N processes (torchrun).

One iteration, top to bottom (``_train_epochs``): take ``grad_accum`` batches from the loader, move each to
the device, ``losses = model(batch)`` under autocast, check the total is finite on every rank, backward
(gradient all-reduce only on the last micro-batch), unscale and clip, optimizer step at the scheduled
learning rate, EMA update, then the periodic ``if`` blocks: a log line, and at the end of an epoch the
checkpoints. No hooks.

The reference's behaviour (``reference/bevnext-model.md`` §5): AdamW with weight decay on every parameter,
200-step linear warm-up from 0.001 x lr then constant, gradient clipping at norm 5, the MEGVII EMA created
after ``--load-from``, SyncBatchNorm from stage 2's epoch 8, class-balanced sampling, ``set_epoch`` on
sampler and dataset, per-rank seeds, ``find_unused_parameters`` off, ``broadcast_buffers`` off.

Files in the work dir: ``config.json`` (the resolved run; ``bevnext train config.json`` repeats it),
``environment.json``, ``log.txt``, ``metrics.jsonl``, ``epoch_N.pth`` / ``epoch_N_ema.pth`` (the reference's
names and layouts), ``last.pth`` (everything for an exact continuation) and ``train_summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bevnext import __version__
from bevnext.config.run import RunConfig
from bevnext.data.loader import TrainLoader, build_train_loader
from bevnext.engine import dist as bdist
from bevnext.engine.checkpoint import (
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from bevnext.engine.device import (
    autocast,
    choose_num_threads,
    grad_scaler,
    memory_stats,
    reset_peak_memory,
    seed_everything,
    synchronize,
)
from bevnext.engine.ema import ModelEMA, unwrap_model
from bevnext.engine.environment import collect_environment, format_environment
from bevnext.engine.metrics import MetricWriter, SmoothedValue, format_eta, setup_logging
from bevnext.engine.schedule import lr_factor, set_lr
from bevnext.errors import BevnextError
from bevnext.io import atomic_write_json
from bevnext.models.detector import build_model
from bevnext.structures import CLASSES

logger = logging.getLogger("bevnext.train")

TRAIN_STATE_FORMAT = "bevnext-train-state"
"""``last.pth``'s ``format`` entry, checked on ``--resume``."""
TRAIN_STATE_VERSION = 1


class TrainingError(BevnextError):
    """Training cannot continue (non-finite loss, a resume that does not fit the run, ...)."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports.

    Attributes:
        work_dir: where its files are.
        epochs_done: completed epochs (the next epoch index).
        global_step: optimizer steps taken in total.
        final_fps: the reference scripts' figure: global samples per step / mean step time, all steps
            (warm-up included) — called "images/sec" there, really samples/s.
        steady_fps: the same without the first ``train.warmup_exclude_iters`` steps of this process
            (None if there were not more steps than that).
        duration_s: end-to-end wall time of ``train`` on this process.
        last_losses: the last step's losses averaged over ranks.
    """

    work_dir: Path
    epochs_done: int
    global_step: int
    final_fps: float
    steady_fps: float | None
    duration_s: float
    last_losses: dict[str, float]


# ----------------------------------------------------------------------------------------------------
# Set-up helpers (each one job; the loop itself is ``_train_epochs``).


def _write_run_files(run: RunConfig, work_dir: Path, info: bdist.DistInfo, env: dict[str, Any]) -> None:
    atomic_write_json(work_dir / "config.json", run.to_dict(), indent=2)
    env = dict(env, device=str(info.device), backend=info.backend, world_size=info.world_size)
    atomic_write_json(work_dir / "environment.json", env, indent=2)


def _build_optimizer(model: nn.Module, run: RunConfig) -> torch.optim.AdamW:
    # The reference decays every parameter, norms and biases included (no parameter-wise options).
    t = run.train
    return torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)


def _wrap(model: nn.Module, info: bdist.DistInfo) -> nn.Module:
    """DDP around ``model`` when more than one process trains (the reference's settings)."""
    if not info.is_distributed:
        return model
    ids = [info.device.index] if info.device.type != "cpu" else None
    # Buffers are not synchronised in forward, as in the reference: BatchNorm statistics stay per device
    # (SyncBN aside). Newer torch renames the option; both sync once at construction.
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False, **no_buffer_sync)


def _maybe_sync_bn(model: nn.Module, wrapped: nn.Module, run: RunConfig, epoch: int, info: bdist.DistInfo,
                   converted: bool) -> tuple[nn.Module, bool]:
    """Switch BatchNorm to SyncBatchNorm at ``train.syncbn_start_epoch`` (re-wrapping DDP); returns (wrapped, done)."""
    start = run.train.syncbn_start_epoch
    if converted or start < 0 or epoch < start or not info.is_distributed:
        return wrapped, converted
    if info.backend == "gloo":
        logger.warning("epoch %d: SyncBatchNorm needs nccl or hccl; BatchNorm stays per process on gloo", epoch + 1)
        return wrapped, True
    # Parameters and buffers keep their identity and names, so the optimizer and the EMA are unaffected.
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    logger.info("epoch %d: BatchNorm layers now synchronise statistics across %d processes", epoch + 1,
                info.world_size)
    return _wrap(model, info), True


def _check_resume(state: dict[str, Any], path: Path, run: RunConfig) -> None:
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise TrainingError(f"{path}: not a bevnext training state (expected 'format': {TRAIN_STATE_FORMAT!r}; "
                            "use --load-from to initialise from weights only)")
    saved = state.get("config", {})
    if saved.get("model") != run.to_dict()["model"]:
        raise TrainingError(f"{path}: saved for another model configuration; resume with its config.json")
    same = {k: v for k, v in run.to_dict()["train"].items() if saved.get("train", {}).get(k) != v}
    if same and bdist.is_main_process():
        logger.warning("resuming with train settings that differ from %s: %s", path,
                       ", ".join(f"{k}={v!r}" for k, v in sorted(same.items())))


def _log_line(epoch: int, epochs: int, step_in_epoch: int, steps_per_epoch: int, global_step: int,
              losses: dict[str, float], lr: float, grad_norm: float, data_t: SmoothedValue,
              step_t: SmoothedValue, samples_per_s: float, eta_s: float, mem: dict[str, float]) -> str:
    parts = [f"epoch {epoch + 1}/{epochs} iter {step_in_epoch}/{steps_per_epoch} (step {global_step})",
             f"loss {sum(losses.values()):.4f}"]
    parts += [f"{k} {v:.4f}" for k, v in losses.items()]
    parts += [f"lr {lr:.3e}", f"grad_norm {grad_norm:.3f}", f"data {data_t.avg:.3f}s", f"time {step_t.avg:.3f}s",
              f"{samples_per_s:.2f} samples/s", f"eta {format_eta(eta_s)}"]
    parts += [f"{k.replace('_mb', '')} {v:.0f} MB" for k, v in mem.items()]
    return " | ".join(parts)


# ----------------------------------------------------------------------------------------------------
# The run.


def train(
    run: RunConfig,
    work_dir: str | Path,
    *,
    load_from: str | Path | None = None,
    resume: str | Path | None = None,
) -> TrainResult:
    """Train ``run`` on this process's share of the torchrun group (or alone), writing to ``work_dir``.

    Args:
        run: the resolved run configuration.
        work_dir: output folder (created).
        load_from: initialise the weights from this checkpoint (ours or the reference's) before the EMA is
            created; prints what loaded, what did not fit and what is missing.
        resume: continue exactly from this ``last.pth`` (model, EMA, optimizer, scaler, schedule position,
            sampler position, RNG states).

    Raises:
        BevnextError: bad data, checkpoint, device or configuration, in one line; ``TrainingError`` for a
            non-finite loss (naming the last checkpoint).
    """
    t_start = time.perf_counter()
    run.validate()
    work_dir = Path(work_dir)
    info = bdist.init_distributed(None if run.runtime.device == "auto" else run.runtime.device)
    if info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
    bdist.barrier()
    setup_logging(work_dir, info.rank)
    device, t = info.device, run.train
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = choose_num_threads(run.runtime.num_threads, local_world, t.num_workers)
    torch.set_num_threads(threads)
    env = collect_environment()
    if info.is_main:
        _write_run_files(run, work_dir, info, env)
        logger.info("run %s on %d process(es), device %s (%s), %d CPU threads per process\n%s", run.name,
                    info.world_size, device, info.backend, threads, format_environment(env))

    # The same initial weights on every rank (DDP would broadcast rank 0's anyway; the EMA copy is taken
    # before that), then a seed per rank for everything random during training.
    seed_everything(run.runtime.seed, 0, deterministic=run.runtime.deterministic)
    model = build_model(run.model).to(device)
    seed_everything(run.runtime.seed, info.rank, deterministic=run.runtime.deterministic)
    if load_from is not None:
        report = load_weights(model, load_from)
        if info.is_main:
            logger.info("initialised weights from %s: %s\n%s", load_from, report.summary(), report.table())
    # Created after --load-from, so that stage 2's average starts from the stage-1 weights.
    ema = ModelEMA(model, decay=t.ema_decay, tau=t.ema_tau, updates=t.ema_init_updates) if t.ema else None
    optimizer = _build_optimizer(model, run)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    scaler = grad_scaler(device, t.precision)

    data = build_train_loader(
        run.data, batch_size=t.batch_size, num_workers=t.num_workers, seed=run.runtime.seed, rank=info.rank,
        world_size=info.world_size, pin_memory=t.pin_memory and device.type != "cpu",
        prefetch_factor=t.prefetch_factor,
    )
    steps_per_epoch = data.batches_per_epoch() // t.grad_accum
    if steps_per_epoch < 1:
        raise TrainingError(f"an epoch has {data.batches_per_epoch()} batches per process, fewer than "
                            f"train.grad_accum={t.grad_accum}")

    if info.is_main:
        global_batch = t.batch_size * info.world_size * t.grad_accum
        logger.info("global batch %d = %d per device x %d process(es) x %d accumulation step(s); %d steps per epoch"
                    "%s", global_batch, t.batch_size, info.world_size, t.grad_accum, steps_per_epoch,
                    "" if global_batch == 64 else " (the reference trains with 64: adjust train.grad_accum or "
                    "train.lr to compare)")
    start_epoch, start_step_in_epoch, global_step = 0, 0, 0
    if resume is not None:
        state = load_checkpoint(resume)
        _check_resume(state, Path(resume), run)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, start_step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        global_step = int(state["global_step"])
        rngs = state.get("rng", [])
        if len(rngs) == info.world_size:
            set_rng_state(rngs[info.rank])
        elif info.is_main:
            logger.warning("%s was saved by %d processes, this run has %d: RNG states are not restored",
                           resume, len(rngs), info.world_size)
        if info.is_main:
            logger.info("resumed from %s: epoch %d, step %d of %d in the epoch, global step %d", resume,
                        start_epoch + 1, start_step_in_epoch, steps_per_epoch, global_step)

    if start_epoch >= t.epochs and info.is_main:
        logger.info("%s: all %d epochs are already done; nothing left to train (raise train.epochs to continue)",
                    resume, t.epochs)
    wrapped = _wrap(model, info)
    ctx = _LoopContext(run=run, info=info, work_dir=work_dir, model=model, wrapped=wrapped, ema=ema,
                       optimizer=optimizer, base_lrs=base_lrs, scaler=scaler, data=data,
                       steps_per_epoch=steps_per_epoch, global_step=global_step)
    writer = MetricWriter(work_dir, enabled=info.is_main)
    try:
        _train_epochs(ctx, writer, start_epoch, start_step_in_epoch)
    finally:
        writer.close()

    duration = time.perf_counter() - t_start
    global_batch = t.batch_size * t.grad_accum * info.world_size
    times = ctx.step_times
    final_fps = global_batch / (sum(times) / len(times)) if times else 0.0
    steady = times[t.warmup_exclude_iters:]
    steady_fps = global_batch / (sum(steady) / len(steady)) if steady else None
    result = TrainResult(work_dir, ctx.epochs_done, ctx.global_step, final_fps, steady_fps, duration,
                         ctx.last_losses)
    if info.is_main:
        steady_text = f"{steady_fps:.3f}" if steady_fps is not None else "n/a"
        summary = {
            "final_performance_samples_per_s": final_fps, "steady_samples_per_s": steady_fps,
            "warmup_excluded_steps": t.warmup_exclude_iters, "duration_s": duration, "steps": ctx.global_step,
            "global_batch": global_batch, "world_size": info.world_size, "device": str(device),
            "peak_memory_mb": memory_stats(device),
        }
        atomic_write_json(work_dir / "train_summary.json", summary, indent=2)
        # The first line is the reference scripts' figure (warm-up included, "images/sec" = samples/s).
        for line in (f"Final Performance images/sec : {final_fps:.3f}",
                     f"Steady-state samples/sec : {steady_text} (first {t.warmup_exclude_iters} steps excluded)",
                     f"E2E Training Duration sec : {duration:.0f}"):
            logger.info(line)
    bdist.barrier()
    return result


@dataclass
class _LoopContext:
    """The objects the loop works on, plus its counters and measurements."""

    run: RunConfig
    info: bdist.DistInfo
    work_dir: Path
    model: nn.Module
    wrapped: nn.Module
    ema: ModelEMA | None
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]
    scaler: Any
    data: TrainLoader
    steps_per_epoch: int
    global_step: int = 0
    epochs_done: int = 0
    syncbn_done: bool = False
    step_times: list[float] = dataclasses.field(default_factory=list)
    last_losses: dict[str, float] = dataclasses.field(default_factory=dict)


def _train_epochs(c: _LoopContext, writer: MetricWriter, start_epoch: int, start_step: int) -> None:
    run, info, t = c.run, c.info, c.run.train
    device = info.device
    reduce_fn = bdist.all_reduce_mean if info.is_distributed else None
    global_batch = t.batch_size * t.grad_accum * info.world_size
    total_steps = t.epochs * c.steps_per_epoch
    if t.max_iters:
        total_steps = min(total_steps, t.max_iters)
    data_t, step_t = SmoothedValue(t.log_every), SmoothedValue(t.log_every)
    reset_peak_memory(device)
    c.epochs_done = start_epoch
    for epoch in range(start_epoch, t.epochs):
        if c.global_step >= total_steps:
            break
        c.wrapped, c.syncbn_done = _maybe_sync_bn(c.model, c.wrapped, run, epoch, info, c.syncbn_done)
        skip = start_step if epoch == start_epoch else 0
        c.data.set_epoch(epoch, skip_batches=skip * t.grad_accum)
        c.wrapped.train()
        batches = iter(c.data.loader)
        step_in_epoch = skip
        t_last = time.perf_counter()
        while step_in_epoch < c.steps_per_epoch and c.global_step < total_steps:
            # ---- one optimizer step: grad_accum micro-batches -------------------------------------------
            set_lr(c.optimizer, c.base_lrs, lr_factor(c.global_step, epoch, t.warmup_iters, t.warmup_ratio,
                                                      t.lr_step_epochs, t.lr_gamma))
            c.optimizer.zero_grad(set_to_none=True)
            step_losses: dict[str, torch.Tensor] = {}
            data_time = 0.0
            for micro in range(t.grad_accum):
                t_data = time.perf_counter()
                batch = next(batches).to(device, non_blocking=True)
                data_time += time.perf_counter() - t_data
                last_micro = micro == t.grad_accum - 1
                # Gradients are all-reduced once per optimizer step, on the last micro-batch.
                sync = contextlib.nullcontext() if last_micro or not info.is_distributed else c.wrapped.no_sync()
                with sync:
                    with autocast(device, t.precision):
                        losses = c.wrapped(batch, reduce_fn=reduce_fn)
                    total = sum(losses.values())
                    _check_finite(total, losses, epoch, step_in_epoch, c)
                    c.scaler.scale(total / t.grad_accum).backward()
                for k, v in losses.items():
                    step_losses[k] = step_losses.get(k, 0.0) + v.detach().float() / t.grad_accum
            c.scaler.unscale_(c.optimizer)
            max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(c.model.parameters(), max_norm)
            c.scaler.step(c.optimizer)
            c.scaler.update()
            if c.ema is not None:
                c.ema.update(c.model)
            c.global_step += 1
            step_in_epoch += 1
            synchronize(device)
            now = time.perf_counter()
            c.step_times.append(now - t_last)
            step_t.update(now - t_last)
            data_t.update(data_time)
            t_last = now

            # ---- periodic: log --------------------------------------------------------------------------
            is_last = step_in_epoch == c.steps_per_epoch or c.global_step == total_steps
            if c.global_step % t.log_every == 0 or is_last:
                names = sorted(step_losses)
                values = bdist.all_reduce_mean(torch.stack([step_losses[k] for k in names]))
                c.last_losses = {k: float(v) for k, v in zip(names, values.tolist())}
                if info.is_main:
                    lr = c.optimizer.param_groups[0]["lr"]
                    eta = step_t.median * (total_steps - c.global_step)
                    mem = _peak_memory(device)
                    logger.info(_log_line(epoch, t.epochs, step_in_epoch, c.steps_per_epoch, c.global_step,
                                          c.last_losses, lr, float(grad_norm), data_t, step_t,
                                          global_batch / step_t.avg, eta, mem))
                    writer.write(c.global_step, {
                        "epoch": epoch + 1, "iter": step_in_epoch, "loss": sum(c.last_losses.values()),
                        **c.last_losses, "lr": lr, "grad_norm": float(grad_norm), "data_time": data_t.avg,
                        "time": step_t.avg, "samples_per_s": global_batch / step_t.avg, "eta_s": eta,
                        **{f"{k}": v for k, v in mem.items()},
                    })
        # ---- periodic: checkpoints at the end of an epoch, or where the run stops --------------------
        finished = step_in_epoch == c.steps_per_epoch
        if finished:
            c.epochs_done = epoch + 1
        _save(c, epoch, step_in_epoch, finished)
        if not finished:
            break


def _peak_memory(device: torch.device) -> dict[str, float]:
    """The peak-memory figure of the device: allocator peak on accelerators, process peak RSS on the CPU."""
    stats = memory_stats(device)
    key = "max_rss_mb" if device.type == "cpu" else "max_allocated_mb"
    return {f"peak_{key}": stats[key]} if key in stats else {}


def _check_finite(total: torch.Tensor, losses: dict[str, torch.Tensor], epoch: int, step: int,
                  c: _LoopContext) -> None:
    """Stop every rank together when any rank's loss is not finite (a lone rank would hang the others)."""
    bad = torch.tensor(0.0 if torch.isfinite(total.detach()).item() else 1.0)
    if c.info.is_distributed:
        bad = bdist.all_reduce_mean(bad)
    if float(bad) > 0:
        detail = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items() if not torch.isfinite(v).all())
        last = c.work_dir / "last.pth"
        where = f"the last checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        raise TrainingError(f"non-finite loss at epoch {epoch + 1}, iteration {step + 1} "
                            f"({detail or 'on another rank'}); {where}")


def _save(c: _LoopContext, epoch: int, step_in_epoch: int, finished: bool) -> None:
    """Write the checkpoints of this point: ``epoch_N*.pth`` after a whole epoch, ``last.pth`` always."""
    rngs = bdist.all_gather_object(rng_state())  # every rank's generators, for an exact continuation
    if not c.info.is_main:
        bdist.barrier()
        return
    n = epoch + 1
    model_sd = unwrap_model(c.model).state_dict()
    config = c.run.to_dict()
    if finished:
        meta = {"epoch": n, "iter": c.global_step, "bevnext_version": __version__, "CLASSES": list(CLASSES),
                "config": json.dumps(config)}
        # The reference's layouts: mmcv's {meta, state_dict, optimizer} and the EMA hook's file.
        save_checkpoint(c.work_dir / f"epoch_{n}.pth",
                        {"meta": meta, "state_dict": model_sd, "optimizer": c.optimizer.state_dict()})
        if c.ema is not None:
            save_checkpoint(c.work_dir / f"epoch_{n}_ema.pth",
                            {"state_dict": c.ema.module.state_dict(), "epoch": n, "updates": c.ema.updates})
    state = {
        "format": TRAIN_STATE_FORMAT,
        "version": TRAIN_STATE_VERSION,
        "model": model_sd,
        "ema": c.ema.state_dict() if c.ema is not None else None,
        "optimizer": c.optimizer.state_dict(),
        "scaler": c.scaler.state_dict(),
        "scheduler": {"base_lrs": c.base_lrs, "global_step": c.global_step},
        "epoch": n if finished else epoch,
        "step_in_epoch": 0 if finished else step_in_epoch,
        "global_step": c.global_step,
        "rng": rngs,
        "config": config,
        "environment": collect_environment(),
    }
    save_checkpoint(c.work_dir / "last.pth", state)
    logger.info("saved %s%s", c.work_dir / "last.pth",
                f" and epoch_{n}.pth" + (f", epoch_{n}_ema.pth" if c.ema is not None else "") if finished else "")
    bdist.barrier()


__all__ = ["TRAIN_STATE_FORMAT", "TrainResult", "TrainingError", "train"]
