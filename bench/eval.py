"""Stage-2 evaluation throughput with and without reuse of the history frames' image features, vs a FLOP prediction.

Usage: ``bevnext bench eval CONFIG [--device D] [--samples N] [--warmup W] [--scene-length L] [--threads T]
[--full/--no-full] [--full-samples M]`` with CONFIG a multi-frame model preset of
``bevnext.config.stages.PRESETS`` (``tiny-stage2``, ``stage2``; the run spellings ``tiny_stage2`` work too) or a
run's ``config.json``. ``pretrained=None`` always: no weights are looked up, the timings do not depend on them.

At test time a stage-2 sample carries its key frame and the F - 1 previous key frames of its scene, and the next
sample carries the same frames shifted by one. ``ImageFeatureCache`` keeps the image-only part of every frame
(``BEVNeXt.image_features``: image backbone, image neck, the depth net's ``reduce``) and computes it only for the
one new frame of each sample; everything after it (camera-aware depth, CRF, lifting, BEV encoder, heads) is
recomputed for all F frames, because it depends on the current key frame.

For CONFIG, then (unless ``--no-full``, or CONFIG already is the full shape) for the full shape (the ``stage2``
preset: batch 1, 256x704, 9 frames), on one process:

* Two arms on the same sequence of one-sample batches (``random_scene_batches``: scenes of ``--scene-length``
  samples, in order, as the test pipeline delivers them): *recompute* (``forward_features(batch)``) and *reuse*
  (``forward_features(batch, cache)``), each followed by decoding (``postprocess``), i.e. ``predict``; batch 1,
  eval mode, ``torch.no_grad()``, fp32. The arms are interleaved sample by sample, alternating which goes first,
  so that load from other processes drifting during the run hits both alike. Each call ends with a device
  synchronisation before the clock is read; the batch is moved to the device outside the clock. The first
  ``--warmup`` samples (default 1) of each arm are left out of the steady figures and reported separately.
* Agreement: per sample, the max |reuse - recompute| of the heads' raw outputs (heatmap logits, regression maps)
  and of the decoded boxes; above ``AGREE_TOLERANCE`` x max(1, largest |output|) the run reports DISAGREE and
  exits 1 — a fast wrong path is worthless.
* FLOPs, counted with ``torch.utils.flop_counter.FlopCounterMode`` (torch >= 2.1; "n/a" without it) after the
  timed arms (so that their warm-up is the process's real first call): ``image_features`` on one frame (6 images)
  and one full ``forward_features`` without a cache. With ``share`` = image FLOPs x F / full FLOPs, a sample
  without reuse costs ``full``, with reuse ``full - (F - 1) x image`` = ``full x (1 - share x (F - 1) / F)``
  (F - 1 of the F frames skip the image part), so the predicted speed-up is
  ``1 / (1 - share x (F - 1) / F)``. FlopCounterMode counts matrix products and convolutions only: elementwise
  work (the CRF's iterations, activations, normalisation), ``bev_pool``'s scatter, the sampling of deformable
  attention and torchvision's ``deform_conv2d`` (the depth net's context branch, run for every frame) cost time
  but no counted FLOPs, so they make the real image share — and the speed-up —
  smaller than the FLOP prediction.
* A second prediction from time rather than FLOPs: the recompute arm's median time of one ``image_features``
  call (one frame; timed inside the arms through a wrapper on the model instance, with a synchronisation around
  it — free on the CPU, a small queue drain per frame on accelerators, the same in both arms) gives
  ``T / (T - (F - 1) x t_image)`` with T the median recompute time per sample. Measured ~ time-based prediction
  < FLOP prediction means non-FLOP costs; measured < time-based prediction means overhead in the reuse path.

Measured speed-up = median time per sample without reuse / with reuse over the steady samples (medians, because
on a shared machine other processes' bursts land on single samples; the ratio of the steady samples/s, i.e. of
the mean times, is printed beside it).

Output per shape: a header ``config NAME: ...; device D, torch X, threads T``; one line per sample as it finishes
(both arms' ms); one line per arm (steady samples/s, median ms/sample, samples/s with warm-up, the warm-up
time, the image part's median ms/frame, frames computed per sample); the agreement line; the FLOP line; the
measured and the predicted speed-up lines; then the summary line ``NAME: history reuse speed-up: measured X.XXx,
predicted Y.YYx`` — except for the full stage-2 shape, whose summary line has no prefix:
``history reuse speed-up: measured X.XXx, predicted Y.YYx``. The full shape runs last, so when it runs its line
is the last line of the output; the unprefixed line always means the full shape. With ``--no-full`` (and a
CONFIG other than the full shape) the last line is CONFIG's prefixed one. ``predicted n/a`` when FLOPs cannot be
counted. At the full shape on an idle 2-core CPU a sample takes ~27 s without reuse: the default
``--full-samples 3`` keeps the whole run at about four minutes there.

Threads: ``--threads`` if given, else every core this process may use (``choose_num_threads`` with no loader
workers: evaluation here has none). All batches of a shape are made before timing (at the full shape about
120 MB each, F frames x 6 images).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

try:
    import bevnext  # noqa: F401
except ImportError:  # running from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL_PRESET = "stage2"
"""The full shape measured after CONFIG unless ``--no-full``."""

AGREE_TOLERANCE = 1e-4
"""Reuse agrees with recompute when max |difference| <= this x max(1, largest |output|) (float rounding only)."""

SPEEDUP_LINE = "history reuse speed-up: measured {measured}, predicted {predicted}"
"""The summary line of one shape (prefixed with ``NAME: `` except for the full shape)."""


class _ImageTimer:
    """Stands in for ``model.image_features`` on the instance and times each call into the current arm's list.

    Both the uncached path and ``ImageFeatureCache`` look ``self.image_features`` up on the instance, so this
    wrapper sees every image-part computation of both arms without touching the model's code.
    """

    def __init__(self, inner: Callable[[Tensor], Tensor], device: torch.device) -> None:
        from bevnext.engine.device import synchronize

        self.inner = inner
        self.sync = lambda: synchronize(device)
        self.sink: list[float] = []

    def __call__(self, images: Tensor) -> Tensor:
        self.sync()
        t0 = time.perf_counter()
        out = self.inner(images)
        self.sync()
        self.sink.append(time.perf_counter() - t0)
        return out


class _Arm:
    """One arm's timings: seconds per sample, seconds per image-part call, and the image calls per sample."""

    def __init__(self, name: str, cache: Any) -> None:
        self.name = name
        self.cache = cache
        self.sample_s: list[float] = []
        self.image_s: list[float] = []
        self.image_calls: list[int] = []


