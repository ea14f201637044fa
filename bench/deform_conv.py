"""Benchmark: the depth net's deformable 3x3 convolution, torchvision's kernel vs the ``grid_sample`` version.

Run as ``python bench/deform_conv.py [--device auto|cpu|cuda] [--reps N] [--threads T] [--shapes stage1 demo]`` or
``bevnext bench deform-conv``.

Problems: the context branch's ``DeformConv2dPack`` (3x3, 4 groups, one offset group, no bias) with gradients for
input, offsets and weight, at two shapes:

* ``stage1``: one stage-1 sample, B*N = 6 cameras, C = 256 channels (``model.depth_mid_channels``), 32 x 88 feature
  pixels (256 x 704 input, stride 8);
* ``demo``: one batch of the demo's tiny runs, B*N = 8 x 6 = 48 cameras, C = 32, 8 x 22 pixels (64 x 176 input).

Variants, on the same inputs in this process: ``torchvision.ops.deform_conv2d`` and the grid_sample version as
the model runs it (``bevnext.ops.deform_conv._deform_conv2d_grid_sample``: bilinear im2col by ``F.grid_sample``, one
grouped matmul, the columns sampled again in the backward instead of kept). Times are the median forward +
backward over ``--reps`` runs after one warm-up, the two variants taking turns run by run. Memory: the bytes
autograd keeps for the backward beyond the inputs (each storage once, counted with
``torch.autograd.graph.saved_tensors_hooks``), which is what the op adds to a training step's peak; on an
accelerator also the allocator's peak growth during forward + backward. The variants are checked to agree.

The last line is ``deform_conv on DEVICE: grid_sample / torchvision time X.XXx at the stage1 shape, Y.YYx at the
demo shape``: below 1 the grid_sample version is the faster one (``bevnext.ops.deform_conv`` picks it on CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import bevnext  # noqa: F401
except ImportError:  # running from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bevnext.engine.device import device_module, resolve_device_type, saved_for_backward, synchronize
from bevnext.ops.deform_conv import _deform_conv2d_grid_sample

MB = float(2**20)
GROUPS = 4
SHAPES = {"stage1": (6, 256, 32, 88), "demo": (48, 32, 8, 22)}
"""(B*N, C, H, W) of each problem."""

Inputs = dict[str, torch.Tensor]


def build_inputs(shape: tuple[int, int, int, int], device: torch.device) -> Inputs:
    """Random input, offsets of a few pixels (some taps fall outside the map), weight and output gradient."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(0)
    tensors = {
        "x": torch.randn(n, c, h, w, generator=g),
        "offset": 2.0 * torch.randn(n, 18, h, w, generator=g),
        "weight": torch.randn(c, c // GROUPS, 3, 3, generator=g) / (3.0 * c**0.5),
        "grad": torch.randn(n, c, h, w, generator=g),
    }
    return {k: v.to(device) for k, v in tensors.items()}


def run_torchvision(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import deform_conv2d

    return deform_conv2d(x, offset, weight, None, stride=1, padding=1, dilation=1)


def run_grid_sample(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _deform_conv2d_grid_sample(x, offset, weight, None, (1, 1), (1, 1), (1, 1), GROUPS, 1)


VARIANTS: dict[str, Callable[..., torch.Tensor]] = {"torchvision": run_torchvision, "grid_sample": run_grid_sample}


def forward_backward(fn: Callable[..., torch.Tensor], inputs: Inputs) -> tuple[list[torch.Tensor], int]:
    """One forward + backward; returns (output and the three gradients, bytes saved for the backward)."""
    leaves = [inputs[k].detach().requires_grad_(True) for k in ("x", "offset", "weight")]
    with saved_for_backward() as storages:
        out = fn(*leaves)
    out.backward(inputs["grad"])
    # The leaves are the caller's inputs, not activations: leave them out of the saved bytes.
    inputs_bytes = {t.untyped_storage().data_ptr() for t in leaves}
    saved = sum(n for ptr, n in storages.items() if ptr not in inputs_bytes)
    return [out.detach()] + [t.grad for t in leaves], saved


def measure(name: str, shape: tuple[int, int, int, int], device: torch.device, reps: int) -> float:
    """Prints one problem's lines and returns the time ratio grid_sample / torchvision."""
    inputs = build_inputs(shape, device)
    results = {v: forward_backward(fn, inputs) for v, fn in VARIANTS.items()}
    (a, _), (b, _) = results.values()
    far = [int((~torch.isclose(p, q, rtol=1e-3, atol=1e-3 * max(1.0, float(p.abs().max())))).sum())
           for p, q in zip(a, b)]
    # The offset gradient is the bilinear weights' slope, which jumps where a sample crosses a pixel edge; the two
    # implementations round sampling positions differently (by ~1e-7 px), so a few such elements may differ.
    kinks = far[2]
    agree = far[0] == far[1] == far[3] == 0 and kinks <= a[2].numel() // 1000
    n, c, h, w = shape
    print(f"{name}: B*N={n} C={c} {h}x{w}, 3x3, {GROUPS} groups; output and gradients agree: {agree} "
          f"(elements off: output {far[0]}, input grad {far[1]}, weight grad {far[3]}, offset grad {kinks} of "
          f"{a[2].numel()}, where up to 0.1% may sit on a pixel edge)")
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(max(1, reps)):
        for v, fn in VARIANTS.items():
            synchronize(device)
            start = time.perf_counter()
            forward_backward(fn, inputs)
            synchronize(device)
            times[v].append(time.perf_counter() - start)
    module = device_module(device)
    for v, fn in VARIANTS.items():
        line = f"  {v:12s} forward + backward {statistics.median(times[v]) * 1e3:8.1f} ms, kept for the backward " \
               f"beyond its inputs {results[v][1] / MB:7.1f} MB"
        if module is not None and hasattr(module, "max_memory_allocated"):
            synchronize(device)
            module.reset_peak_memory_stats(device)
            base = module.memory_allocated(device)
            forward_backward(fn, inputs)
            synchronize(device)
            line += f", device peak growth {(module.max_memory_allocated(device) - base) / MB:.1f} MB"
        print(line)
    if not agree:
        raise SystemExit(f"{name}: the two variants disagree")
    return statistics.median(times["grid_sample"]) / statistics.median(times["torchvision"])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 on success (exits with a message when the variants disagree)."""
    parser = argparse.ArgumentParser(prog="bench/deform_conv.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per variant (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES),
                        help="problems to run (default: all)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(resolve_device_type(args.device))
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {device.type}: torchvision has deform_conv2d kernels for cpu and cuda only")
    print(f"device {device.type}, torch {torch.__version__}, threads {torch.get_num_threads()}, float32")
    ratios = {name: measure(name, SHAPES[name], device, args.reps) for name in args.shapes}
    at = ", ".join(f"{ratio:.2f}x at the {name} shape" for name, ratio in ratios.items())
    print(f"deform_conv on {device.type}: grid_sample / torchvision time {at}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
