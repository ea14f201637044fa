"""Parameter counts, forward/backward time and peak memory of a model preset on the current device.

Usage: ``bevnext bench model CONFIG [--device D] [--batch-size B] [--repeats R]`` with CONFIG one of the
presets in ``bevnext.config.stages.PRESETS`` (stage1, stage2, tiny-stage1, tiny-stage2). Prints the
parameters of every top-level module, ``total parameters: N``, then one training step's timings (the first,
warm-up step reported separately) and the peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from bevnext.config.stages import PRESETS
    from bevnext.engine.device import memory_stats, reset_peak_memory, resolve_device_type, synchronize
    from bevnext.models.detector import build_model
    from bevnext.synth.batches import random_batch

    parser = argparse.ArgumentParser(prog="bevnext bench model", description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=sorted(PRESETS))
    parser.add_argument("--device", default=None, help="npu, cuda or cpu (default: best available)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the warm-up step")
    args = parser.parse_args(argv)

    device = torch.device(resolve_device_type(args.device))
    cfg = dataclasses.replace(PRESETS[args.config](), pretrained=None)
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


if __name__ == "__main__":
    sys.exit(main())
