"""A three-sample nuScenes-format dataset written by hand, for testing info creation.

Independent of the synthetic generator on purpose: every number here is chosen so that the expected
info values can be worked out with plain planar rotations in the tests.

World (global frame, metres, yaw-only rotations so that every pose is a heading plus a position):
* one scene of three key samples 0.5 s apart; the ego drives and turns, and each sensor captures at
  its own time offset from the LiDAR sweep, so each camera has its own ego pose;
* CAM_FRONT sits ahead of the rear axle, offset sideways and yawed 0.1 rad to the left;
* annotations: a car moving through all three samples, a static pedestrian in samples 0-1, a traffic
  cone seen only by radar in sample 1 (single annotation: the devkit's velocity is NaN), a barrier
  with no points in sample 2 (dropped, but counted in ``all_labels``) and an animal in sample 1
  (not a detection class: ignored).

The sample table is written in reverse time order so that sorting is exercised.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

T0_US = 1_533_151_603_547_590
"""Timestamp (µs) of the first LiDAR key frame."""
SAMPLE_STEP_US = 500_000
"""Key frames are 0.5 s apart (2 Hz, as in nuScenes)."""
NUM_SAMPLES = 3
IMAGE_W, IMAGE_H = 32, 18
LIDAR_POINTS = 7

CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
# Capture time of each camera relative to the LiDAR key sweep, µs (nuScenes cameras fire as the
# LiDAR sweeps past them; CAM_FRONT about 20 ms after the sweep starts).
CAM_OFFSETS_US = {
    "CAM_FRONT": 21_000,
    "CAM_FRONT_RIGHT": 29_000,
    "CAM_FRONT_LEFT": 13_000,
    "CAM_BACK": 46_000,
    "CAM_BACK_LEFT": 38_000,
    "CAM_BACK_RIGHT": 54_000,
}
# (translation in the ego frame, heading of the optical axis in the ego frame).
CAM_MOUNTS = {
    "CAM_FRONT": ([1.7, 0.3, 1.5], 0.1),
    "CAM_FRONT_RIGHT": ([1.5, -0.5, 1.5], -0.95),
    "CAM_FRONT_LEFT": ([1.5, 0.5, 1.5], 0.95),
    "CAM_BACK": ([0.0, 0.0, 1.5], math.pi),
    "CAM_BACK_LEFT": ([1.0, 0.5, 1.5], 1.9),
    "CAM_BACK_RIGHT": ([1.0, -0.5, 1.5], -1.9),
}
LIDAR_MOUNT = ([0.94, 0.0, 1.84], -math.pi / 2)
INTRINSIC = [[25.0, 0.0, 16.0], [0.0, 25.0, 9.0], [0.0, 0.0, 1.0]]


def ego_pose_at(timestamp_us: int) -> tuple[list[float], float]:
    """Ego pose (global translation, heading) at a time: driving ~8 m/s while turning left."""
    s = (timestamp_us - T0_US) * 1e-6
    return [600.0 + 8.0 * s, 1600.0 + 2.0 * s + 0.5 * s * s, 0.1], 0.4 + 0.3 * s


def yaw_quat(yaw: float) -> list[float]:
    """[w, x, y, z] of a rotation by ``yaw`` about +z."""
    return [math.cos(yaw / 2.0), 0.0, 0.0, math.sin(yaw / 2.0)]


def quat_mul(a: list[float], b: list[float]) -> list[float]:
    """Hamilton product ``a * b`` of [w, x, y, z] quaternions (rotation b first, then a)."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return [
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ]


# Optical camera axes (x right, y down, z forward) expressed in a forward-looking ego frame: the
# columns of its rotation are (0,-1,0), (0,0,-1), (1,0,0).
OPTICAL_QUAT = [0.5, -0.5, 0.5, -0.5]


@dataclass
class Annotation:
    """One sample_annotation, in the global frame; ``size`` is nuScenes' [w, l, h]."""

    token: str
    instance: str
    category: str
    sample_index: int
    translation: list[float]
    yaw: float
    size: list[float]
    num_lidar_pts: int
    num_radar_pts: int


