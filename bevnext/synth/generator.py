"""Orchestration: validate arguments, build each scene, render/cast/annotate it, write the dataset.

Everything is written into a temporary sibling of the output folder (``bevnext.io.staging_dir``)
that is renamed into place only when complete, so a failure leaves nothing at ``out``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from PIL import Image

from bevnext.errors import BevnextError
from bevnext.io import staging_dir
from bevnext.structures.boxes import attribute_for
from bevnext.structures.transforms import yaw_to_quat
from bevnext.synth.camera_rig import CAMERA_CHANNELS, LIDAR_CHANNEL
from bevnext.synth.ground import GroundTexture, map_png
from bevnext.synth.lidar import LidarCaster, LidarScan
from bevnext.synth.render import CameraRenderer
from bevnext.synth.tables import Tables, floats, make_token, visibility_token
from bevnext.synth.world import SceneWorld, build_world

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


Stage = Literal["world", "render", "lidar", "jpeg", "tables"]
"""A timed stage of generation: a float field of ``Timings``."""


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

    @contextlib.contextmanager
    def measure(self, stage: Stage) -> Iterator[None]:
        """Add the wall-clock seconds spent in the ``with`` block to ``stage``."""
        start = time.perf_counter()
        yield
        setattr(self, stage, getattr(self, stage) + time.perf_counter() - start)


class _Progress(Protocol):
    """The part of a tqdm bar the generator uses: one ``update`` per written sample."""

    def update(self, n: float = 1) -> object: ...


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
    """Write a synthetic nuScenes dataset (see ``bevnext.synth.generate_dataset``).

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


def _write_dataset(root: Path, spec: SynthSpec, timings: Timings, bar: _Progress) -> None:
    """Write every scene's files and records into ``root``, then the tables and ``splits.json``."""
    tables = Tables()
    _add_sensors(tables)
    _make_folders(root)
    names = []
    for index in range(spec.scenes):
        with timings.measure("world"):
            world = spec.world(index)
        _write_scene(root, spec, world, tables, timings, bar)
        names.append(world.name)
    with timings.measure("tables"):
        _write_tables(root / VERSION, tables, spec, names)


def _add_sensors(tables: Tables) -> None:
    """One ``sensor`` record per channel: the six cameras, then the LiDAR."""
    for channel in (*CAMERA_CHANNELS, LIDAR_CHANNEL):
        modality = "lidar" if channel == LIDAR_CHANNEL else "camera"
        tables.add("sensor", token=make_token("sensor", channel), channel=channel, modality=modality)


def _make_folders(root: Path) -> None:
    """``samples/<channel>`` for every sensor, ``sweeps/LIDAR_TOP`` (only the LiDAR has sweeps) and ``maps``."""
    for folder in ("samples", "sweeps"):
        for channel in (*CAMERA_CHANNELS, LIDAR_CHANNEL):
            if folder == "sweeps" and channel != LIDAR_CHANNEL:
                continue
            (root / folder / channel).mkdir(parents=True, exist_ok=True)
    (root / "maps").mkdir()


def _write_tables(table_dir: Path, tables: Tables, spec: SynthSpec, scene_names: list[str]) -> None:
    """The JSON tables and ``splits.json``: the first scenes are ``synth_train``, the last ``n_val`` val."""
    tables.write(table_dir)
    n_train = spec.scenes - spec.n_val
    splits = {TRAIN_SPLIT: scene_names[:n_train], VAL_SPLIT: scene_names[n_train:]}
    (table_dir / "splits.json").write_text(json.dumps(splits, indent=1) + "\n", encoding="utf-8")


def _chain(records: list[dict]) -> None:
    """Link records (in time order) through their ``prev``/``next`` fields."""
    for a, b in zip(records[:-1], records[1:]):
        a["next"] = b["token"]
        b["prev"] = a["token"]


@dataclass(frozen=True)
class _SceneSensors:
    """What produces one scene's sensor data: a renderer per camera (in rig order) and the LiDAR caster."""

    renderers: list[CameraRenderer]
    caster: LidarCaster


def _build_sensors(world: SceneWorld) -> _SceneSensors:
    # One ground texture per scene, shared by every camera and the LiDAR.
    texture = GroundTexture(world.road, world.texture_seed, world.ground_gain)
    renderers = [CameraRenderer(world, c, texture) for c in range(len(world.rig.cameras))]
    return _SceneSensors(renderers, LidarCaster(world, texture))


