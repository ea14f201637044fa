"""Steady-state training throughput and peak memory of a run, with synthetic batches and with the data loader.

Usage: ``bevnext bench train CONFIG [--device D] [--steps N] [--warmup W] [--batch-size B] [--data-root DIR]
[--num-workers K] [key=value ...]`` with CONFIG a run preset (``stage1``, ``stage2``, ``tiny_stage1``,
``tiny_stage2``) or a run's ``config.json``, and ``key=value`` overrides as for ``bevnext train``
(``model.pretrained=None`` is always added: no weights are looked up, the timings do not depend on them).

Two arms, measured in this process one after the other, so that a GPU or NPU owner sees which one limits:

* synthetic batches: the training step of ``bevnext train`` — ``model(batch)`` in train mode under autocast at
  ``train.precision``, the sum of the losses, backward (through the fp16 loss scaler when there is one),
  gradient clipping at ``train.grad_clip``, the AdamW step and, when ``train.ema`` is on, the EMA update —
  on one ``random_batch`` (20 boxes per sample) made once on the device and reused every step: no loading cost;
* with the data loader: the same step on batches from the real training loader (``build_train_loader``,
  ``--num-workers`` workers, pinned memory on accelerators), moved to the device inside the step as the
  trainer does. It needs the info file ``<data.data_root>/bevnext_infos_<data.train_split>.json``
  (``--data-root DIR`` is short for ``data.data_root=DIR``); without one the arm is skipped with one line
  saying why, and the synthetic arm is still reported.

Both arms run with the same CPU threads (``choose_num_threads``: the cores left after the loader workers), the
same batch size and the same model, one optimizer step per batch (``train.grad_accum`` is not applied; the
learning rate stays at ``train.lr``). Each step ends with a device synchronisation before the clock is read;
the first ``--warmup`` steps of each arm are left out of the steady figures and reported separately.

Per arm: steady samples/s (one sample = one key frame with its 6 cameras and history frames) and samples/s
with the warm-up steps, median ms/step, for the loader arm the median data wait (``next(loader)`` plus the
copy to the device) per step, and the peak memory (accelerators: ``max_allocated_mb``, reset before each
arm; CPU: ``max_rss_mb``, the process's peak resident memory, which cannot be reset, so the loader arm's
figure is the peak of the whole run so far, and which leaves out the loader workers' own memory).
The last line is ``loader-in-the-loop / synthetic: R.RRx (...)``, the ratio of the steady samples/s, saying
whether the loader limits (R < 0.95) or the step does (R >= 0.95; R > 1.05 is flagged as timing noise). Below
0.95 with the data waits all under 5 % of the median step, the verdict is the step, and the lower rate a few slow
steps' (timing noise); with only some waits above that, the loader limits now and then. The arms
run one after the other, not interleaved (interleaving would let the workers prefetch during the synthetic
steps), so load from other processes that changes between them shows up in R: on a shared machine, rerun.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

try:
    import bevnext  # noqa: F401
except ImportError:  # running from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LIMIT_THRESHOLD = 0.95
"""Below this loader / synthetic ratio the loader is said to limit; at or above it, the step."""


class _Trainer:
    """The model, optimizer, scaler and EMA of one run, and its training step (``bevnext train``'s)."""

    def __init__(self, run: Any, device: torch.device) -> None:
        from bevnext.engine.device import grad_scaler, seed_everything
        from bevnext.engine.ema import ModelEMA
        from bevnext.engine.trainer import _build_optimizer
        from bevnext.models.detector import build_model

        t = run.train
        seed_everything(run.runtime.seed, 0, deterministic=run.runtime.deterministic)
        self.model = build_model(run.model).to(device).train()
        self.ema = ModelEMA(self.model, decay=t.ema_decay, tau=t.ema_tau, updates=t.ema_init_updates) if t.ema else None
        self.optimizer = _build_optimizer(self.model, run)
        self.scaler = grad_scaler(device, t.precision)
        self.device, self.precision = device, t.precision
        self.max_norm = t.grad_clip if t.grad_clip > 0 else math.inf

    def step(self, batch: Any) -> float:
        """One optimizer step on ``batch`` (already on the device); returns the total loss."""
        from bevnext.engine.device import autocast

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            losses = self.model(batch)
        total = sum(losses.values())
        value = float(total.detach())  # the trainer checks finiteness every step too (a host sync)
        if not math.isfinite(value):
            bad = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items() if not torch.isfinite(v).all())
            raise FloatingPointError(f"non-finite loss {value} ({bad})")
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        return value