class _Agreement:
    """Running maxima of |reuse - recompute| over the measured samples."""

    def __init__(self) -> None:
        self.heatmap = 0.0
        self.regression = 0.0
        self.boxes = 0.0
        self.scale = 0.0  # largest |recompute output|, for the relative tolerance
        self.samples = 0
        self.same_count = 0  # samples whose decoded detections have the same count in both arms

    def update(self, fresh: Any, fresh_dets: list[Any], reused: Any, reused_dets: list[Any]) -> None:
        """Fold one sample's raw head outputs and decoded detections of both arms in."""
        def diff(a: list[dict[str, Tensor]], b: list[dict[str, Tensor]]) -> float:
            return max((float((x[k].float() - y[k].float()).abs().max()) for x, y in zip(a, b) for k in x),
                       default=0.0)

        self.heatmap = max(self.heatmap, diff(fresh.proposals, reused.proposals))
        self.regression = max(self.regression, diff(fresh.regression, reused.regression))
        for maps in (*fresh.proposals, *fresh.regression):
            self.scale = max(self.scale, max(float(v.float().abs().max()) for v in maps.values()))
        self.samples += 1
        if all(a.boxes.shape == b.boxes.shape for a, b in zip(fresh_dets, reused_dets)):
            self.same_count += 1
            for a, b in zip(fresh_dets, reused_dets):
                if a.boxes.numel():
                    self.boxes = max(self.boxes, float((a.boxes - b.boxes).abs().max()))

    @property
    def agrees(self) -> bool:
        limit = AGREE_TOLERANCE * max(1.0, self.scale)
        return max(self.heatmap, self.regression) <= limit and self.same_count == self.samples

    def line(self) -> str:
        verdict = "agree" if self.agrees else "DISAGREE"
        return (f"  agreement over {self.samples} samples: max |reuse - recompute| heatmap logits "
                f"{self.heatmap:.2e}, regression {self.regression:.2e} (largest |output| {self.scale:.3g}; tolerance "
                f"{AGREE_TOLERANCE:g} x max(1, that)), decoded boxes {self.boxes:.2e} ({self.same_count}/"
                f"{self.samples} samples with equal detection counts) -> {verdict}")


def _model_config(spec: str) -> tuple[str, Any]:
    """(label, model config with ``pretrained=None``) of a model preset, a run preset or a run's config.json."""
    from bevnext.config.run import load_run
    from bevnext.config.stages import PRESETS

    name = spec.replace("_", "-")
    if name in PRESETS:
        return name, dataclasses.replace(PRESETS[name](), pretrained=None)
    run = load_run(spec)  # raises ConfigError naming the presets when it is neither
    label = run.name.replace("_", "-")
    # A config file's model may differ from the preset it is named after: say where it came from.
    return (label if name.replace("-", "_") == run.name else f"{label} from {spec}"), dataclasses.replace(
        run.model, pretrained=None)