@dataclass
class _SceneRecords:
    """The records of one scene written so far, kept to link them and annotate the scene at the end."""

    seed: int
    world: SceneWorld
    tables: Tables
    calib_tokens: dict[str, str]
    """channel -> token of its ``calibrated_sensor`` record."""
    scene_token: str
    samples: list[dict] = field(default_factory=list)
    """The ``sample`` records, in time order."""
    chains: dict[str, list[dict]] = field(
        default_factory=lambda: {channel: [] for channel in (*CAMERA_CHANNELS, LIDAR_CHANNEL)}
    )
    """channel -> its ``sample_data`` records (linked by ``prev`` / ``next`` at the end)."""
    key_scans: list[LidarScan] = field(default_factory=list)
    """The key-frame LiDAR scan of each sample (points on each object, visibility)."""
    key_ego_xy: list[np.ndarray] = field(default_factory=list)
    """(2,) global x, y of the ego at each sample's key (LiDAR) time."""

    def add_sample(self, index: int, timestamp: int) -> str:
        """Add the ``sample`` record of key frame ``index`` at ``timestamp`` (us); returns its token."""
        token = make_token(self.seed, self.world.name, "sample", index)
        record = self.tables.add("sample", token=token, timestamp=timestamp, prev="", next="",
                                 scene_token=self.scene_token)
        self.samples.append(record)
        return token

    def add_sample_data(self, channel: str, sample_token: str, timestamp: int, key: bool, filename: str,
                        width: int, height: int) -> None:
        """Add one sensor reading: the ego pose at ``timestamp`` (us) and its ``sample_data`` record."""
        tl = self.world.timeline
        token = make_token(self.seed, self.world.name, "sample_data", channel, timestamp)
        translation, quat = self.world.ego.pose_record(tl.seconds(timestamp))
        self.tables.add("ego_pose", token=token, timestamp=int(timestamp), rotation=floats(quat),
                        translation=floats(translation))
        record = self.tables.add(
            "sample_data", token=token, sample_token=sample_token, ego_pose_token=token,
            calibrated_sensor_token=self.calib_tokens[channel], timestamp=int(timestamp),
            fileformat="pcd" if channel == LIDAR_CHANNEL else "jpg", is_key_frame=key, height=height,
            width=width, filename=filename, prev="", next="",
        )
        self.chains[channel].append(record)


def _write_scene(root: Path, spec: SynthSpec, world: SceneWorld, tables: Tables, timings: Timings,
                 bar: _Progress) -> None:
    """Write one scene: log, map, calibrations, each sample's sensor data, then the scene and annotations."""
    with timings.measure("world"):
        sensors = _build_sensors(world)
    log_token = _add_log(spec.seed, world, tables)
    _write_map(root, spec.seed, world, tables, log_token)
    calib_tokens = _add_calibrations(spec.seed, world, tables)
    records = _SceneRecords(spec.seed, world, tables, calib_tokens, make_token(spec.seed, world.name, "scene"))
    for index in range(spec.samples_per_scene):
        _write_sample(root, records, sensors, index, timings)
        bar.update(1)
    with timings.measure("tables"):
        count = _finish_scene(records, log_token)
    timings.annotations += count


def _add_log(seed: int, world: SceneWorld, tables: Tables) -> str:
    """Add the scene's ``log`` record (one log per scene); returns its token."""
    log_token = make_token(seed, world.name, "log")
    date = datetime.datetime.fromtimestamp(world.timeline.start_us / 1e6, tz=datetime.timezone.utc)
    tables.add("log", token=log_token, logfile=f"synth-{seed}-{world.name}-{date:%Y-%m-%d-%H-%M-%S}+0000",
               vehicle="synth-car", date_captured=f"{date:%Y-%m-%d}", location="synth-town")
    return log_token


def _write_map(root: Path, seed: int, world: SceneWorld, tables: Tables, log_token: str) -> None:
    """Write the log's semantic map PNG under ``maps/`` and its ``map`` record."""
    map_token = make_token(seed, world.name, "map")
    (root / "maps" / f"{map_token}.png").write_bytes(map_png(world.road))
    tables.add("map", category="semantic_prior", token=map_token, filename=f"maps/{map_token}.png",
               log_tokens=[log_token])