class _Arm:
    """Timings of one arm: per-step seconds, data-wait seconds and the peak memory after it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.step_s: list[float] = []
        self.wait_s: list[float] = []
        self.memory: dict[str, float] = {}
        self.last_loss = float("nan")


def _run_arm(arm: _Arm, trainer: _Trainer, next_batch: Callable[[], Any], steps: int) -> None:
    from bevnext.engine.device import synchronize

    device = trainer.device
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        batch = next_batch()
        t1 = time.perf_counter()
        arm.last_loss = trainer.step(batch)
        synchronize(device)
        t2 = time.perf_counter()
        arm.wait_s.append(t1 - t0)
        arm.step_s.append(t2 - t0)


def _loader_batches(data: Any, device: torch.device, epochs: list[int]) -> Callable[[], Any]:
    """``next_batch`` over the training loader, moving to ``device`` as the trainer does; wraps around epochs."""
    state: dict[str, Iterator[Any]] = {}

    def start(epoch: int) -> None:
        data.set_epoch(epoch)
        state["it"] = iter(data.loader)
        epochs.append(epoch)

    def next_batch() -> Any:
        if "it" not in state:
            start(0)
        try:
            batch = next(state["it"])
        except StopIteration:  # a short epoch: the next one, as training would continue
            start(epochs[-1] + 1)
            batch = next(state["it"])
        return batch.to(device, non_blocking=True)

    return next_batch


def _loader_unavailable(run: Any, given: bool) -> str | None:
    """Why the loader arm cannot run (one line), or None when the info file is there."""
    from bevnext.data.infos import info_path

    path = info_path(run.data.data_root, run.data.train_split)
    if path.is_file():
        return None
    if not given:
        return (f"no data root given (--data-root DIR or data.data_root=DIR) and the config's "
                f"{run.data.data_root!r} has no {path.name}")
    return f"{path} not found (run bevnext create-data --data-root {run.data.data_root} --version VERSION first)"


def _peak(memory: dict[str, float], device: torch.device) -> str:
    if device.type == "cpu":
        if "max_rss_mb" not in memory:
            return "peak memory n/a (no resource module)"
        return f"peak max_rss {memory['max_rss_mb']:.0f} MB (process peak so far)"
    text = f"peak max_allocated {memory.get('max_allocated_mb', 0.0):.0f} MB"
    if "max_reserved_mb" in memory:
        text += f" (max_reserved {memory['max_reserved_mb']:.0f} MB)"
    return text


def _report(arm: _Arm, batch_size: int, warmup: int, device: torch.device) -> float:
    """Print one arm's line; returns its steady samples/s."""
    steady = arm.step_s[warmup:]
    rate = batch_size * len(steady) / sum(steady)
    with_warmup = batch_size * len(arm.step_s) / sum(arm.step_s)
    parts = [f"steady {rate:.3f} samples/s", f"{1e3 * statistics.median(steady):.1f} ms/step (median)"]
    if arm.name != "synthetic batches":
        parts.append(f"data wait {1e3 * statistics.median(arm.wait_s[warmup:]):.1f} ms/step (median)")
    parts += [f"with warm-up {with_warmup:.3f} samples/s", f"first step {1e3 * arm.step_s[0]:.1f} ms",
              _peak(arm.memory, device), f"last loss {arm.last_loss:.4f}"]
    print(f"{arm.name + ':':22s}" + " | ".join(parts))
    return rate


