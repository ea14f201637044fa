"""Benchmark: activation memory of the mean-field depth CRF vs the reference's unfold formulation.

Run as ``python bench/crf.py [--device auto|cpu|cuda|npu] [--cams 6] [--iters 20] [--reps 2]`` or
``bevnext bench crf``.

Problem: the stage-2 key frame of one sample with gradients: B*N = 6 cameras, D = 118 depth bins, 32 x 88 feature
pixels (256 x 704 input, 8 x 8 colour patches), 20 iterations, float32, forward + backward w.r.t. the logits and the
CRF weight. The canvas mixes flat regions (identical patch colours, where the zeta = 0.001 kernel is 1) with noise.

Variants, run on the same inputs in this process:
* ours: :class:`bevnext.models.crf.MeanFieldCRF` (9 shifted multiply-adds instead of unfold, an autograd Function
  that keeps every ceil(sqrt(T))-th belief and recomputes segments in the backward);
* unfold baseline: the reference formulation written here, 3x3 ``F.unfold`` of the beliefs every iteration and
  plain autograd.

Activation memory, honestly: the bytes of all tensors autograd saves for the backward during the forward, counted
with ``torch.autograd.graph.saved_tensors_hooks`` (each storage once; the custom Function's saved tensors go through
the same hooks). This is the memory held from the CRF's forward until its backward, the quantity that adds up
across a model, and it is device independent. On an accelerator the allocator's peak growth during forward +
backward is printed as well (it includes the transient backward workspace). Times are medians over ``--reps``
runs, the two variants taking turns.

The last line is ``crf activation memory: A MB vs B MB (unfold baseline)`` (MB = 2**20 bytes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import bevnext  # noqa: F401
except ImportError:  # running from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bevnext.engine.device import device_module, resolve_device_type, saved_for_backward, synchronize
from bevnext.models.crf import MeanFieldCRF, color_kernel, label_compatibility, patch_colors

MB = float(2**20)


def unfold_mean_field(
    logits: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor, compat: torch.Tensor, num_iters: int
) -> torch.Tensor:
    """The reference formulation: neighbours by 3x3 unfold (9x expansion), everything kept by autograd."""
    BN, D, h, w = logits.shape
    taps = kernel.reshape(BN, 1, 9, h * w)
    q = torch.softmax(logits, dim=1)
    for _ in range(num_iters):
        neighbours = F.unfold(q, 3, padding=1).view(BN, D, 9, h * w)
        message = weight * (neighbours * taps).sum(dim=2)
        q = torch.softmax(logits - torch.matmul(compat, message).view(BN, D, h, w), dim=1)
    return q


def build_inputs(cams: int, depth_bins: int, height: int, width: int, patch: int, device: torch.device) -> dict:
    """Random logits and a canvas whose left half is flat (so the kernel has 1s between patches)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(cams, depth_bins, height, width, generator=g)
    canvas = torch.randint(0, 256, (cams, height * patch, width * patch, 3), generator=g, dtype=torch.uint8)
    canvas[:, :, : width * patch // 2] = 90
    grad = torch.randn(cams, depth_bins, height, width, generator=g)
    return {"logits": logits.to(device), "canvas": canvas.to(device), "grad": grad.to(device)}


def run_ours(crf: MeanFieldCRF, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return crf(inputs["logits"], inputs["canvas"])


def run_baseline(crf: MeanFieldCRF, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    logits = inputs["logits"]
    with torch.no_grad():
        kernel = color_kernel(patch_colors(inputs["canvas"], crf.patch_size), crf.zeta)
    compat = label_compatibility(logits.shape[1], logits.dtype, logits.device)
    return unfold_mean_field(logits, kernel, crf.ws[0], compat, crf.num_iters)


VARIANTS = {"ours": run_ours, "unfold baseline": run_baseline}


def forward_backward(fn, crf: MeanFieldCRF, inputs: dict) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """One forward + backward; returns (output, saved bytes, grad of logits, grad of the weight)."""
    logits = inputs["logits"].detach().requires_grad_(True)
    crf.zero_grad(set_to_none=True)
    with saved_for_backward() as storages:
        out = fn(crf, {**inputs, "logits": logits})
    out.backward(inputs["grad"])
    return out.detach(), sum(storages.values()), logits.grad, crf.ws[0].grad.detach().clone()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 on success, 1 when the two variants disagree."""
    parser = argparse.ArgumentParser(prog="bench/crf.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or npu (default: auto)")
    parser.add_argument("--cams", type=int, default=6, help="B*N cameras (default: 6, one stage-2 sample)")
    parser.add_argument("--depth-bins", type=int, default=118)
    parser.add_argument("--height", type=int, default=32, help="feature rows (default: 32)")
    parser.add_argument("--width", type=int, default=88, help="feature columns (default: 88)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=2, help="timed runs per variant (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = torch.device(resolve_device_type(args.device))
    patch = 8
    crf = MeanFieldCRF(num_iters=args.iters, patch_size=patch, depth_bins=args.depth_bins).to(device)
    inputs = build_inputs(args.cams, args.depth_bins, args.height, args.width, patch, device)
    print(
        f"device {device.type}, torch {torch.__version__}, threads {torch.get_num_threads()}; B*N={args.cams} "
        f"D={args.depth_bins} h x w={args.height}x{args.width} iterations={args.iters}, float32, forward + backward"
    )

    results = {name: forward_backward(fn, crf, inputs) for name, fn in VARIANTS.items()}
    (out_a, saved_a, gl_a, gw_a), (out_b, saved_b, gl_b, gw_b) = results.values()
    agree = (
        torch.allclose(out_a, out_b, rtol=1e-4, atol=1e-6)
        and torch.allclose(gl_a, gl_b, rtol=1e-3, atol=1e-6)
        and torch.allclose(gw_a, gw_b, rtol=1e-3, atol=1e-4)
    )
    print(
        f"outputs and gradients agree: {agree} (max |dQ| {float((out_a - out_b).abs().max()):.1e}, "
        f"max |d grad_logits| {float((gl_a - gl_b).abs().max()):.1e}, grad_w {float(gw_a):.6g} vs {float(gw_b):.6g})"
    )
    del results, out_a, out_b, gl_a, gl_b

    belief_mb = args.cams * args.depth_bins * args.height * args.width * 4 / MB
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(max(1, args.reps)):
        for name, fn in VARIANTS.items():
            synchronize(device)
            start = time.perf_counter()
            forward_backward(fn, crf, inputs)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    module = device_module(device)
    for name, fn in VARIANTS.items():
        saved = saved_a if name == "ours" else saved_b
        line = (
            f"{name}: saved activations {saved / MB:.1f} MB ({saved / MB / belief_mb:.1f} belief tensors of "
            f"{belief_mb:.1f} MB), forward + backward {statistics.median(times[name]):.3f} s"
        )
        if module is not None and hasattr(module, "max_memory_allocated"):
            synchronize(device)
            module.reset_peak_memory_stats(device)
            base = module.memory_allocated(device)
            forward_backward(fn, crf, inputs)
            synchronize(device)
            line += f", device peak growth {(module.max_memory_allocated(device) - base) / MB:.1f} MB"
        print(line)
    print(f"crf activation memory: {saved_a / MB:.1f} MB vs {saved_b / MB:.1f} MB (unfold baseline)")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
