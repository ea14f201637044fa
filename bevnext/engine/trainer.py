"""The training loop: ``train(run, work_dir, ...)`` runs one ``RunConfig`` on 1..N processes (torchrun).

One iteration, top to bottom (``_train_epochs``): take ``grad_accum`` batches from the loader, move each to
the device, ``losses = model(batch)`` under autocast, agree across ranks that the loss is finite, backward
(gradient all-reduce only on the last micro-batch), unscale and clip, optimizer step at the scheduled
learning rate, EMA update; then the periodic ``if`` blocks: a log line, a checkpoint when
``train.checkpoint_minutes`` have passed or a stop signal arrived, and the epoch's checkpoints at its end.
No hooks.

The reference's behaviour (``reference/bevnext-model.md`` §5): AdamW with weight decay on every parameter,
200-step linear warm-up from 0.001 x lr then constant, gradient clipping at norm 5, the MEGVII EMA created
after ``--load-from``, SyncBatchNorm from stage 2's epoch 8, class-balanced sampling, ``set_epoch`` on
sampler and dataset, per-rank seeds, ``find_unused_parameters`` off, ``broadcast_buffers`` off.

Beyond it, a run loses nothing: ``last.pth`` is also written inside an epoch (with the position in the
epoch's sampler order, so a resume sees exactly the batches an uninterrupted run would), SIGTERM / SIGINT
save at the next step boundary on every rank and stop, a step whose loss or gradient is not finite on any
rank is skipped on all of them, a failed save keeps the previous checkpoint and is retried, and a restarted
torchrun worker group continues from the work dir by itself.

Files in the work dir: ``config.json`` (the resolved run; ``bevnext train config.json`` repeats it),
``environment.json``, ``log.txt``, ``metrics.jsonl``, ``epoch_N.pth`` / ``epoch_N_ema.pth`` (the reference's
names and layouts), ``last.pth`` (the latest state) and ``train_summary.json``; see
``bevnext.engine.train_state`` for what a checkpoint holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bevnext.config.run import RunConfig
from bevnext.data.loader import TrainLoader, build_train_loader
from bevnext.engine import dist as bdist
from bevnext.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from bevnext.engine.device import (
    autocast,
    grad_scaler,
    memory_stats,
    reset_peak_memory,
    seed_everything,
    synchronize,
)
from bevnext.engine.ema import ModelEMA
from bevnext.engine.environment import collect_environment, format_environment
from bevnext.engine.evaluate import evaluate_model
from bevnext.engine.launch import start_process
from bevnext.engine.metrics import MetricWriter, SmoothedValue, format_eta
from bevnext.engine.schedule import lr_factor, set_lr
from bevnext.engine.train_state import (
    Position,
    check_resumable,
    find_resumable,
    full_checkpoint,
    save_epoch_files,
)
from bevnext.errors import BevnextError
from bevnext.io import atomic_write_json
from bevnext.models.detector import build_model

logger = logging.getLogger("bevnext.train")

MAX_FAILED_SAVES = 3
"""Saves in a row that may fail (full disk, quota, unwritable folder) before the run stops: a passing problem
costs nothing (the previous checkpoint stays intact and the next one is tried at the next checkpoint time),
but a run must not go on for hours without any way to keep its progress."""


class TrainingError(BevnextError):
    """Training cannot continue (too many non-finite steps, saves that keep failing, ...)."""


class TrainingInterrupted(TrainingError):
    """A stop signal (SIGTERM, SIGINT) arrived; the state was saved at a step boundary."""


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



class _StopSignals:
    """Turns the first SIGTERM / SIGINT into a request to save at the next step boundary and stop.

    A second SIGINT (Ctrl-C pressed again) stops at once with ``KeyboardInterrupt``. Handlers are only
    installed from the main thread (Python's rule) and are restored on exit.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        del frame
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        logger.warning("%s received: saving at the end of this step, then stopping (Ctrl-C again stops at once)",
                       self.received)


def _resolve_resume(resume: str | Path | None, work_dir: Path, run: RunConfig,
                    info: bdist.DistInfo) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to continue from (``"auto"``: ``last.pth`` or the newest readable one), loaded."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if resume is None and restart > 0:
        # torchrun restarted the worker group after a failure: pick up from the work dir without being asked.
        if not any(work_dir.glob("*.pth")):
            if info.is_main:
                logger.info("worker group restart %d: no checkpoint in %s yet, starting over", restart, work_dir)
            return None
        resume = "auto"
        if info.is_main:
            logger.info("worker group restart %d: continuing from the work dir's checkpoint", restart)
    if resume is None:
        return None
    model_config = run.to_dict()["model"]
    if str(resume) == "auto":
        path, ckpt, why = find_resumable(work_dir, model_config)
        if info.is_main:
            logger.info("resuming from %s (%s)", path, why)
        return path, ckpt
    path = Path(resume)
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, path, model_config)
    return path, ckpt


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
        resume: continue exactly from this checkpoint (model, EMA, optimizer, scaler, schedule and sampler
            position, RNG states); ``"auto"``: ``work_dir/last.pth``, or the newest readable checkpoint there
            when it is unreadable. After a torchrun restart (``--max-restarts``) the run resumes by itself.

    Raises:
        BevnextError: bad data, checkpoint, device or configuration, in one line. ``TrainingInterrupted``
            after a stop signal (the state is saved); ``TrainingError`` when too many steps in a row are not
            finite or saves keep failing (naming the last good checkpoint).
    """
    t_start = time.perf_counter()
    run.validate()
    work_dir = Path(work_dir)
    info, threads = start_process(run, work_dir, "log.txt", run.train.num_workers)
    device, t = info.device, run.train
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

    ctx = _LoopContext(run=run, info=info, work_dir=work_dir, model=model, wrapped=model, ema=ema,
                       optimizer=optimizer, base_lrs=base_lrs, scaler=scaler, data=data,
                       steps_per_epoch=steps_per_epoch, environment=env)
    start = Position(0, 0, 0)
    found = _resolve_resume(resume, work_dir, run, info)
    if found is not None:
        path, ckpt = found
        start = _restore(ctx, ckpt, path)
    if start.epoch >= t.epochs and info.is_main:
        logger.info("all %d epochs are already done; nothing left to train (raise train.epochs to continue)",
                    t.epochs)
    ctx.wrapped = _wrap(model, info)
    ctx.global_step = start.global_step
    if info.is_main:
        _remove_stale_temp_files(work_dir)
    writer = MetricWriter(work_dir, enabled=info.is_main)
    try:
        with _StopSignals() as stop:
            ctx.stop = stop
            _train_epochs(ctx, writer, start.epoch, start.step_in_epoch)
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
            "skipped_steps": ctx.bad_steps, "global_batch": global_batch, "world_size": info.world_size,
            "device": str(device), "peak_memory_mb": memory_stats(device),
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
    environment: dict[str, Any]
    stop: _StopSignals | None = None
    global_step: int = 0
    epochs_done: int = 0
    syncbn_done: bool = False
    bad_steps: int = 0
    bad_in_a_row: int = 0
    failed_saves: int = 0
    last_good_checkpoint: Path | None = None
    last_save_time: float = dataclasses.field(default_factory=time.monotonic)
    step_times: list[float] = dataclasses.field(default_factory=list)
    last_losses: dict[str, float] = dataclasses.field(default_factory=dict)


def _restore(c: _LoopContext, ckpt: dict[str, Any], path: Path) -> Position:
    """Load a full checkpoint into the run (before DDP wraps the model); returns where to continue."""
    state = ckpt["train_state"]
    c.model.load_state_dict(ckpt["state_dict"])
    c.optimizer.load_state_dict(ckpt["optimizer"])
    c.scaler.load_state_dict(state["scaler"])
    if c.ema is not None and state.get("ema") is not None:
        c.ema.load_state_dict(state["ema"])
    c.bad_steps = int(state.get("bad_steps", 0))
    c.epochs_done = int(state["epoch"])
    c.last_good_checkpoint = path
    rngs = state.get("rng", [])
    if len(rngs) == c.info.world_size:
        set_rng_state(rngs[c.info.rank])
    elif c.info.is_main:
        logger.warning("%s was saved by %d processes, this run has %d: RNG states are not restored", path,
                       len(rngs), c.info.world_size)
    saved_train = state.get("config", {}).get("train", {})
    changed = {k: v for k, v in c.run.to_dict()["train"].items() if saved_train.get(k) != v}
    pos = Position(int(state["epoch"]), int(state["step_in_epoch"]), int(state["global_step"]))
    if c.info.is_main:
        if changed:
            logger.warning("resuming with train settings that differ from %s: %s", path,
                           ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())))
        logger.info("resumed from %s: epoch %d, step %d of %d in the epoch, global step %d", path, pos.epoch + 1,
                    pos.step_in_epoch, c.steps_per_epoch, pos.global_step)
    return pos


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
            skip_reason: str | None = None
            for micro in range(t.grad_accum):
                t_data = time.perf_counter()
                batch = next(batches).to(device, non_blocking=True)
                data_time += time.perf_counter() - t_data
                if skip_reason is not None:
                    continue  # the step is skipped, but its batches are consumed: the data order stays aligned
                last_micro = micro == t.grad_accum - 1
                # Gradients are all-reduced once per optimizer step, on the last micro-batch.
                sync = contextlib.nullcontext() if last_micro or not info.is_distributed else c.wrapped.no_sync()
                with sync:
                    with autocast(device, t.precision):
                        losses = c.wrapped(batch, reduce_fn=reduce_fn)
                    total = sum(losses.values())
                    for k, v in losses.items():
                        step_losses[k] = step_losses.get(k, 0.0) + v.detach().float() / t.grad_accum
                    # Every rank must take the same branch: one skipping its backward alone would leave the
                    # others waiting in the gradient all-reduce.
                    if not _finite_on_all_ranks(total, info):
                        skip_reason = "non-finite loss (" + _non_finite_terms(losses) + ")"
                        continue
                    c.scaler.scale(total / t.grad_accum).backward()
            grad_norm = torch.tensor(float("nan"))
            if skip_reason is None:
                c.scaler.unscale_(c.optimizer)
                max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(c.model.parameters(), max_norm)
                # The gradients are all-reduced, so every rank sees the same norm. With fp16 an overflow is the
                # loss scaler's business: it skips the update and lowers the scale by itself.
                if not torch.isfinite(grad_norm) and not c.scaler.is_enabled():
                    skip_reason = "non-finite gradient norm"
            if skip_reason is None:
                c.scaler.step(c.optimizer)
                c.scaler.update()
                if c.ema is not None:
                    c.ema.update(c.model)
                c.bad_in_a_row = 0
            else:
                _skip_step(c, skip_reason, epoch, step_in_epoch)
            c.global_step += 1
            step_in_epoch += 1
            synchronize(device)
            now = time.perf_counter()
            c.step_times.append(now - t_last)
            step_t.update(now - t_last)
            data_t.update(data_time)
            t_last = now

            # ---- periodic: log --------------------------------------------------------------------------
            finished = step_in_epoch == c.steps_per_epoch
            if c.global_step % t.log_every == 0 or finished or c.global_step == total_steps:
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
                        "skipped_steps": c.bad_steps, **mem,
                    })

            # ---- periodic: a checkpoint inside the epoch, a stop signal ----------------------------------
            stop, due = _stop_or_checkpoint_due(c)
            here = Position(epoch + 1, 0, c.global_step) if finished else Position(epoch, step_in_epoch, c.global_step)
            ends_here = finished or c.global_step >= total_steps  # then the epoch-end block below saves
            if stop or (due and not ends_here):
                _save(c, here, final=stop)
            if stop:
                where = c.last_good_checkpoint or c.work_dir / "last.pth"
                raise TrainingInterrupted(f"stopped by {c.stop.received if c.stop and c.stop.received else 'a signal'}"
                                          f" at epoch {epoch + 1}, step {step_in_epoch} of {c.steps_per_epoch}; "
                                          f"saved {where} — continue with --resume")

        # ---- periodic: checkpoints at the end of an epoch, or where the run stops --------------------
        if step_in_epoch == c.steps_per_epoch:
            c.epochs_done = epoch + 1
            last = epoch + 1 == t.epochs or c.global_step >= total_steps
            _save(c, Position(epoch + 1, 0, c.global_step), final=last)
            if t.eval_every and ((epoch + 1) % t.eval_every == 0 or last):
                _evaluate(c, writer, epoch + 1)
        else:
            _save(c, Position(epoch, step_in_epoch, c.global_step), final=True)
            if t.eval_every:  # train.max_iters ended the run inside an epoch: evaluate where it stopped
                _evaluate(c, writer, epoch + 1)
            break


def _evaluate(c: _LoopContext, writer: MetricWriter, epoch: int) -> None:
    """Evaluate the EMA weights (the model's without EMA) on the validation split; log mAP / NDS."""
    model = c.ema.module if c.ema is not None else c.model
    which = "EMA" if c.ema is not None else "model"
    out = c.work_dir / f"eval_epoch_{epoch}"
    result = evaluate_model(model, c.run, out, quiet=True, checkpoint=f"{which} weights after epoch {epoch}")
    if c.info.is_main:
        m = result.metrics
        logger.info("epoch %d evaluation (%s weights, %s): mAP %.4f, NDS %.4f, mAP (classes with ground truth) "
                    "%.4f; %s", epoch, which, c.run.data.val_split, m["mean_ap"], m["nd_score"],
                    m["map_classes_with_gt"], result.metrics_path)
        writer.write(c.global_step, {"epoch": epoch, "eval_mAP": m["mean_ap"], "eval_NDS": m["nd_score"],
                                     "eval_mAP_classes_with_gt": m["map_classes_with_gt"]})


def _remove_stale_temp_files(work_dir: Path) -> None:
    """Delete half-written checkpoint temporaries of a run that was killed while saving (never read)."""
    for tmp in work_dir.glob(".*.pth.*.tmp"):
        tmp.unlink(missing_ok=True)
        logger.info("removed %s, left by an interrupted save", tmp.name)


def _finite_on_all_ranks(total: torch.Tensor, info: bdist.DistInfo) -> bool:
    bad = torch.tensor(0.0 if bool(torch.isfinite(total.detach()).all()) else 1.0)
    if info.is_distributed:
        bad = bdist.all_reduce_mean(bad)
    return float(bad) == 0.0


def _non_finite_terms(losses: dict[str, torch.Tensor], most: int = 3) -> str:
    terms = [f"{k}={float(v.detach()):.4g}" for k, v in losses.items() if not bool(torch.isfinite(v).all())]
    if not terms:
        return "on another rank"
    more = f" and {len(terms) - most} more" if len(terms) > most else ""
    return ", ".join(terms[:most]) + more


def _skip_step(c: _LoopContext, reason: str, epoch: int, step_in_epoch: int) -> None:
    """Drop this step's gradients: no optimizer, scaler or EMA update; stop after too many in a row."""
    c.optimizer.zero_grad(set_to_none=True)
    c.bad_steps += 1
    c.bad_in_a_row += 1
    limit = c.run.train.max_bad_steps
    if c.info.is_main:
        logger.warning("skipped step %d (epoch %d, iteration %d): %s; %d skipped so far, %d in a row (limit %d)",
                       c.global_step + 1, epoch + 1, step_in_epoch + 1, reason, c.bad_steps, c.bad_in_a_row, limit)
    if c.bad_in_a_row >= limit:
        last = c.last_good_checkpoint
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise TrainingError(f"{c.bad_in_a_row} steps in a row were not finite (train.max_bad_steps={limit}; "
                            f"last: {reason}); stopping — {where}")


def _stop_or_checkpoint_due(c: _LoopContext) -> tuple[bool, bool]:
    """Whether any rank got a stop signal, and whether rank 0's checkpoint clock ran out; the same on all ranks."""
    minutes = c.run.train.checkpoint_minutes
    due = minutes > 0 and c.info.is_main and time.monotonic() - c.last_save_time >= minutes * 60
    got_signal = c.stop is not None and c.stop.received is not None
    flags = torch.tensor([float(got_signal), float(due)])
    if c.info.is_distributed:
        flags = bdist.all_reduce_mean(flags)
    return bool(flags[0] > 0), bool(flags[1] > 0)


def _peak_memory(device: torch.device) -> dict[str, float]:
    """The peak-memory figure of the device: allocator peak on accelerators, process peak RSS on the CPU."""
    stats = memory_stats(device)
    key = "max_rss_mb" if device.type == "cpu" else "max_allocated_mb"
    return {f"peak_{key}": stats[key]} if key in stats else {}


def _save(c: _LoopContext, pos: Position, final: bool = False) -> None:
    """Write a full checkpoint at ``pos``: the epoch's files at an epoch end, else ``last.pth`` alone.

    Rank 0 writes; every rank learns whether it worked. A failed write leaves the previous files intact and
    is retried at the next checkpoint; after ``MAX_FAILED_SAVES`` in a row, or when nothing later would retry
    (``final``: the run ends or stops here), the run stops with ``TrainingError``.
    """
    rngs = bdist.all_gather_object(rng_state())  # every rank's generators, for an exact continuation
    error = ""
    if c.info.is_main:
        t = c.run.train
        payload = full_checkpoint(
            model_state=bdist.unwrap_model(c.model).state_dict(), optimizer_state=c.optimizer.state_dict(),
            ema_state=c.ema.state_dict() if c.ema is not None else None, scaler_state=c.scaler.state_dict(),
            base_lrs=c.base_lrs, position=pos, rngs=rngs, config=c.run.to_dict(), environment=c.environment,
            bad_steps=c.bad_steps,
        )
        try:
            if pos.step_in_epoch == 0 and pos.epoch > 0:
                written = save_epoch_files(c.work_dir, payload, payload["train_state"]["ema"], pos.epoch,
                                           t.keep_checkpoints)
                c.last_good_checkpoint = written[0]
            else:
                save_checkpoint(c.work_dir / "last.pth", payload)
                written = [c.work_dir / "last.pth"]
                c.last_good_checkpoint = written[0]
            where = (f"epoch {pos.epoch + 1}, step {pos.step_in_epoch} in the epoch" if pos.step_in_epoch
                     else f"end of epoch {pos.epoch}")
            logger.info("saved %s (%s, global step %d)", ", ".join(p.name for p in written), where, pos.global_step)
        except CheckpointError as err:
            error = str(err)
    failed = bdist.all_gather_object(error)[0] if c.info.is_distributed else error
    c.last_save_time = time.monotonic()
    if not failed:
        c.failed_saves = 0
        return
    c.failed_saves += 1
    last = c.last_good_checkpoint
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    if final or c.failed_saves >= MAX_FAILED_SAVES:
        why = "the run's last save failed" if final else f"{c.failed_saves} saves in a row failed"
        raise TrainingError(f"{failed}; {why}, stopping — {kept}")
    if c.info.is_main:
        logger.error("%s; %s, training continues and the next checkpoint retries (%d of %d failures allowed in "
                     "a row)", failed, kept, c.failed_saves, MAX_FAILED_SAVES - 1)


__all__ = ["MAX_FAILED_SAVES", "TrainResult", "TrainingError", "TrainingInterrupted", "train"]
