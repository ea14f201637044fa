"""Parameter counts, forward/backward time and peak memory of a model preset on the current device.

Usage: ``bevnext bench model CONFIG [--device D] [--batch-size B] [--repeats R] [--set model.KEY=VALUE ...]
[--compare model.KEY=VALUE ...]`` with CONFIG one of the presets in ``bevnext.config.stages.PRESETS`` (stage1,
stage2, tiny-stage1, tiny-stage2). Prints the parameters of every top-level module, ``total parameters: N``, then
one training step's timings (the first, warm-up step reported separately) and the peak memory.

``--compare`` measures the preset (with any ``--set``) as the baseline and the same with the ``--compare``
settings on top, each in a child process of its own (a process's peak resident memory cannot be reset, and
the second model would otherwise start on the first one's allocator state), and prints the ratios of peak
memory and step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import subprocess
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from bevnext.config.stages import PRESETS
    from bevnext.engine.device import memory_stats, reset_peak_memory, resolve_device_type, synchronize
    from bevnext.errors import ConfigError
    from bevnext.models.detector import build_model
    from bevnext.synth.batches import random_batch

    parser = argparse.ArgumentParser(prog="bevnext bench model", description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=sorted(PRESETS))
    parser.add_argument("--device", default=None, help="npu, cuda or cpu (default: best available)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the warm-up step")
    parser.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE",
                        help="change a model setting of the preset (repeatable)")
    parser.add_argument("--compare", action="append", default=[], metavar="model.KEY=VALUE",
                        help="also measure with this setting and print the ratios (repeatable)")
    args = parser.parse_args(argv)
    try:
        cfg = _model_config(PRESETS[args.config](), args.set + args.compare)
    except ConfigError as err:
        print(f"bench model: {err}", file=sys.stderr)
        return 2
    if args.compare:
        return _compare(args)

    device = torch.device(resolve_device_type(args.device))
    model = build_model(cfg).to(device).train()
    print(f"config {args.config}: C={cfg.context_channels}, frames={cfg.num_frames}, input {cfg.input_size}, "
          f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name, child in model.named_children():
        count = sum(p.numel() for p in child.parameters())
        if count:
            print(f"  {name:28s} {count:>12,d}")
    print(f"total parameters: {sum(p.numel() for p in model.parameters())}")

    batch = random_batch(cfg, batch_size=args.batch_size, num_boxes=20).to(device)
    times = []
    reset_peak_memory(device)
    for step in range(1 + args.repeats):
        model.zero_grad(set_to_none=True)
        synchronize(device)
        t0 = time.perf_counter()
        losses = model.loss(batch)
        total = sum(losses.values())
        synchronize(device)
        t1 = time.perf_counter()
        total.backward()
        synchronize(device)
        t2 = time.perf_counter()
        if not math.isfinite(float(total.detach())):
            print(f"non-finite loss at step {step}: {float(total.detach())}")
            return 1
        times.append((t1 - t0, t2 - t1))
        label = "warm-up" if step == 0 else f"step {step}"
        print(f"  {label:8s} forward {t1 - t0:7.2f} s  backward {t2 - t1:7.2f} s  loss {float(total.detach()):.4f}")
    if args.repeats:
        fwd = sum(t[0] for t in times[1:]) / args.repeats
        bwd = sum(t[1] for t in times[1:]) / args.repeats
        print(f"forward {fwd:.2f} s, backward {bwd:.2f} s per step of batch {args.batch_size} "
              f"({args.batch_size / (fwd + bwd):.3f} samples/s without warm-up, "
              f"{(1 + args.repeats) * args.batch_size / sum(a + b for a, b in times):.3f} with)")
    stats = memory_stats(device)
    print("peak memory: " + ", ".join(f"{k} {v:.0f}" for k, v in stats.items()))
    return 0


def _model_config(preset, settings: list[str]):
    """The preset without pretrained weights and with ``model.KEY=VALUE`` settings applied and validated."""
    from bevnext.config.model import ModelConfig
    from bevnext.config.overrides import apply_overrides

    # A config whose only section is ``model``: keys keep their ``model.`` prefix in every error message.
    settable = dataclasses.make_dataclass("BenchSettings", [("model", ModelConfig)], frozen=True)
    cfg = apply_overrides(settable(dataclasses.replace(preset, pretrained=None)), settings).model
    cfg.validate()
    return cfg


_STEP = re.compile(r"^forward ([0-9.]+) s, backward ([0-9.]+) s per step")
_PEAK = re.compile(r"(max_rss_mb|max_allocated_mb) ([0-9.]+)")


def _measure(args: argparse.Namespace, settings: list[str]) -> tuple[float, dict[str, float]]:
    """Run this benchmark in a child process with ``settings``; (seconds per step, peak memory in MiB by key)."""
    cmd = [sys.executable, __file__, args.config, "--batch-size", str(args.batch_size),
           "--repeats", str(max(1, args.repeats))]
    if args.device:
        cmd += ["--device", args.device]
    for item in settings:
        cmd += ["--set", item]
    print("$ " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench model: the run with {settings or 'the preset'} failed:\n{proc.stdout}{proc.stderr}")
    step, peaks = math.nan, {}
    for line in proc.stdout.splitlines():
        if (m := _STEP.match(line)) is not None:
            step = float(m.group(1)) + float(m.group(2))
            print("  " + line)
        elif line.startswith("peak memory:"):
            peaks = {k: float(v) for k, v in _PEAK.findall(line)}
            print("  " + line)
    return step, peaks


def _compare(args: argparse.Namespace) -> int:
    base_step, base_peak = _measure(args, args.set)
    new_step, new_peak = _measure(args, args.set + args.compare)
    change = " ".join(args.compare)
    print(f"{args.config} with {change} vs without: step time {new_step / base_step:.2f}x "
          f"({base_step:.2f} -> {new_step:.2f} s)")
    for key in ("max_allocated_mb", "max_rss_mb"):
        if base_peak.get(key) and new_peak.get(key):
            print(f"{args.config} with {change} vs without: peak memory ({key}) {new_peak[key] / base_peak[key]:.2f}x "
                  f"({base_peak[key]:.0f} -> {new_peak[key]:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
