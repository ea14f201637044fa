"""Info creation (``bevnext create-data``): hand-computed values, round trip, and clear errors on bad input.

The expected numbers are worked out here with plain planar rotations from the hand-made world in
``handmade_nusc`` (all poses are a heading plus a position), never with the code under test.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from handmade_nusc import (
    CAM_MOUNTS,
    CAMERAS,
    INTRINSIC,
    LIDAR_MOUNT,
    OPTICAL_QUAT,
    SAMPLE_STEP_US,
    T0_US,
    Annotation,
    HandmadeSpec,
    ego_pose_at,
    quat_mul,
    write_handmade_nuscenes,
    yaw_quat,
)

from bevnext.data.info_record import key_ego2global
from bevnext.data.infos import (
    INFO_FORMAT,
    INFO_FORMAT_VERSION,
    create_infos,
    info_path,
    load_infos,
    splits_for_version,
)
from bevnext.errors import DataError

VERSION = "v1.0-handmade"
SPLITS = {"handmade_train": ["scene-0001"], "handmade_val": []}
# Class indices of the categories the hand-made world uses, in the reference class order
# (car 0, barrier 5, pedestrian 8, traffic_cone 9); "animal" is not a detection class.
LABEL_OF = {
    "vehicle.car": 0,
    "movable_object.barrier": 5,
    "human.pedestrian.adult": 8,
    "movable_object.trafficcone": 9,
}


@pytest.fixture
def spec(tmp_path: Path) -> HandmadeSpec:
    return write_handmade_nuscenes(tmp_path / "nuscenes", VERSION, splits=SPLITS)


def _train_infos(spec: HandmadeSpec, **kwargs) -> list[dict]:
    create_infos(spec.root, VERSION, progress=False, **kwargs)
    return load_infos(info_path(spec.root, "handmade_train")).infos


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _expected_velocity(spec: HandmadeSpec, ann: Annotation) -> tuple[float, float]:
    """The devkit's definition, by hand: centred difference over the neighbouring annotations."""
    track = {a.sample_index: a for a in spec.annotations if a.instance == ann.instance}
    first = track.get(ann.sample_index - 1, ann)
    last = track.get(ann.sample_index + 1, ann)
    if first is last:
        return 0.0, 0.0  # a single annotation: NaN in the devkit, 0 in the infos
    dt = (spec.sample_timestamps[last.sample_index] - spec.sample_timestamps[first.sample_index]) * 1e-6
    return (
        (last.translation[0] - first.translation[0]) / dt,
        (last.translation[1] - first.translation[1]) / dt,
    )


def _expected_box(spec: HandmadeSpec, ann: Annotation) -> list[float]:
    """Global box -> ego frame at the sample's CAM_FRONT time: subtract ego position, rotate by -heading."""
    (ex, ey, ez), ego_yaw = ego_pose_at(spec.cam_timestamp(ann.sample_index, "CAM_FRONT"))
    c, s = math.cos(ego_yaw), math.sin(ego_yaw)
    dx, dy = ann.translation[0] - ex, ann.translation[1] - ey
    vx_g, vy_g = _expected_velocity(spec, ann)
    w, length, h = ann.size
    return [
        c * dx + s * dy,
        -s * dx + c * dy,
        ann.translation[2] - ez,
        length,
        w,
        h,
        _wrap(ann.yaw - ego_yaw),
        c * vx_g + s * vy_g,
        -s * vx_g + c * vy_g,
    ]


def _assert_pose(pose: dict, translation: list[float], rotation: list[float]) -> None:
    np.testing.assert_allclose(pose["translation"], translation, atol=1e-12)
    np.testing.assert_allclose(pose["rotation"], rotation, atol=1e-12)


def _no_info_files(root: Path) -> bool:
    return not list(root.glob("bevnext_infos_*")) and not list(root.glob(".bevnext_infos_*"))


# ----------------------------------------------------------------------------------------------
# 1. Values against hand computation.


