"""Benchmark: synthetic dataset generation speed on one CPU core.

Generates 10 scenes x 20 samples at 800 x 450 (6 cameras, LiDAR key frames + 2 sweeps per sample)
into a temporary folder with numpy/torch limited to one thread, and prints the wall time, a
per-stage breakdown and the line ``synth 10 scenes x 20 samples at 800x450: X.X s (target < 60 s)``.

Run: ``python bench/synth.py [--scenes N] [--samples-per-scene M] [--image-size W H] [--keep DIR]``
(also ``bevnext bench synth``).
"""

from __future__ import annotations

import os

# One thread for every numeric library; must be set before numpy/torch are imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

TARGET_S = 60.0


def _limit_threads() -> None:
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # the environment variables above already apply
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 (the target is reported, not enforced)."""
    parser = argparse.ArgumentParser(prog="bench/synth.py", description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=10)
    parser.add_argument("--samples-per-scene", type=int, default=20)
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 450), metavar=("W", "H"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="write the dataset here, not to temp")
    parser.add_argument("--progress", action="store_true", help="show the progress bar")
    args = parser.parse_args(argv)

    _limit_threads()
    try:
        from bevnext.synth.generator import Timings, generate, validate_args
    except ImportError:  # run from a source checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bevnext.synth.generator import Timings, generate, validate_args

    spec = validate_args(args.scenes, args.samples_per_scene, tuple(args.image_size), args.seed, 2, 0.25)
    tmp = None
    if args.keep is not None:
        out = args.keep
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bevnext-bench-synth-"))
        out = tmp / "data"
    timings = Timings()
    try:
        start = time.perf_counter()
        generate(out, spec, progress=args.progress, timings=timings)
        wall = time.perf_counter() - start
        size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    w, h = spec.image_size
    other = wall - (timings.world + timings.render + timings.jpeg + timings.lidar + timings.tables)
    print(f"images: {timings.images} ({w}x{h}), lidar key frames: {spec.scenes * spec.samples_per_scene}, "
          f"sweeps: {timings.sweeps}, annotations: {timings.annotations}, written: {size_mb:.0f} MiB")
    rows = [
        ("scene setup (world, texture, per-camera tables)", timings.world),
        ("render (ray casting)", timings.render),
        ("JPEG encode + write", timings.jpeg),
        ("lidar (ray casting + .pcd.bin write)", timings.lidar),
        ("tables (annotations + JSON)", timings.tables),
        ("other", other),
    ]
    for label, seconds in rows:
        print(f"  {label:<50s} {seconds:7.2f} s  {100.0 * seconds / wall:5.1f} %")
    if timings.images:
        print(f"  per image: render {1e3 * timings.render / timings.images:.1f} ms, "
              f"JPEG {1e3 * timings.jpeg / timings.images:.1f} ms")
    print(f"synth {spec.scenes} scenes x {spec.samples_per_scene} samples at {w}x{h}: {wall:.1f} s "
          f"(target < {TARGET_S:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
