"""Benchmark: stage-2 train loading throughput of one data-loader worker, ``load_image`` vs the reference chain.

Run as ``python bench/loader.py [--samples N] [--warmup W] [--info PATH]`` or ``bevnext bench loader``.

One sample = one key frame with 8 previous frames, 6 cameras each: 54 camera images, decoded and
augmented with the reference's training augmentation (``reference/bevnext-model.md`` §4.3: resize
U(0.38, 0.55), bottom crop 704 x 256, flip p=0.5, rotation U(-5.4, 5.4) deg, one draw per camera shared
by its 9 frames). Two arms, measured in this process, one thread for everything (OMP/MKL/torch), so the
numbers are per worker:

* ours: ``bevnext.data.image_io.load_image`` as the dataset calls it (reduced-size JPEG decoding + one
  bilinear affine warp, with its default backend: OpenCV's warp when cv2 imports, else PIL's);
* ours-pil: the same with ``backend="pil"`` (PIL's ``Image.transform``), reported for information;
* baseline: ``baseline_load_image`` below, the reference's steps (full decode, PIL resize with its
  default bicubic filter, crop, flip, rotate with PIL's default nearest filter).

Mode: when ``bevnext.data.dataset.BEVDataset`` and ``bevnext.config.data.DataConfig`` are importable,
the whole ``dataset[i]`` of the stage-2 train pipeline is timed, once with each ``load_image``
(everything else the dataset does — poses, depth targets, boxes — is shared by the arms; it leaves the
normalisation to the collate function). Otherwise only the image part is timed: per sample the 54
image loads plus the reference's normalisation to float32 CHW (the same function for all arms, so
the ratios isolate the image loading). The mode is printed.

Data: by default a synthetic nuScenes dataset (2 scenes x 20 samples, 1600 x 900 JPEGs; one scene is
the train split) generated into a temporary folder; ``--info`` points at an existing info file instead
(e.g. real nuScenes; its folder must be the data root). Only samples with a full 8-frame history in
their scene are timed: the dataset decodes a repeated frame once, so a scene's first samples would
load fewer than 54 images and flatter every arm. The same samples and augmentations go through all
arms, which take turns sample by sample (order reversed every sample) so that a busy machine slows
them alike. The first ``--warmup`` samples of each arm are reported separately ("with warm-up"
counts them, "steady" does not).

The last line is ``loader speedup vs baseline: X.XXx (A vs B samples/s per worker)`` with A = ours
(default backend), B = baseline, steady state.
"""

from __future__ import annotations

import os

# One thread for every numeric library; must be set before numpy/torch are imported.
for _var in (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, features  # noqa: E402

try:
    import bevnext  # noqa: F401
except ImportError:  # running from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bevnext.data import image_io  # noqa: E402
from bevnext.data.image_aug import ImageAug  # noqa: E402
from bevnext.data.image_io import load_image  # noqa: E402

CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")
NUM_PREV = 8  # stage 2: the key frame and 8 previous frames
FINAL_W, FINAL_H = 704, 256
# The reference's normalisation (mmcv imnormalize, to_rgb=True applied to an RGB array: BGR quirk).
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)

LoadFn = Callable[[str | Path, ImageAug], np.ndarray]


def baseline_load_image(path: str | Path, aug: ImageAug) -> np.ndarray:
    """The reference's image steps: full decode, resize (PIL default bicubic), crop, flip, rotate (nearest).

    Args:
        path: image file.
        aug: augmentation; the resized size is ``(int(W * resize), int(H * resize))`` as in the reference.

    Returns:
        (H_out, W_out, 3) uint8 RGB.
    """
    img = Image.open(path)
    img = img.resize((int(img.width * aug.resize), int(img.height * aug.resize)))
    img = img.crop(aug.crop)
    if aug.flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = img.rotate(aug.rotate_deg)
    return np.array(img)


def reference_train_aug(rng: np.random.Generator, size: tuple[int, int]) -> ImageAug:
    """One draw of the reference's training image augmentation (§4.3) for an image of ``size`` (W, H)."""
    w, h = size
    resize = FINAL_W / w + rng.uniform(-0.06, 0.11)
    new_w, new_h = int(w * resize), int(h * resize)
    top = new_h - FINAL_H  # bottom crop
    left = int(rng.uniform(0, max(0, new_w - FINAL_W)))
    flip = bool(rng.random() < 0.5)
    rotate = float(rng.uniform(-5.4, 5.4))
    return ImageAug(resize, (left, top, left + FINAL_W, top + FINAL_H), flip, rotate)


def normalize(img: np.ndarray) -> np.ndarray:
    """The reference's normalisation of one image, done in one float pass.

    Args:
        img: (H, W, 3) uint8 RGB.

    Returns:
        (3, H, W) float32: channel c = (img[..., 2 - c] - MEAN[c]) / STD[c] (the BGR quirk).
    """
    out = np.empty((3, *img.shape[:2]), dtype=np.float32)
    for c in range(3):
        # Subtract straight from the uint8 plane into float32 (no intermediate copy), then scale in place.
        np.subtract(img[..., 2 - c], MEAN[c], out=out[c], dtype=np.float32)
        out[c] *= 1.0 / STD[c]
    return out


