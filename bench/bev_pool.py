"""Benchmark: bev_pool reference (chunked autograd Function) vs a naive gather-multiply-index_add splat.

Run as ``python bench/bev_pool.py [--device auto|cpu|cuda|npu] [--reps N] [--threads T]`` or
``bevnext bench bev_pool``.

Problem: the stage-2 view transform of one sample frame: B=1, N=6 cameras, D=118 depth bins (1.0 ... 59.5 m,
step 0.5), feature map H x W = 32 x 88 (256 x 704 input, stride 8), C=160 channels, BEV grid 128 x 128 x 1
(x, y in [-51.2, 51.2) step 0.8, z in [-5, 3) one cell). The rank tables come from a ring of six pinhole cameras
(nuScenes-like yaws and intrinsics) through ``voxelize_points`` with the reference's truncation quirk.

Both variants run forward + backward (gradients w.r.t. depth and feat) on the same inputs in this process;
times are the median of ``--reps`` runs after ``--warmup`` runs, the two variants taking turns run by run
(a busy machine then slows both alike). The two are checked to agree (output and both gradients).

Peak memory, honestly:
* CUDA / NPU: ``max_memory_allocated`` growth during one forward + backward, measured in this process after
  resetting the peak counter.
* CPU: torch's CPU allocator keeps no statistics and tracemalloc does not see tensor memory, so each variant runs
  once in a fresh subprocess; after building the inputs (and ``malloc_trim``) it resets its kernel high-water mark
  (``/proc/self/clear_refs``), runs forward + backward, and reports ``VmHWM - VmRSS before``: the peak extra
  resident memory of the op (including the output and gradients, which both variants need). Where that file is
  not writable (non-Linux), the lifetime peak RSS is used instead, which is an upper bound.

Busy machines: OpenMP threads that lose their core stall every parallel op until they get it back. The reference
issues a couple of thousand cache-sized ops, the baseline a dozen huge ones, so on a machine shared with other busy
processes the reference's times (with torch's default threads) swing by 10x or more. ``--threads 1`` or
``OMP_WAIT_POLICY=PASSIVE`` in the environment give steady numbers there; a dedicated machine needs neither.

The last line is ``bev_pool speedup vs baseline: X.XXx, peak memory A MB vs B MB`` (A = reference,
B = naive baseline; MB = 2**20 bytes).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

try:
    import bevnext  # noqa: F401
except ImportError:  # running from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bevnext.engine.device import device_module, resolve_device_type, synchronize
from bevnext.ops.bev_pool import bev_pool, voxelize_points

MB = float(2**20)
B, N, H, W, C = 1, 6, 32, 88, 160
DEPTHS = (1.0, 60.0, 0.5)  # start, stop (exclusive), step -> 118 bins
GRID_LOWER, GRID_INTERVAL, GRID_SIZE = (-51.2, -51.2, -5.0), (0.8, 0.8, 8.0), (128, 128, 1)
IMAGE_W, IMAGE_H = 704, 256
# nuScenes camera yaws (degrees, about +z from the ego's +x), the key-frame ring.
CAMERA_YAWS = (0.0, 55.0, -55.0, 110.0, -110.0, 180.0)


def camera_ring_points() -> torch.Tensor:
    """Frustum points of six pinhole cameras on a ring, in the ego frame.

    Returns:
        (1, 6, 118, 32, 88, 3) float32 points (x forward, y left, z up).
    """
    depths = torch.arange(*DEPTHS, dtype=torch.float64)
    u = torch.linspace(0, IMAGE_W - 1, W, dtype=torch.float64)
    v = torch.linspace(0, IMAGE_H - 1, H, dtype=torch.float64)
    d, vv, uu = torch.meshgrid(depths, v, u, indexing="ij")
    # 1600 x 900 nuScenes intrinsics (f ~ 1266) resized by 0.44 and cropped 140 rows from the top.
    focal, cx, cy = 557.0, 352.0, 58.0
    optical = torch.stack([(uu - cx) / focal * d, (vv - cy) / focal * d, d], dim=-1)  # (D, H, W, 3)
    # Optical axes (x right, y down, z forward) -> ego axes of a camera looking along +x.
    optical_to_forward = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    cams = []
    for yaw_deg in CAMERA_YAWS:
        yaw = math.radians(yaw_deg)
        cos, sin = math.cos(yaw), math.sin(yaw)
        yaw_rot = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
        rot = yaw_rot @ optical_to_forward
        position = torch.tensor([1.0 * cos + 0.5, 1.0 * sin, 1.6], dtype=torch.float64)  # 1 m ring, 1.6 m up
        cams.append(optical @ rot.T + position)
    return torch.stack(cams).unsqueeze(0).float()


def build_inputs(device: torch.device, seed: int = 0) -> dict:
    """Rank tables from the camera ring and random depth distributions / features on ``device``."""
    ranks_bev, ranks_depth, ranks_feat = voxelize_points(camera_ring_points(), GRID_LOWER, GRID_INTERVAL, GRID_SIZE)
    g = torch.Generator().manual_seed(seed)
    num_depths = len(torch.arange(*DEPTHS))
    depth = torch.randn(B, N, num_depths, H, W, generator=g).softmax(dim=2)
    # The depth net emits (B*N, C, H, W); the view transform permutes it to channels-last without a copy.
    feat = torch.randn(B, N, C, H, W, generator=g).permute(0, 1, 3, 4, 2)
    grad_out = torch.randn(B, C, GRID_SIZE[2], GRID_SIZE[1], GRID_SIZE[0], generator=g)
    return {
        "depth": depth.to(device),
        "feat": feat.to(device),
        "ranks_depth": ranks_depth.to(device),
        "ranks_feat": ranks_feat.to(device),
        "ranks_bev": ranks_bev.to(device),
        "grad_out": grad_out.to(device),
        "bev_shape": (B, GRID_SIZE[2], GRID_SIZE[1], GRID_SIZE[0]),
        "num_points": depth.numel(),
    }


def naive_bev_pool(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_shape) -> torch.Tensor:
    """Baseline: gather all P' feature rows at once, weight, index_add_; autograd does the backward.

    This is the textbook pure-PyTorch splat; it holds (P', C) tensors in the forward and again in the backward.
    """
    b, z, y, x = bev_shape
    channels = feat.shape[-1]
    rows = feat.reshape(-1, channels)[ranks_feat.long()] * depth.reshape(-1)[ranks_depth.long()].unsqueeze(1)
    out = torch.zeros(b * z * y * x, channels, dtype=rows.dtype, device=rows.device).index_add(
        0, ranks_bev.long(), rows
    )
    return out.view(b, z, y, x, channels).permute(0, 4, 1, 2, 3)


def reference_bev_pool(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_shape) -> torch.Tensor:
    return bev_pool(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_shape)


VARIANTS = {"reference": reference_bev_pool, "naive": naive_bev_pool}


def forward_backward(fn, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward + backward; returns (out, grad_depth, grad_feat)."""
    depth = inputs["depth"].detach().requires_grad_()
    feat = inputs["feat"].detach().requires_grad_()
    out = fn(depth, feat, inputs["ranks_depth"], inputs["ranks_feat"], inputs["ranks_bev"], inputs["bev_shape"])
    out.backward(inputs["grad_out"])
    return out.detach(), depth.grad, feat.grad


def time_variants(inputs: dict, device: torch.device, warmup: int, reps: int) -> dict[str, list[float]]:
    """Seconds per forward + backward of each variant: ``reps`` runs after ``warmup`` runs.

    The variants take turns run by run, so that a shared or throttling machine slows both alike.
    """
    for fn in VARIANTS.values():
        for _ in range(warmup):
            forward_backward(fn, inputs)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(reps):
        for name, fn in VARIANTS.items():
            synchronize(device)
            start = time.perf_counter()
            forward_backward(fn, inputs)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def _proc_status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def cpu_peak_mb_in_this_process(variant: str) -> float:
    """Extra peak resident memory (MB) of one forward + backward; meant to run in a fresh process."""
    inputs = build_inputs(torch.device("cpu"))
    # Hand memory freed while building the inputs back to the OS first; otherwise the op could reuse those
    # still-resident pages without raising the high-water mark, and its peak would be under-reported.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    before_kb = _proc_status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        reset = True
    except OSError:
        reset = False
    forward_backward(VARIANTS[variant], inputs)
    peak_kb = _proc_status_kb("VmHWM") if reset else None
    if peak_kb is None or before_kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # lifetime peak: an upper bound
    return (peak_kb - before_kb) / 1024.0


def cpu_peak_mb(variant: str, threads: int) -> float:
    """Run :func:`cpu_peak_mb_in_this_process` in a fresh interpreter (allocator state of this one would lie)."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker-memory", variant, "--threads", str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])


def device_peak_mb(fn, inputs: dict, device: torch.device) -> float:
    """Peak allocator growth (MB) of one forward + backward on an accelerator."""
    module = device_module(device)
    synchronize(device)
    module.reset_peak_memory_stats(device)
    base = module.memory_allocated(device)
    forward_backward(fn, inputs)
    synchronize(device)
    return (module.max_memory_allocated(device) - base) / MB


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 on success, 1 when the two variants disagree."""
    parser = argparse.ArgumentParser(prog="bench/bev_pool.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or npu (default: auto)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per variant (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first (default: 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice); 1 gives steadier numbers on a busy shared machine",
    )
    parser.add_argument("--worker-memory", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.worker_memory:
        print(json.dumps({"peak_mb": cpu_peak_mb_in_this_process(args.worker_memory)}))
        return 0

    device = torch.device(resolve_device_type(args.device))
    inputs = build_inputs(device)
    kept = inputs["ranks_bev"].numel()
    print(
        f"device {device.type}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
        f"B={B} N={N} D={inputs['depth'].shape[2]} H={H} W={W} C={C}, BEV {GRID_SIZE[1]}x{GRID_SIZE[0]}x{GRID_SIZE[2]}"
    )
    print(f"points kept {kept} of {inputs['num_points']} ({100.0 * kept / inputs['num_points']:.1f} %)")

    ref = forward_backward(reference_bev_pool, inputs)
    base = forward_backward(naive_bev_pool, inputs)
    agree = all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(ref, base))
    worst = max(float((a - b).abs().max()) for a, b in zip(ref, base))
    print(f"outputs and gradients agree (allclose rtol=1e-4, atol=1e-4): {agree} (max abs diff {worst:.2e})")
    del ref, base

    all_times = time_variants(inputs, device, args.warmup, args.reps)
    results = {}
    for name, fn in VARIANTS.items():
        times = all_times[name]
        if device.type == "cpu":
            peak = cpu_peak_mb(name, torch.get_num_threads())
        else:
            peak = device_peak_mb(fn, inputs, device)
        results[name] = (statistics.median(times), peak)
        print(
            f"{name:>9}: forward+backward median {1e3 * statistics.median(times):8.1f} ms "
            f"(min {1e3 * min(times):.1f}, {len(times)} runs after {args.warmup} warm-up), peak memory {peak:.0f} MB"
        )
    speedup = results["naive"][0] / results["reference"][0]
    print(
        f"bev_pool speedup vs baseline: {speedup:.2f}x, "
        f"peak memory {results['reference'][1]:.0f} MB vs {results['naive'][1]:.0f} MB"
    )
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