def _count_flops(fn: Callable[[], object]) -> int | None:
    """FLOPs that ``FlopCounterMode`` counts while ``fn`` runs, or None on a torch without it (< 2.1)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _arm_line(arm: _Arm, warmup: int) -> str:
    steady = arm.sample_s[warmup:]
    rate = len(steady) / sum(steady)
    with_warmup = len(arm.sample_s) / sum(arm.sample_s)
    first = f"warm-up {1e3 * statistics.mean(arm.sample_s[:warmup]):.1f} ms/sample" if warmup else "no warm-up"
    calls = arm.image_calls[warmup:]
    image = statistics.median(arm.image_s) if arm.image_s else math.nan
    return (f"  {arm.name + ':':11s}steady {rate:.3f} samples/s, {1e3 * statistics.median(steady):.1f} ms/sample "
            f"(median) | with warm-up {with_warmup:.3f} samples/s, {first} | image part {1e3 * image:.1f} ms/frame "
            f"(median), {sum(calls) / len(calls):.2f} frames computed per sample")


def _run_shape(label: str, cfg: Any, device: torch.device, threads: int, args: argparse.Namespace,
               samples: int, is_full: bool) -> tuple[float, float | None, bool]:
    """Measure one shape and print its report; returns (measured speed-up, predicted or None, agreement)."""
    from bevnext.engine.device import seed_everything, synchronize
    from bevnext.models.detector import build_model
    from bevnext.models.feature_cache import ImageFeatureCache
    from bevnext.synth.batches import random_scene_batches

    frames = cfg.num_frames
    shape = " (full shape)" if is_full else ""
    print(f"config {label}{shape}: C={cfg.context_channels}, frames={frames}, input {tuple(cfg.input_size)}, "
          f"batch 1, fp32, eval + no_grad; device {device}, torch {torch.__version__}, threads {threads}")
    total = args.warmup + samples
    lengths = [args.scene_length] * (total // args.scene_length)
    if total % args.scene_length:
        lengths.append(total % args.scene_length)
    print(f"  {args.warmup} warm-up + {samples} timed samples per arm, interleaved sample by sample; "
          f"scenes of {', '.join(map(str, lengths))} samples")

    seed_everything(0)
    model = build_model(cfg).to(device).eval()
    batches = random_scene_batches(cfg, scene_lengths=lengths, seed=0)
    timer = _ImageTimer(model.image_features, device)
    model.image_features = timer  # an instance attribute shadows the method for this model only
    recompute = _Arm("recompute", None)
    reuse = _Arm("reuse", ImageFeatureCache())
    agreement = _Agreement()
    with torch.no_grad():
        for i, host_batch in enumerate(batches):
            batch = host_batch.to(device)
            results: dict[str, tuple[Any, list[Any]]] = {}
            # Alternate the order so neither arm always runs right after the other (caches, clocks, drift).
            for arm in (recompute, reuse) if i % 2 == 0 else (reuse, recompute):
                timer.sink = arm.image_s if i >= args.warmup else []
                before = len(timer.sink)
                synchronize(device)
                t0 = time.perf_counter()
                out = model.forward_features(batch, arm.cache)
                dets = model.postprocess(out)
                synchronize(device)
                arm.sample_s.append(time.perf_counter() - t0)
                arm.image_calls.append(len(timer.sink) - before)
                results[arm.name] = (out, dets)
            if i >= args.warmup:
                agreement.update(*results["recompute"], *results["reuse"])
            # One line per sample as it finishes: progress on slow shapes, and the spread of the timings in sight.
            kind = "warm-up" if i < args.warmup else "timed"
            print(f"  sample {i + 1}/{total} ({kind}): recompute {1e3 * recompute.sample_s[-1]:.1f} ms, "
                  f"reuse {1e3 * reuse.sample_s[-1]:.1f} ms", flush=True)
            del results, batch
    del model.image_features  # back to the class's method for the FLOP count

    for arm in (recompute, reuse):
        print(_arm_line(arm, args.warmup))
    print(agreement.line())

    first = batches[0].to(device)
    with torch.no_grad():
        image_flops = _count_flops(lambda: model.image_features(first.images[:, 0].flatten(0, 1)))
        full_flops = _count_flops(lambda: model.forward_features(first))
    predicted: float | None = None
    if image_flops is None or full_flops is None or not full_flops:
        print("  FLOPs: n/a (torch.utils.flop_counter.FlopCounterMode needs torch >= 2.1)")
    else:
        share = image_flops * frames / full_flops
        predicted = 1.0 / (1.0 - share * (frames - 1) / frames)
        print(f"  FLOPs (FlopCounterMode: convolutions and matrix products only): image part "
              f"{image_flops / 1e9:.2f} GFLOP per frame of {first.images.shape[2]} images, full forward "
              f"{full_flops / 1e9:.2f} GFLOP; image share {frames} x {image_flops / 1e9:.2f} / "
              f"{full_flops / 1e9:.2f} = {100 * share:.1f}%")

    rate = {arm.name: len(arm.sample_s[args.warmup:]) / sum(arm.sample_s[args.warmup:]) for arm in (recompute, reuse)}
    t_sample = statistics.median(recompute.sample_s[args.warmup:])
    # Medians: on a shared machine other processes' bursts land on single samples; the mean-based ratio (of the
    # samples/s above) is printed beside it, and the two differ by about the noise.
    measured = t_sample / statistics.median(reuse.sample_s[args.warmup:])
    t_image = statistics.median(recompute.image_s)
    saved = (frames - 1) * t_image
    by_time = t_sample / (t_sample - saved) if saved < t_sample else math.inf
    flop_part = (f"by FLOPs 1 / (1 - share x {frames - 1}/{frames}) = {predicted:.2f}x, measured / predicted "
                 f"{100 * measured / predicted:.0f}%" if predicted is not None else "by FLOPs n/a")
    print(f"  measured speed-up {measured:.2f}x (median ms/sample without / with reuse; ratio of the steady "
          f"samples/s {rate['reuse'] / rate['recompute']:.2f}x)")
    print(f"  predicted speed-up {flop_part}; by time: image part {100 * frames * t_image / t_sample:.1f}% of a "
          f"recompute sample ({frames} x {1e3 * t_image:.1f} of {1e3 * t_sample:.1f} ms), {frames - 1} frames saved "
          f"-> {by_time:.2f}x")
    line = SPEEDUP_LINE.format(measured=f"{measured:.2f}x",
                               predicted="n/a" if predicted is None else f"{predicted:.2f}x")
    print(line if is_full else f"{label}: {line}")
    return measured, predicted, agreement.agrees


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 1 when reuse and recompute disagree."""
    from bevnext.config.stages import PRESETS
    from bevnext.engine.device import choose_num_threads, resolve_device_type
    from bevnext.errors import ConfigError

    parser = argparse.ArgumentParser(prog="bevnext bench eval", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="multi-frame model preset (tiny-stage2, stage2; tiny_stage2 works too) "
                        "or a run's config.json")
    parser.add_argument("--device", default=None, help="npu, cuda or cpu (default: best available)")
    parser.add_argument("--samples", type=int, default=None,
                        help="timed samples per arm at CONFIG (default: 10, or --full-samples' if CONFIG is stage2)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up samples per arm (left out of steady figures)")
    parser.add_argument("--scene-length", type=int, default=40, help="samples per scene (nuScenes: about 40)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: every core this process may use)")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                        help=f"then measure the full shape ({FULL_PRESET} preset) too (default: yes)")
    # 3: on an idle 2-core CPU a full-shape sample takes ~27 s without reuse and ~17 s with it, the FLOP count one
    # more forward: about four minutes in all. Other processes on the cores stretch that several times.
    parser.add_argument("--full-samples", type=int, default=3, help="timed samples per arm at the full shape")
    args = parser.parse_args(argv)
    counts = (1 if args.samples is None else args.samples, args.full_samples, args.scene_length)
    if min(counts) < 1 or args.warmup < 0 or args.threads < 0:
        parser.error("--samples, --full-samples and --scene-length must be >= 1, --warmup and --threads >= 0")
    try:
        label, cfg = _model_config(args.config)
    except ConfigError as err:
        parser.error(str(err))
    if cfg.num_frames < 2:
        parser.error(f"{args.config} has {cfg.num_frames} frame: no history to reuse (use a stage-2 config)")

    device = torch.device(resolve_device_type(args.device))
    threads = choose_num_threads(args.threads, 1, 0)
    torch.set_num_threads(threads)
    full_cfg = dataclasses.replace(PRESETS[FULL_PRESET](), pretrained=None)
    is_full = cfg == full_cfg
    samples = args.samples if args.samples is not None else (args.full_samples if is_full else 10)
    shapes = [(label, cfg, samples, is_full)]
    if args.full and cfg != full_cfg:
        shapes.append((FULL_PRESET, full_cfg, args.full_samples, True))
    ok = True
    for name, shape_cfg, samples, is_full in shapes:
        ok = _run_shape(name, shape_cfg, device, threads, args, samples, is_full)[2] and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