def test_sensor_entries_match_the_tables(spec: HandmadeSpec):
    infos = _train_infos(spec)
    assert [info["token"] for info in infos] == spec.sample_tokens  # sorted although written reversed
    for k, info in enumerate(infos):
        lidar_ts = T0_US + k * SAMPLE_STEP_US
        assert info["timestamp"] == lidar_ts
        assert info["scene_token"] == spec.scene_token
        assert info["scene_name"] == "scene-0001"
        lidar = info["lidar"]
        assert lidar["path"] == spec.lidar_paths[k]
        assert lidar["sample_data_token"] == f"sd-LIDAR_TOP-{k}"
        assert lidar["timestamp"] == lidar_ts
        _assert_pose(lidar["sensor2ego"], LIDAR_MOUNT[0], yaw_quat(LIDAR_MOUNT[1]))
        translation, yaw = ego_pose_at(lidar_ts)
        _assert_pose(lidar["ego2global"], translation, yaw_quat(yaw))

        assert list(info["cams"]) == list(CAMERAS)
        for channel, cam in info["cams"].items():
            cam_ts = spec.cam_timestamp(k, channel)
            assert cam["path"] == spec.cam_paths[k][channel]
            assert cam["sample_data_token"] == f"sd-{channel}-{k}"
            assert cam["timestamp"] == cam_ts
            assert (cam["width"], cam["height"]) == (32, 18)
            assert cam["intrinsic"] == INTRINSIC
            mount_t, mount_yaw = CAM_MOUNTS[channel]
            _assert_pose(cam["sensor2ego"], mount_t, quat_mul(yaw_quat(mount_yaw), OPTICAL_QUAT))
            translation, yaw = ego_pose_at(cam_ts)
            _assert_pose(cam["ego2global"], translation, yaw_quat(yaw))
        # The key frame really differs from the LiDAR one, so the tests below can tell them apart.
        assert info["cams"]["CAM_FRONT"]["ego2global"] != lidar["ego2global"]


def test_prev_tokens_are_earlier_samples_nearest_first(spec: HandmadeSpec):
    infos = _train_infos(spec)
    assert [info["prev_tokens"] for info in infos] == [[], ["sample-0"], ["sample-1", "sample-0"]]


def test_ground_truth_in_key_cam_front_ego_frame(spec: HandmadeSpec):
    infos = _train_infos(spec)
    for k, info in enumerate(infos):
        kept = [
            a for a in spec.annotations
            if a.sample_index == k and a.category in LABEL_OF and a.num_lidar_pts + a.num_radar_pts >= 1
        ]
        got = {
            instance: (box, label, n_lidar, n_radar)
            for instance, box, label, n_lidar, n_radar in zip(
                info["gt_instance_tokens"], info["gt_boxes"], info["gt_labels"], info["gt_num_lidar_pts"],
                info["gt_num_radar_pts"], strict=True,
            )
        }
        assert set(got) == {a.instance for a in kept}
        for ann in kept:
            box, label, n_lidar, n_radar = got[ann.instance]
            expected = _expected_box(spec, ann)
            assert len(box) == 9
            np.testing.assert_allclose(box[:6], expected[:6], atol=1e-9)
            assert abs(_wrap(box[6] - expected[6])) < 1e-9
            np.testing.assert_allclose(box[7:], expected[7:], atol=1e-9)
            assert label == LABEL_OF[ann.category]
            assert (n_lidar, n_radar) == (ann.num_lidar_pts, ann.num_radar_pts)
    # Zero-point barrier (sample 2) is counted for class balancing; the animal (sample 1) never is.
    assert [sorted(info["all_labels"]) for info in infos] == [[0, 8], [0, 8, 9], [0, 5]]
    # The moving car has a real velocity in every sample; the lone cone has NaN in the devkit -> 0.
    car = infos[1]["gt_boxes"][infos[1]["gt_instance_tokens"].index("inst-car")]
    assert math.hypot(car[7], car[8]) > 10.0
    cone = infos[1]["gt_boxes"][infos[1]["gt_instance_tokens"].index("inst-cone")]
    assert cone[7:] == [0.0, 0.0]


def test_key_ego2global_is_the_cam_front_pose(spec: HandmadeSpec):
    infos = _train_infos(spec)
    point = np.array([3.0, -2.0, 0.5])
    for k, info in enumerate(infos):
        (ex, ey, ez), yaw = ego_pose_at(spec.cam_timestamp(k, "CAM_FRONT"))
        c, s = math.cos(yaw), math.sin(yaw)
        expected = [ex + c * point[0] - s * point[1], ey + s * point[0] + c * point[1], ez + point[2]]
        np.testing.assert_allclose(key_ego2global(info).apply(point), expected, atol=1e-9)


def test_official_mini_version_uses_the_devkit_splits(tmp_path: Path):
    root = tmp_path / "nuscenes"
    write_handmade_nuscenes(root, "v1.0-mini", scene_name="scene-0061")
    assert splits_for_version(root, "v1.0-mini") == {"mini_train": ["scene-0061"], "mini_val": []}
    paths = create_infos(root, "v1.0-mini", progress=False)
    assert paths == [info_path(root, "mini_train"), info_path(root, "mini_val")]
    assert len(load_infos(paths[0]).infos) == 3
    assert load_infos(paths[1]).infos == []


