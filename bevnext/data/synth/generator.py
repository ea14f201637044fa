"""Orchestration: validate arguments, build each scene, render/cast/annotate it, write the dataset.

Everything is written into a temporary sibling of the output folder (``bevnext.io.staging_dir``)
that is renamed into place only when complete, so a failure leaves nothing at ``out``.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bevnext.data.synth.camera_rig import CAMERA_CHANNELS, LIDAR_CHANNEL
from bevnext.data.synth.ground import GroundTexture, map_png
from bevnext.data.synth.lidar import LidarCaster, LidarScan
from bevnext.data.synth.render import CameraRenderer
from bevnext.data.synth.tables import Tables, floats, make_token, visibility_token
from bevnext.data.synth.world import SceneWorld, build_world
from bevnext.errors import BevnextError
from bevnext.io import staging_dir
from bevnext.structures.boxes import attribute_for
from bevnext.structures.transforms import yaw_to_quat

VERSION = "v1.0-synth"
"""The nuScenes version name of synthetic datasets (tables live in ``<root>/v1.0-synth``)."""
TRAIN_SPLIT = "synth_train"
VAL_SPLIT = "synth_val"
JPEG_QUALITY = 90
ANNOTATE_RANGE_WITH_POINTS = 60.0
"""An object with at least one LiDAR point is annotated up to this distance (m) from the ego."""
ANNOTATE_RANGE = 50.0
"""An object is annotated up to this distance (m) even without LiDAR points."""
MAX_SWEEPS = 9
"""At most 9 non-key sweeps fit between key frames of a 20 Hz LiDAR at 2 Hz."""


@dataclass(frozen=True)
class SynthSpec:
    """Validated arguments of one generation run (see ``generate_dataset``)."""

    scenes: int
    samples_per_scene: int
    image_size: tuple[int, int]
    seed: int
    lidar_sweeps_per_sample: int
    val_fraction: float

    @property
    def n_val(self) -> int:
        """Scenes in the val split: at least one, leaving at least one for train."""
        return min(self.scenes - 1, max(1, int(round(self.scenes * self.val_fraction))))

    def world(self, index: int) -> SceneWorld:
        """Scene ``index`` exactly as the generator builds it."""
        return build_world(
            self.seed, index, self.samples_per_scene, self.image_size, self.lidar_sweeps_per_sample
        )


@dataclass
class Timings:
    """Seconds spent per stage (and counts), filled in by ``generate``."""

    world: float = 0.0
    render: float = 0.0
    lidar: float = 0.0
    jpeg: float = 0.0
    tables: float = 0.0
    images: int = 0
    sweeps: int = 0
    annotations: int = 0


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def validate_args(
    scenes: object,
    samples_per_scene: object,
    image_size: object,
    seed: object,
    lidar_sweeps_per_sample: object,
    val_fraction: object,
) -> SynthSpec:
    """Check the generator's arguments; raise a one-line ``BevnextError`` naming the bad one."""
    if not _is_int(scenes) or not 2 <= int(scenes) <= 9999:  # type: ignore[call-overload]
        raise BevnextError(f"scenes (--scenes) must be an integer in [2, 9999] so that train and val are "
                           f"both non-empty, got {scenes!r}")
    if not _is_int(samples_per_scene) or not 2 <= int(samples_per_scene) <= 10000:  # type: ignore[call-overload]
        raise BevnextError(f"samples_per_scene (--samples-per-scene) must be an integer in [2, 10000], "
                           f"got {samples_per_scene!r}")
    try:
        width, height = image_size  # type: ignore[misc]
    except (TypeError, ValueError):
        msg = f"image_size (--image-size W H) must be two integers, got {image_size!r}"
        raise BevnextError(msg) from None
    if not (_is_int(width) and _is_int(height)) or not (
        64 <= int(width) <= 8192 and 36 <= int(height) <= 8192  # type: ignore[call-overload]
    ):
        raise BevnextError(f"image_size (--image-size W H) must be integers with 64 <= W <= 8192 and "
                           f"36 <= H <= 8192, got {image_size!r}")
    if not _is_int(seed) or not 0 <= int(seed) < 2**63:  # type: ignore[call-overload]
        raise BevnextError(f"seed (--seed) must be a non-negative integer, got {seed!r}")
    if not _is_int(lidar_sweeps_per_sample) or not 0 <= int(lidar_sweeps_per_sample) <= MAX_SWEEPS:  # type: ignore[call-overload]
        raise BevnextError(f"lidar_sweeps_per_sample must be an integer in [0, {MAX_SWEEPS}], "
                           f"got {lidar_sweeps_per_sample!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.floating)) or not (
        0.0 < float(val_fraction) < 1.0
    ):
        raise BevnextError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
    return SynthSpec(
        scenes=int(scenes),  # type: ignore[call-overload]
        samples_per_scene=int(samples_per_scene),  # type: ignore[call-overload]
        image_size=(int(width), int(height)),
        seed=int(seed),  # type: ignore[call-overload]
        lidar_sweeps_per_sample=int(lidar_sweeps_per_sample),  # type: ignore[call-overload]
        val_fraction=float(val_fraction),
    )


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BevnextError(f"out (--out) {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise BevnextError(f"out (--out) {out} already exists and is not empty; choose a new folder")


def generate(out: str | Path, spec: SynthSpec, progress: bool = True, timings: Timings | None = None) -> Path:
    """Write a synthetic nuScenes dataset (see ``bevnext.data.synth.generate_dataset``).

    Args:
        out: data root to create; must not exist or be an empty folder.
        spec: validated arguments.
        progress: show a one-line progress bar on stderr.
        timings: if given, filled with per-stage seconds.

    Returns:
        The data root.
    """
    out = Path(out)
    _check_out(out)
    timings = timings if timings is not None else Timings()
    from tqdm import tqdm

    total = spec.scenes * spec.samples_per_scene
    try:
        with staging_dir(out) as root:
            with tqdm(total=total, desc="synth", unit="sample", file=sys.stderr, disable=not progress,
                      dynamic_ncols=True, leave=False) as bar:
                _write_dataset(root, spec, timings, bar)
    except FileExistsError as err:  # a concurrent writer created `out` meanwhile
        raise BevnextError(f"out (--out) {out} already exists and is not empty: {err}") from err
    return out


def _write_dataset(root: Path, spec: SynthSpec, timings: Timings, bar: object) -> None:
    tables = Tables()
    for channel in (*CAMERA_CHANNELS, LIDAR_CHANNEL):
        modality = "lidar" if channel == LIDAR_CHANNEL else "camera"
        tables.add("sensor", token=make_token("sensor", channel), channel=channel, modality=modality)
    for folder in ("samples", "sweeps"):
        for channel in (*CAMERA_CHANNELS, LIDAR_CHANNEL):
            if folder == "sweeps" and channel != LIDAR_CHANNEL:
                continue
            (root / folder / channel).mkdir(parents=True, exist_ok=True)
    (root / "maps").mkdir()
    names = []
    for index in range(spec.scenes):
        t0 = time.perf_counter()
        world = spec.world(index)
        timings.world += time.perf_counter() - t0
        _write_scene(root, spec, world, tables, timings, bar)
        names.append(world.name)
    t0 = time.perf_counter()
    table_dir = root / VERSION
    tables.write(table_dir)
    n_train = spec.scenes - spec.n_val
    splits = {TRAIN_SPLIT: names[:n_train], VAL_SPLIT: names[n_train:]}
    (table_dir / "splits.json").write_text(json.dumps(splits, indent=1) + "\n", encoding="utf-8")
    timings.tables += time.perf_counter() - t0


def _chain(records: list[dict]) -> None:
    """Link records (in time order) through their ``prev``/``next`` fields."""
    for a, b in zip(records[:-1], records[1:]):
        a["next"] = b["token"]
        b["prev"] = a["token"]


def _write_scene(root: Path, spec: SynthSpec, world: SceneWorld, tables: Tables, timings: Timings,
                 bar: object) -> None:
    seed, name = spec.seed, world.name
    tl = world.timeline
    t0 = time.perf_counter()
    texture = GroundTexture(world.road, world.texture_seed, world.ground_gain)
    renderers = [CameraRenderer(world, c, texture) for c in range(len(world.rig.cameras))]
    caster = LidarCaster(world, texture)
    timings.world += time.perf_counter() - t0

    log_token = make_token(seed, name, "log")
    date = datetime.datetime.fromtimestamp(tl.start_us / 1e6, tz=datetime.timezone.utc)
    tables.add("log", token=log_token, logfile=f"synth-{seed}-{name}-{date:%Y-%m-%d-%H-%M-%S}+0000",
               vehicle="synth-car", date_captured=f"{date:%Y-%m-%d}", location="synth-town")
    map_token = make_token(seed, name, "map")
    (root / "maps" / f"{map_token}.png").write_bytes(map_png(world.road))
    tables.add("map", category="semantic_prior", token=map_token, filename=f"maps/{map_token}.png",
               log_tokens=[log_token])

    calib_tokens = {}
    for cam in world.rig.cameras:
        token = make_token(seed, name, "calibrated_sensor", cam.channel)
        calib_tokens[cam.channel] = token
        tables.add("calibrated_sensor", token=token, sensor_token=make_token("sensor", cam.channel),
                   translation=floats(cam.sensor2ego.translation), rotation=floats(cam.rotation_wxyz),
                   camera_intrinsic=[floats(row) for row in cam.intrinsic])
    lidar_calib = world.rig.lidar
    calib_tokens[LIDAR_CHANNEL] = make_token(seed, name, "calibrated_sensor", LIDAR_CHANNEL)
    tables.add("calibrated_sensor", token=calib_tokens[LIDAR_CHANNEL],
               sensor_token=make_token("sensor", LIDAR_CHANNEL),
               translation=floats(lidar_calib.sensor2ego.translation),
               rotation=floats(lidar_calib.rotation_wxyz), camera_intrinsic=[])

    scene_token = make_token(seed, name, "scene")
    samples: list[dict] = []
    chains: dict[str, list[dict]] = {ch: [] for ch in (*CAMERA_CHANNELS, LIDAR_CHANNEL)}
    key_scans: list[LidarScan] = []
    key_ego_xy: list[np.ndarray] = []

    def sample_data(channel: str, sample_token: str, timestamp: int, key: bool, filename: str,
                    width: int, height: int) -> dict:
        token = make_token(seed, name, "sample_data", channel, timestamp)
        translation, quat = world.ego.pose_record(tl.seconds(timestamp))
        tables.add("ego_pose", token=token, timestamp=int(timestamp), rotation=floats(quat),
                   translation=floats(translation))
        record = tables.add("sample_data", token=token, sample_token=sample_token, ego_pose_token=token,
                            calibrated_sensor_token=calib_tokens[channel], timestamp=int(timestamp),
                            fileformat="pcd" if channel == LIDAR_CHANNEL else "jpg", is_key_frame=key,
                            height=height, width=width, filename=filename, prev="", next="")
        chains[channel].append(record)
        return record

    def write_scan(timestamp: int, sample_token: str, key: bool) -> LidarScan:
        t1 = time.perf_counter()
        scan = caster.cast(timestamp)
        folder = "samples" if key else "sweeps"
        filename = f"{folder}/{LIDAR_CHANNEL}/{name}__{LIDAR_CHANNEL}__{timestamp}.pcd.bin"
        scan.points.tofile(root / filename)
        sample_data(LIDAR_CHANNEL, sample_token, timestamp, key, filename, 0, 0)
        timings.lidar += time.perf_counter() - t1
        return scan

    for i in range(spec.samples_per_scene):
        sample_token = make_token(seed, name, "sample", i)
        key_us = int(tl.key_us[i])
        samples.append(tables.add("sample", token=sample_token, timestamp=key_us, prev="", next="",
                                  scene_token=scene_token))
        if i > 0:
            for ts in tl.sweep_us[i]:
                write_scan(int(ts), sample_token, key=False)
                timings.sweeps += 1
        key_scans.append(write_scan(key_us, sample_token, key=True))
        key_ego_xy.append(world.ego.pose_record(tl.seconds(key_us))[0][:2])
        for c, renderer in enumerate(renderers):
            channel = renderer.calib.channel
            ts = int(tl.camera_us[i, c])
            t1 = time.perf_counter()
            image = renderer.render(ts).rgb
            t2 = time.perf_counter()
            filename = f"samples/{channel}/{name}__{channel}__{ts}.jpg"
            Image.fromarray(image).save(root / filename, format="JPEG", quality=JPEG_QUALITY)
            timings.render += t2 - t1
            timings.jpeg += time.perf_counter() - t2
            timings.images += 1
            sample_data(channel, sample_token, ts, True, filename, renderer.width, renderer.height)
        bar.update(1)  # type: ignore[attr-defined]

    t0 = time.perf_counter()
    _chain(samples)
    for records in chains.values():
        records.sort(key=lambda r: r["timestamp"])
        _chain(records)
    tables.add("scene", token=scene_token, log_token=log_token, nbr_samples=len(samples),
               first_sample_token=samples[0]["token"], last_sample_token=samples[-1]["token"], name=name,
               description=_describe(world))
    timings.annotations += _annotate(world, tables, seed, samples, key_scans, key_ego_xy)
    timings.tables += time.perf_counter() - t0


def _describe(world: SceneWorld) -> str:
    lanes = sum(1 for b in world.road.bands if b.surface == "lane")
    counts: dict[str, int] = {}
    for c in world.objects.class_names:
        counts[c] = counts.get(c, 0) + 1
    mix = ", ".join(f"{counts[c]} {c}" for c in sorted(counts))
    return (f"Synthetic straight road, {lanes} lanes, ego at {world.ego.speed:.1f} m/s; objects: {mix}")


def _runs(indices: list[int]) -> list[list[int]]:
    """Split sorted sample indices into runs of consecutive ones."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _annotate(world: SceneWorld, tables: Tables, seed: int, samples: list[dict], key_scans: list[LidarScan],
              key_ego_xy: list[np.ndarray]) -> int:
    """Write instance and sample_annotation records of one scene; returns the annotation count."""
    objs = world.objects
    tl = world.timeline
    n_samples = len(samples)
    centres = [objs.centres(tl.seconds(int(tl.key_us[i]))) for i in range(n_samples)]
    wanted: list[list[int]] = [[] for _ in range(len(objs))]
    for i in range(n_samples):
        dist = np.hypot(*(centres[i][:, :2] - key_ego_xy[i]).T)
        keep = ((dist <= ANNOTATE_RANGE_WITH_POINTS) & (key_scans[i].hits > 0)) | (dist <= ANNOTATE_RANGE)
        for k in np.flatnonzero(keep):
            wanted[k].append(i)
    count = 0
    visibility: list[np.ndarray | None] = [None] * n_samples
    for k in range(len(objs)):
        class_name = objs.class_names[k]
        # One instance per run of consecutive samples; single-sample runs are dropped because the
        # devkit cannot derive a velocity (hence an attribute) for them.
        for r, run in enumerate(r for r in _runs(wanted[k]) if len(r) >= 2):
            instance_token = make_token(seed, world.name, "instance", k, r)
            tokens = [make_token(seed, world.name, "sample_annotation", k, i) for i in run]
            translations = [floats(centres[i][k]) for i in run]
            stamps = [int(samples[i]["timestamp"]) for i in run]
            records = []
            for j, i in enumerate(run):
                # The velocity exactly as NuScenes.box_velocity derives it from neighbouring annotations.
                a, b = max(j - 1, 0), min(j + 1, len(run) - 1)
                dt = 1e-6 * stamps[b] - 1e-6 * stamps[a]
                vel = (np.array(translations[b]) - np.array(translations[a])) / dt
                attribute = attribute_for(class_name, float(np.linalg.norm(vel)))
                scan = key_scans[i]
                if visibility[i] is None:
                    visibility[i] = scan.visibility()
                records.append(tables.add(
                    "sample_annotation",
                    token=tokens[j],
                    sample_token=samples[i]["token"],
                    instance_token=instance_token,
                    visibility_token=visibility_token(float(visibility[i][k])),
                    attribute_tokens=[tables.attribute_token(attribute)] if attribute else [],
                    translation=translations[j],
                    size=floats([objs.size[k, 1], objs.size[k, 0], objs.size[k, 2]]),
                    rotation=floats(yaw_to_quat(float(objs.yaw[k]))),
                    prev="",
                    next="",
                    num_lidar_pts=int(scan.hits[k]),
                    num_radar_pts=0,
                ))
            _chain(records)
            tables.add("instance", token=instance_token,
                       category_token=tables.category_token(objs.categories[k]),
                       nbr_annotations=len(records), first_annotation_token=records[0]["token"],
                       last_annotation_token=records[-1]["token"])
            count += len(records)
    return count


__all__ = ["TRAIN_SPLIT", "VAL_SPLIT", "VERSION", "SynthSpec", "Timings", "generate", "validate_args"]