def _frames(infos: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    """The key info and its 8 previous ones; missing history repeats the key frame (reference §4.2)."""
    by_token = {info["token"]: info for info in infos}
    key = infos[index]
    prev = [by_token[t] for t in key.get("prev_tokens", [])[:NUM_PREV] if t in by_token]
    return [key] + prev + [key] * (NUM_PREV - len(prev))


def image_sample(
    infos: list[dict[str, Any]], data_root: Path, index: int, seed: int, load: LoadFn, stage_s: dict[str, float]
) -> list[np.ndarray]:
    """The image part of one stage-2 train sample: 6 cameras x 9 frames loaded and normalised.

    Args:
        infos: the info file's records.
        data_root: folder the records' paths are relative to.
        index: key sample.
        seed: augmentation seed (the same for both arms).
        load: ``load_image`` or ``baseline_load_image``.
        stage_s: accumulates seconds spent in ``"load"`` and ``"normalize"``.

    Returns:
        54 arrays of shape (3, 256, 704) float32, camera-major (key frame first within a camera).
    """
    rng = np.random.default_rng(seed)
    frames = _frames(infos, index)
    out = []
    for cam in CAMERAS:
        size = (int(frames[0]["cams"][cam]["width"]), int(frames[0]["cams"][cam]["height"]))
        aug = reference_train_aug(rng, size)
        for frame in frames:
            t0 = time.perf_counter()
            img = load(data_root / frame["cams"][cam]["path"], aug)
            t1 = time.perf_counter()
            out.append(normalize(img))
            t2 = time.perf_counter()
            stage_s["load"] += t1 - t0
            stage_s["normalize"] += t2 - t1
    return out


def _dataset_api() -> tuple[Any, Any] | str:
    """``(BEVDataset, DataConfig)`` when the dataset is available, else the reason it is not."""
    try:
        from bevnext.config.data import DataConfig
        from bevnext.data.dataset import BEVDataset
    except ImportError as exc:
        return f"{exc}"
    return BEVDataset, DataConfig


def _make_datasets(api: tuple[Any, Any], info: Path, data_root: Path, loaders: dict[str, LoadFn | None]) -> dict:
    """Stage-2 train datasets (8 previous frames), one per arm; ``None`` = the dataset's default loader."""
    dataset_cls, config_cls = api
    cfg = dataclasses.replace(config_cls(), num_prev_frames=NUM_PREV)
    return {
        name: dataset_cls(info, data_root, cfg, train=True)
        if load is None
        else dataset_cls(info, data_root, cfg, train=True, load_image=load)
        for name, load in loaders.items()
    }


def _seed_everything(seed: int) -> None:
    # The dataset draws its augmentations from some generator; seeding all of them per sample gives both
    # arms the same draws whichever it uses.
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the legacy global generator, if the dataset uses it
    torch.manual_seed(seed)


def _run_arms(run: dict[str, Callable[[int, int], object]], indices: list[int], seed: int) -> dict[str, list[float]]:
    """Per-sample seconds of each arm; arms take turns per sample, their order swapping every sample."""
    names = list(run)
    times: dict[str, list[float]] = {name: [] for name in names}
    for k, index in enumerate(indices):
        order = names if k % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            run[name](index, seed + k)
            times[name].append(time.perf_counter() - t0)
    return times


def _full_history(infos: list[dict[str, Any]]) -> list[int]:
    """Indices of the samples whose 8 previous key frames all exist (54 distinct camera images)."""
    return [i for i, info in enumerate(infos) if len(info.get("prev_tokens", [])) >= NUM_PREV]


def _generate(tmp: Path) -> Path:
    from bevnext.data.infos import create_infos
    from bevnext.synth import generate_dataset

    t0 = time.perf_counter()
    root = generate_dataset(
        tmp / "data", scenes=2, samples_per_scene=20, image_size=(1600, 900), seed=0, progress=False
    )
    paths = create_infos(root, "v1.0-synth", progress=False)
    print(f"generated synthetic dataset (2 scenes x 20 samples, 1600x900) in {time.perf_counter() - t0:.1f} s")
    # The split with the most samples (the synthetic train split).
    return max(paths, key=lambda p: len(json.loads(p.read_text())["infos"]))


def _report(times: dict[str, list[float]], warmup: int, stages: dict[str, dict[str, float]]) -> dict[str, float]:
    """Print each arm's throughput (steady and with warm-up); returns the steady samples/s per arm."""
    rates = {}
    n_images = len(CAMERAS) * (NUM_PREV + 1)
    for name, t in times.items():
        steady_s = sum(t[warmup:])
        rates[name] = (len(t) - warmup) / steady_s
        print(
            f"{name:9s} steady {rates[name]:6.3f} samples/s ({1e3 * steady_s / (len(t) - warmup):7.1f} ms/sample)"
            f" | with warm-up {len(t) / sum(t):6.3f} samples/s | first sample {1e3 * t[0]:7.1f} ms"
        )
        acc = stages.get(name)
        if acc and acc["load"] > 0:  # images-only mode: where the time goes, per image, over all samples
            per = 1e3 / (len(t) * n_images)
            load_ms, norm_ms = acc["load"] * per, acc["normalize"] * per
            print(f"{'':9s} per image: load+augment {load_ms:5.2f} ms, normalise {norm_ms:5.2f} ms")
    return rates


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 (the target ratio is reported, not enforced)."""
    parser = argparse.ArgumentParser(prog="bench/loader.py", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10, help="timed samples per arm after the warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up samples per arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--info", type=Path, default=None, help="existing info file (its folder = data root)")
    parser.add_argument("--images-only", action="store_true", help="time the image part even if the dataset exists")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.warmup < 0:
        parser.error("--samples must be >= 1 and --warmup >= 0")
    torch.set_num_threads(1)
    image_io.set_opencv_threads(1)  # OpenCV would otherwise split each warp over all cores: not one worker's rate
    cv2 = image_io._opencv()

    print(
        f"Pillow {Image.__version__}, libjpeg-turbo: {features.check_feature('libjpeg_turbo')} "
        f"({features.version('jpg')}), OpenCV {cv2.__version__ if cv2 is not None else 'not importable'}, "
        f"numpy {np.__version__}, torch {torch.__version__}, 1 thread"
    )
    print(f"ours = load_image, backend {image_io.resolve_backend('auto', 'bilinear')!r} (auto); ours-pil = PIL warp")
    # The arms' image loaders; None = the dataset's own default (which is load_image).
    loaders: dict[str, LoadFn | None] = {
        "ours": None,
        "ours-pil": functools.partial(load_image, backend="pil"),
        "baseline": baseline_load_image,
    }
    stages = {name: {"load": 0.0, "normalize": 0.0} for name in loaders}
    tmp = None
    try:
        if args.info is None:
            tmp = Path(tempfile.mkdtemp(prefix="bevnext_bench_loader_"))
            info_path = _generate(tmp)
        else:
            info_path = args.info
        data_root = info_path.parent
        infos = json.loads(info_path.read_text())["infos"]
        jpeg_kb = np.mean([(data_root / i["cams"][c]["path"]).stat().st_size for i in infos for c in CAMERAS]) / 1e3
        indices = _full_history(infos)
        print(
            f"data: {info_path} ({len(infos)} samples, {len(indices)} with a full {NUM_PREV}-frame history; "
            f"mean camera file {jpeg_kb:.0f} kB)"
        )
        if not indices:
            print(f"no sample has {NUM_PREV} previous frames: nothing to time", file=sys.stderr)
            return 1
        needed = args.warmup + args.samples
        if len(indices) < needed:
            print(f"note: {needed} samples asked for, {len(indices)} available: samples repeat")
        order = [indices[k % len(indices)] for k in range(needed)]

        api = "--images-only given" if args.images_only else _dataset_api()
        run: dict[str, Callable[[int, int], object]] = {}
        if isinstance(api, tuple):
            datasets = _make_datasets(api, info_path, data_root, loaders)
            print(
                f"mode: dataset — BEVDataset(train=True, num_prev_frames={NUM_PREV})[i], "
                f"{len(CAMERAS) * (NUM_PREV + 1)} images per sample; the arms differ only in load_image"
            )
            for name, ds in datasets.items():
                run[name] = functools.partial(_dataset_item, ds)
            # The dataset orders samples by timestamp; address them by token, whatever the file's order.
            first = next(iter(datasets.values()))
            position = {first.infos[k]["token"]: k for k in range(len(first))}
            order = [position[infos[i]["token"]] for i in order]
        else:
            print(
                f"mode: images only (dataset not available: {api}) — per sample 6 cameras x 9 frames: "
                "load + augment + normalise to float32 CHW (same normalisation for all arms)"
            )
            for name, load in loaders.items():
                run[name] = functools.partial(
                    _image_item, infos, data_root, load if load is not None else load_image, stages[name]
                )
        times = _run_arms(run, order, args.seed)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    rates = _report(times, args.warmup, stages)
    ours, base = rates["ours"], rates["baseline"]
    print(f"loader speedup vs baseline: {ours / base:.2f}x ({ours:.2f} vs {base:.2f} samples/s per worker)")
    return 0


def _dataset_item(dataset: Any, index: int, seed: int) -> object:
    _seed_everything(seed)
    return dataset[index]


def _image_item(
    infos: list[dict[str, Any]], data_root: Path, load: LoadFn, acc: dict[str, float], index: int, seed: int
) -> object:
    return image_sample(infos, data_root, index, seed, load, acc)


if __name__ == "__main__":
    sys.exit(main())