def test_test_version_has_empty_ground_truth(tmp_path: Path):
    from nuscenes.utils.splits import create_splits_scenes

    root = tmp_path / "nuscenes"
    scene = create_splits_scenes()["test"][0]
    write_handmade_nuscenes(root, "v1.0-test", scene_name=scene, with_annotations=False)
    (path,) = create_infos(root, "v1.0-test", progress=False)
    infos = load_infos(path).infos
    assert len(infos) == 3
    for info in infos:
        for key in ("gt_boxes", "gt_labels", "gt_num_lidar_pts", "gt_num_radar_pts", "gt_instance_tokens",
                    "all_labels"):
            assert info[key] == []


# ----------------------------------------------------------------------------------------------
# 2. File format.


def test_round_trip(spec: HandmadeSpec):
    paths = create_infos(spec.root, VERSION, progress=False)
    assert paths == [info_path(spec.root, "handmade_train"), info_path(spec.root, "handmade_val")]
    raw = json.loads(paths[0].read_text(encoding="utf-8"))
    assert raw["format"] == INFO_FORMAT and raw["format_version"] == INFO_FORMAT_VERSION
    loaded = load_infos(paths[0])
    assert (loaded.version, loaded.split) == (VERSION, "handmade_train")
    assert loaded.classes == raw["classes"] and len(loaded.classes) == 10
    assert loaded.created_by.startswith("bevnext ")
    assert loaded.infos == raw["infos"]
    # Deterministic: a second run writes the same bytes.
    first = paths[0].read_bytes()
    create_infos(spec.root, VERSION, progress=False)
    assert paths[0].read_bytes() == first