@dataclass
class HandmadeSpec:
    """What was written, for computing expected values."""

    root: Path
    version: str
    scene_name: str
    scene_token: str
    sample_tokens: list[str]  # in time order
    sample_timestamps: list[int]
    annotations: list[Annotation] = field(default_factory=list)
    cam_paths: list[dict[str, str]] = field(default_factory=list)  # per sample, relative to root
    lidar_paths: list[str] = field(default_factory=list)

    def cam_timestamp(self, index: int, channel: str) -> int:
        return self.sample_timestamps[index] + CAM_OFFSETS_US[channel]


def _annotations() -> list[Annotation]:
    anns = []
    for k in range(NUM_SAMPLES):
        anns.append(
            Annotation(
                f"ann-car-{k}", "inst-car", "vehicle.car", k,
                [610.0 + 6.0 * k, 1605.0 + 1.0 * k + 0.4 * k * k, 0.8], 0.2 + 0.1 * k, [1.9, 4.6, 1.7], 30, 3,
            )
        )
    for k in range(2):
        anns.append(
            Annotation(
                f"ann-ped-{k}", "inst-ped", "human.pedestrian.adult", k, [605.0, 1598.0, 1.0], -1.0,
                [0.6, 0.7, 1.8], 5, 0,
            )
        )
    anns.append(
        Annotation("ann-cone-1", "inst-cone", "movable_object.trafficcone", 1, [615.0, 1610.0, 0.4], 0.0,
                   [0.4, 0.4, 0.8], 0, 1)
    )
    anns.append(
        Annotation("ann-barrier-2", "inst-barrier", "movable_object.barrier", 2, [640.0, 1590.0, 0.5], 1.2,
                   [2.5, 0.5, 1.0], 0, 0)
    )
    anns.append(
        Annotation("ann-dog-1", "inst-dog", "animal", 1, [612.0, 1601.0, 0.3], 0.5, [0.3, 0.8, 0.5], 10, 0)
    )
    return anns


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def write_handmade_nuscenes(
    root: Path,
    version: str = "v1.0-handmade",
    scene_name: str = "scene-0001",
    with_annotations: bool = True,
    splits: dict[str, list[str]] | None = None,
) -> HandmadeSpec:
    """Write the dataset under ``root`` (tables in ``root/version``) and describe it.

    Args:
        root: data root to create.
        version: table folder name.
        scene_name: name of the one scene (pick a standard-split name to test official versions).
        with_annotations: False gives empty annotation tables, like ``v1.0-test``.
        splits: contents of ``splits.json``; None writes none (official versions).
    """
    root = Path(root)
    table_root = root / version
    scene_token = "scene-tok-0"
    sample_tokens = [f"sample-{k}" for k in range(NUM_SAMPLES)]
    timestamps = [T0_US + k * SAMPLE_STEP_US for k in range(NUM_SAMPLES)]
    spec = HandmadeSpec(root, version, scene_name, scene_token, sample_tokens, timestamps)

    sensors, calibs = [], []
    for channel in (*CAMERAS, "LIDAR_TOP"):
        modality = "lidar" if channel == "LIDAR_TOP" else "camera"
        sensors.append({"token": f"sensor-{channel}", "channel": channel, "modality": modality})
        if modality == "camera":
            translation, yaw = CAM_MOUNTS[channel]
            rotation = quat_mul(yaw_quat(yaw), OPTICAL_QUAT)
            intrinsic = INTRINSIC
        else:
            translation, yaw = LIDAR_MOUNT
            rotation, intrinsic = yaw_quat(yaw), []
        calibs.append(
            {
                "token": f"calib-{channel}",
                "sensor_token": f"sensor-{channel}",
                "translation": translation,
                "rotation": rotation,
                "camera_intrinsic": intrinsic,
            }
        )

    ego_poses, sample_data = [], []
    for k, (token, ts) in enumerate(zip(sample_tokens, timestamps, strict=True)):
        cam_paths = {}
        for channel in (*CAMERAS, "LIDAR_TOP"):
            sd_ts = ts + CAM_OFFSETS_US.get(channel, 0)
            translation, yaw = ego_pose_at(sd_ts)
            ego_poses.append(
                {"token": f"ego-{channel}-{k}", "timestamp": sd_ts, "translation": translation,
                 "rotation": yaw_quat(yaw)}
            )
            if channel == "LIDAR_TOP":
                rel = f"samples/LIDAR_TOP/n000-handmade__LIDAR_TOP__{sd_ts}.pcd.bin"
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                np.arange(LIDAR_POINTS * 5, dtype=np.float32).tofile(path)
                spec.lidar_paths.append(rel)
                fileformat, width, height = "pcd", 0, 0
            else:
                rel = f"samples/{channel}/n000-handmade__{channel}__{sd_ts}.jpg"
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (IMAGE_W, IMAGE_H), (40 * k, 90, 160)).save(path, format="JPEG")
                cam_paths[channel] = rel
                fileformat, width, height = "jpg", IMAGE_W, IMAGE_H
            sample_data.append(
                {
                    "token": f"sd-{channel}-{k}",
                    "sample_token": token,
                    "ego_pose_token": f"ego-{channel}-{k}",
                    "calibrated_sensor_token": f"calib-{channel}",
                    "timestamp": sd_ts,
                    "fileformat": fileformat,
                    "is_key_frame": True,
                    "height": height,
                    "width": width,
                    "filename": rel,
                    "prev": f"sd-{channel}-{k - 1}" if k > 0 else "",
                    "next": f"sd-{channel}-{k + 1}" if k < NUM_SAMPLES - 1 else "",
                }
            )
        spec.cam_paths.append(cam_paths)

    samples = [
        {
            "token": token,
            "timestamp": ts,
            "scene_token": scene_token,
            "prev": sample_tokens[k - 1] if k > 0 else "",
            "next": sample_tokens[k + 1] if k < NUM_SAMPLES - 1 else "",
        }
        for k, (token, ts) in enumerate(zip(sample_tokens, timestamps, strict=True))
    ]
    samples.reverse()

    categories = sorted({a.category for a in _annotations()})
    category_records = [{"token": f"cat-{name}", "name": name, "description": name} for name in categories]
    anns = _annotations() if with_annotations else []
    spec.annotations = anns
    by_instance: dict[str, list[Annotation]] = {}
    for ann in anns:
        by_instance.setdefault(ann.instance, []).append(ann)
    ann_records, instances = [], []
    for instance, group in by_instance.items():
        group.sort(key=lambda a: a.sample_index)
        instances.append(
            {
                "token": instance,
                "category_token": f"cat-{group[0].category}",
                "nbr_annotations": len(group),
                "first_annotation_token": group[0].token,
                "last_annotation_token": group[-1].token,
            }
        )
        for i, ann in enumerate(group):
            ann_records.append(
                {
                    "token": ann.token,
                    "sample_token": sample_tokens[ann.sample_index],
                    "instance_token": instance,
                    "visibility_token": "4",
                    "attribute_tokens": [],
                    "translation": ann.translation,
                    "size": ann.size,
                    "rotation": yaw_quat(ann.yaw),
                    "prev": group[i - 1].token if i > 0 else "",
                    "next": group[i + 1].token if i < len(group) - 1 else "",
                    "num_lidar_pts": ann.num_lidar_pts,
                    "num_radar_pts": ann.num_radar_pts,
                }
            )

    tables = {
        "attribute": [{"token": "attr-parked", "name": "vehicle.parked", "description": ""}],
        "calibrated_sensor": calibs,
        "category": category_records,
        "ego_pose": ego_poses,
        "instance": instances,
        "log": [{"token": "log-0", "logfile": "handmade", "vehicle": "n000", "date_captured": "2018-08-01",
                 "location": "singapore-onenorth"}],
        "map": [{"token": "map-0", "log_tokens": ["log-0"], "category": "semantic_prior",
                 "filename": "maps/handmade.png"}],
        "sample": samples,
        "sample_annotation": ann_records,
        "sample_data": sample_data,
        "scene": [{"token": scene_token, "name": scene_name, "description": "hand made", "log_token": "log-0",
                   "nbr_samples": NUM_SAMPLES, "first_sample_token": sample_tokens[0],
                   "last_sample_token": sample_tokens[-1]}],
        "sensor": sensors,
        "visibility": [{"token": str(i), "level": f"v{i}", "description": ""} for i in range(1, 5)],
    }
    for name, records in tables.items():
        _write_json(table_root / f"{name}.json", records)
    if splits is not None:
        _write_json(table_root / "splits.json", splits)
    (root / "maps").mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 255).save(root / "maps" / "handmade.png")
    return spec