def _add_calibrations(seed: int, world: SceneWorld, tables: Tables) -> dict[str, str]:
    """Add the ``calibrated_sensor`` records of the scene's rig (cameras, then LiDAR); channel -> token."""
    calib_tokens = {}
    for cam in world.rig.cameras:
        token = make_token(seed, world.name, "calibrated_sensor", cam.channel)
        calib_tokens[cam.channel] = token
        tables.add("calibrated_sensor", token=token, sensor_token=make_token("sensor", cam.channel),
                   translation=floats(cam.sensor2ego.translation), rotation=floats(cam.rotation_wxyz),
                   camera_intrinsic=[floats(row) for row in cam.intrinsic])
    lidar_calib = world.rig.lidar
    calib_tokens[LIDAR_CHANNEL] = make_token(seed, world.name, "calibrated_sensor", LIDAR_CHANNEL)
    tables.add("calibrated_sensor", token=calib_tokens[LIDAR_CHANNEL],
               sensor_token=make_token("sensor", LIDAR_CHANNEL),
               translation=floats(lidar_calib.sensor2ego.translation),
               rotation=floats(lidar_calib.rotation_wxyz), camera_intrinsic=[])
    return calib_tokens


def _write_sample(root: Path, records: _SceneRecords, sensors: _SceneSensors, index: int,
                  timings: Timings) -> None:
    """Key frame ``index``: its ``sample`` record, the LiDAR sweeps before it, its key scan and six images."""
    world = records.world
    tl = world.timeline
    key_us = int(tl.key_us[index])
    sample_token = records.add_sample(index, key_us)
    if index > 0:  # sweeps lie between the previous key frame and this one
        for ts in tl.sweep_us[index]:
            with timings.measure("lidar"):
                _write_scan(root, records, sensors.caster, int(ts), sample_token, key=False)
            timings.sweeps += 1
    with timings.measure("lidar"):
        scan = _write_scan(root, records, sensors.caster, key_us, sample_token, key=True)
    records.key_scans.append(scan)
    records.key_ego_xy.append(world.ego.pose_record(tl.seconds(key_us))[0][:2])
    for c, renderer in enumerate(sensors.renderers):
        _write_image(root, records, renderer, int(tl.camera_us[index, c]), sample_token, timings)


def _write_scan(root: Path, records: _SceneRecords, caster: LidarCaster, timestamp: int, sample_token: str,
                key: bool) -> LidarScan:
    """Cast the LiDAR at ``timestamp`` (us), write its ``.pcd.bin`` (float32 (N, 5)) and its records."""
    scan = caster.cast(timestamp)
    folder = "samples" if key else "sweeps"
    filename = f"{folder}/{LIDAR_CHANNEL}/{records.world.name}__{LIDAR_CHANNEL}__{timestamp}.pcd.bin"
    scan.points.tofile(root / filename)
    records.add_sample_data(LIDAR_CHANNEL, sample_token, timestamp, key, filename, 0, 0)
    return scan


def _write_image(root: Path, records: _SceneRecords, renderer: CameraRenderer, timestamp: int,
                 sample_token: str, timings: Timings) -> None:
    """Render one camera at its own ``timestamp`` (us), write the JPEG and its records."""
    channel = renderer.calib.channel
    with timings.measure("render"):
        image = renderer.render(timestamp).rgb
    filename = f"samples/{channel}/{records.world.name}__{channel}__{timestamp}.jpg"
    with timings.measure("jpeg"):
        Image.fromarray(image).save(root / filename, format="JPEG", quality=JPEG_QUALITY)
    timings.images += 1
    records.add_sample_data(channel, sample_token, timestamp, True, filename, renderer.width, renderer.height)


def _finish_scene(records: _SceneRecords, log_token: str) -> int:
    """Link the scene's records in time order, add its ``scene`` record and annotations.

    Returns:
        The number of ``sample_annotation`` records added.
    """
    _chain(records.samples)
    for chain in records.chains.values():
        chain.sort(key=lambda r: r["timestamp"])
        _chain(chain)
    world, samples = records.world, records.samples
    records.tables.add("scene", token=records.scene_token, log_token=log_token, nbr_samples=len(samples),
                       first_sample_token=samples[0]["token"], last_sample_token=samples[-1]["token"],
                       name=world.name, description=_describe(world))
    return _annotate(world, records.tables, records.seed, samples, records.key_scans, records.key_ego_xy)


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