def _verdict(synth: _Arm, loader: _Arm, warmup: int, ratio: float) -> str:
    wait = 1e3 * statistics.median(loader.wait_s[warmup:])
    loader_step = 1e3 * statistics.median(loader.step_s[warmup:])
    synth_step = 1e3 * statistics.median(synth.step_s[warmup:])
    if ratio > 1.0 / LIMIT_THRESHOLD:
        return (f"the step limits: data wait {wait:.1f} ms of {loader_step:.1f} ms/step; the loader arm ran "
                f"{100 * (ratio - 1):.0f}% faster than the synthetic one, which is timing noise (other load on the "
                "machine, too few --steps)")
    if ratio >= LIMIT_THRESHOLD:
        return f"the step limits: data wait {wait:.1f} ms of {loader_step:.1f} ms/step"
    small = (1.0 - LIMIT_THRESHOLD) * loader_step  # a wait below this cannot cost the arm 5 % of its rate
    if wait < small:
        worst = 1e3 * max(loader.wait_s[warmup:])
        if worst >= small:
            return (f"the loader limits now and then: the median data wait is {wait:.1f} ms of {loader_step:.1f} "
                    f"ms/step, the longest {worst:.1f} ms (more --num-workers or train.prefetch_factor)")
        return (f"the step limits: data wait {wait:.1f} ms of {loader_step:.1f} ms/step (medians); the loader arm's "
                f"mean rate is lower because of a few slow steps (slowest {1e3 * max(loader.step_s[warmup:]):.1f} "
                "ms), which is timing noise: rerun with more --steps")
    return (f"the loader limits: it waits {wait:.1f} ms/step for batches, and the rest of the step takes "
            f"{loader_step - wait:.1f} ms vs {synth_step:.1f} ms with synthetic batches (medians)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 (1 on a non-finite loss)."""
    from bevnext.config.run import load_run
    from bevnext.data.loader import build_train_loader
    from bevnext.engine.device import (
        choose_num_threads,
        memory_stats,
        reset_peak_memory,
        resolve_device_type,
        synchronize,
    )
    from bevnext.errors import DataError
    from bevnext.synth.batches import random_batch

    parser = argparse.ArgumentParser(prog="bevnext bench train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="run preset (stage1, stage2, tiny_stage1, tiny_stage2) or config.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run overrides, e.g. train.precision=bf16")
    parser.add_argument("--device", default=None, help="npu, cuda or cpu (default: runtime.device, else best)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm after the warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per arm (left out of steady figures)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per step (default: train.batch_size)")
    parser.add_argument("--data-root", default=None, help="dataset with info files (= data.data_root=DIR)")
    parser.add_argument("--num-workers", type=int, default=None, help="loader workers (default: train.num_workers)")
    args = parser.parse_intermixed_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if (args.batch_size is not None and args.batch_size < 1) or (args.num_workers is not None and args.num_workers < 0):
        parser.error("--batch-size must be >= 1 and --num-workers >= 0")

    overrides = [*args.overrides, "model.pretrained=None"]
    if args.data_root is not None:
        overrides.append(f"data.data_root={str(args.data_root)!r}")
    run = load_run(args.config, overrides)
    requested = args.device or (None if run.runtime.device == "auto" else run.runtime.device)
    device = torch.device(resolve_device_type(requested))
    batch_size = args.batch_size or run.train.batch_size
    workers = run.train.num_workers if args.num_workers is None else args.num_workers
    threads = choose_num_threads(run.runtime.num_threads, 1, workers)
    torch.set_num_threads(threads)
    m, t = run.model, run.train
    source = "" if args.config.replace("-", "_") == run.name else f" from {args.config}"
    print(f"config {run.name}{source}: C={m.context_channels}, frames={m.num_frames}, input {m.input_size}; "
          f"device {device}, threads {threads}, torch {torch.__version__}")
    print(f"batch {batch_size}, precision {t.precision}, {args.warmup} warm-up + {args.steps} timed steps per arm; "
          f"step = forward + backward + clip {t.grad_clip:g} + AdamW{' + EMA' if t.ema else ''}; "
          f"loader: {workers} worker(s), data root {run.data.data_root}")

    trainer = _Trainer(run, device)
    total_steps = args.warmup + args.steps
    current = _Arm("synthetic batches")
    try:
        # (a) synthetic batches, made once on the device.
        batch = random_batch(m, batch_size=batch_size, num_boxes=20).to(device)
        synth = current
        synchronize(device)
        reset_peak_memory(device)
        _run_arm(synth, trainer, lambda: batch, total_steps)
        synth.memory = memory_stats(device)
        batch = None  # free it before the loader arm
        rate_synth = _report(synth, batch_size, args.warmup, device)

        # (b) the real training loader.
        given = args.data_root is not None or any(o.split("=", 1)[0].strip() == "data.data_root"
                                                  for o in args.overrides)
        reason = _loader_unavailable(run, given)
        data = None
        if reason is None:
            try:
                data = build_train_loader(run.data, batch_size=batch_size, num_workers=workers, seed=run.runtime.seed,
                                          pin_memory=device.type != "cpu", prefetch_factor=t.prefetch_factor)
            except DataError as err:
                reason = str(err)
        if data is None:
            print(f"with the data loader: skipped — {reason}")
            print("loader-in-the-loop / synthetic: n/a (loader arm skipped)")
            return 0
        loaded = current = _Arm("with the data loader")
        epochs: list[int] = []
        synchronize(device)
        reset_peak_memory(device)
        _run_arm(loaded, trainer, _loader_batches(data, device, epochs), total_steps)
        loaded.memory = memory_stats(device)
        if len(epochs) > 1:
            print(f"note: the loader's epoch ({data.batches_per_epoch()} batches) ran out; epochs {epochs} were used, "
                  "their starts are in the timings")
        rate_loader = _report(loaded, batch_size, args.warmup, device)
        del data
    except FloatingPointError as err:
        print(f"stopped: {err} ({current.name}, step {len(current.step_s) + 1})")
        return 1
    ratio = rate_loader / rate_synth
    print(f"loader-in-the-loop / synthetic: {ratio:.2f}x ({_verdict(synth, loaded, args.warmup, ratio)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