def test_format_version_mismatch(spec: HandmadeSpec):
    (path, _) = create_infos(spec.root, VERSION, progress=False)
    content = json.loads(path.read_text(encoding="utf-8"))
    content["format_version"] = 0
    path.write_text(json.dumps(content), encoding="utf-8")
    expected = "info format version 0, expected 1 — re-run bevnext create-data"
    with pytest.raises(DataError, match=expected) as err:
        load_infos(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("payload", [b"\x00\x01 garbage", b'{"infos": []}', b"[1, 2]", b"\xff\xfe{}", b""])
def test_garbage_is_not_an_info_file(tmp_path: Path, payload: bytes):
    path = tmp_path / "bevnext_infos_train.json"
    path.write_bytes(payload)
    with pytest.raises(DataError, match="not a bevnext info file") as err:
        load_infos(path)
    assert str(path) in str(err.value)


def test_missing_info_file(tmp_path: Path):
    path = tmp_path / "bevnext_infos_val.json"
    with pytest.raises(DataError, match="not found") as err:
        load_infos(path)
    assert str(path) in str(err.value)


class _Trap:
    """Unpickling this creates a file: proof that a loader executed pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
def test_pickle_is_rejected_not_unpickled(tmp_path: Path, protocol: int):
    marker = tmp_path / "executed"
    path = tmp_path / "bevnext_infos_train.pkl"
    path.write_bytes(pickle.dumps({"infos": [_Trap(marker)]}, protocol=protocol))
    with pytest.raises(DataError, match="not a bevnext info file"):
        load_infos(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# 3. Bad input: one clear error naming the file; nothing written.


def test_missing_data_root(tmp_path: Path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError, match="data root not found") as err:
        create_infos(root, VERSION, progress=False)
    assert str(root) in str(err.value)


def test_missing_version_folder(spec: HandmadeSpec):
    with pytest.raises(DataError, match="version folder not found") as err:
        create_infos(spec.root, "v1.0-trainval", progress=False)
    assert str(spec.root / "v1.0-trainval") in str(err.value)
    assert VERSION in str(err.value)  # lists the versions that are there
    assert _no_info_files(spec.root)


def test_missing_table(spec: HandmadeSpec):
    (spec.root / VERSION / "ego_pose.json").unlink()
    with pytest.raises(DataError, match="table file missing") as err:
        create_infos(spec.root, VERSION, progress=False)
    assert str(spec.root / VERSION / "ego_pose.json") in str(err.value)
    assert _no_info_files(spec.root)


def test_corrupt_table(spec: HandmadeSpec):
    (spec.root / VERSION / "sample.json").write_text('[{"token": "sample-0", ', encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON") as err:
        create_infos(spec.root, VERSION, progress=False)
    assert str(spec.root / VERSION / "sample.json") in str(err.value)
    assert _no_info_files(spec.root)


def test_table_record_missing_field(spec: HandmadeSpec):
    path = spec.root / VERSION / "sample_annotation.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    del records[2]["num_radar_pts"]
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(DataError, match="record 2 lacks field.*num_radar_pts") as err:
        create_infos(spec.root, VERSION, progress=False)
    assert str(path) in str(err.value)


def test_dangling_token(spec: HandmadeSpec):
    path = spec.root / VERSION / "sample_data.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    records[4]["ego_pose_token"] = "no-such-pose"
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(DataError, match="does not exist") as err:
        create_infos(spec.root, VERSION, progress=False)
    assert str(spec.root / VERSION) in str(err.value)
    assert _no_info_files(spec.root)


def test_missing_map_mask(spec: HandmadeSpec):
    (spec.root / "maps" / "handmade.png").unlink()
    with pytest.raises(DataError, match="map mask file missing") as err:
        create_infos(spec.root, VERSION, progress=False)
    assert str(spec.root / "maps" / "handmade.png") in str(err.value)


def test_missing_splits_file(spec: HandmadeSpec):
    (spec.root / VERSION / "splits.json").unlink()
    with pytest.raises(DataError, match="not a standard nuScenes version") as err:
        splits_for_version(spec.root, VERSION)
    assert str(spec.root / VERSION / "splits.json") in str(err.value)


def test_splits_naming_unknown_scenes(spec: HandmadeSpec):
    (spec.root / VERSION / "splits.json").write_text(json.dumps({"train": ["scene-0001", "scene-9999"]}))
    with pytest.raises(DataError, match="scene-9999") as err:
        create_infos(spec.root, VERSION, progress=False)
    assert str(spec.root / VERSION / "splits.json") in str(err.value)
    assert _no_info_files(spec.root)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing_image", "missing"),
        ("truncated_jpeg", "not a complete JPEG"),
        ("not_a_jpeg", "not a JPEG image"),
        ("truncated_lidar", "1234 bytes is not a multiple of 20"),
        ("missing_lidar", "missing"),
    ],
)
def test_bad_sample_file(spec: HandmadeSpec, breakage: str, message: str):
    if breakage.endswith("lidar"):
        rel = spec.lidar_paths[1]
    else:
        rel = spec.cam_paths[1]["CAM_BACK"]
    path = spec.root / rel
    if breakage.startswith("missing"):
        path.unlink()
    elif breakage == "truncated_jpeg":
        _truncate(path)
    elif breakage == "not_a_jpeg":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    else:
        path.write_bytes(bytes(1234))
    # A previous, good info file must survive a failed run untouched.
    old = info_path(spec.root, "handmade_train")
    old.write_text("previous run", encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        create_infos(spec.root, VERSION, progress=False)
    text = str(err.value)
    assert str(path) in text and "(sample sample-1)" in text
    assert "\n" not in text
    assert old.read_text(encoding="utf-8") == "previous run"
    assert not info_path(spec.root, "handmade_val").exists()
    assert not list(spec.root.glob(".bevnext_infos_*"))


def test_skip_missing_skips_only_the_bad_sample(spec: HandmadeSpec, caplog: pytest.LogCaptureFixture):
    bad = spec.root / spec.cam_paths[1]["CAM_BACK"]
    _truncate(bad)
    with caplog.at_level(logging.WARNING, logger="bevnext.data.infos"):
        infos = _train_infos(spec, skip_missing=True)
    assert [info["token"] for info in infos] == ["sample-0", "sample-2"]
    # The history chain stops at the gap rather than bridging it.
    assert [info["prev_tokens"] for info in infos] == [[], []]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any(str(bad) in line and "sample-1" in line for line in warnings)
    assert any("skipped 1 of 3 samples" in line for line in warnings)


def test_skip_missing_with_every_sample_bad_fails(spec: HandmadeSpec):
    for rel in spec.lidar_paths:
        (spec.root / rel).unlink()
    with pytest.raises(DataError, match="every sample"):
        create_infos(spec.root, VERSION, skip_missing=True, progress=False)
    assert _no_info_files(spec.root)


# ----------------------------------------------------------------------------------------------
# 4. The synthetic generator's output goes through the same path.


def test_synthetic_dataset(tmp_path: Path, tiny_synth_root: Path, tiny_synth_args: Mapping[str, Any]):
    # The shared dataset without its info files: create_infos writes them here, not into the shared root.
    root = tmp_path / "synth"
    shutil.copytree(tiny_synth_root, root, ignore=shutil.ignore_patterns("bevnext_infos_*"))
    version = "v1.0-synth"
    splits = splits_for_version(root, version)
    paths = create_infos(root, version, progress=False)
    assert [p.name for p in paths] == [f"bevnext_infos_{split}.json" for split in splits]
    total = 0
    for split, path in zip(splits, paths, strict=True):
        loaded = load_infos(path)
        assert loaded.split == split
        assert {info["scene_name"] for info in loaded.infos} <= set(splits[split])
        for info in loaded.infos:
            assert list(info["cams"]) == list(CAMERAS)
            assert info["gt_boxes"], f"sample {info['token']} has no ground truth"
            assert len(info["gt_boxes"]) == len(info["gt_labels"]) == len(info["gt_instance_tokens"])
        total += len(loaded.infos)
    assert total == tiny_synth_args["scenes"] * tiny_synth_args["samples_per_scene"]
