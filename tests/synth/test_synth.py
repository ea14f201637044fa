"""The synthetic nuScenes generator: devkit compatibility, determinism, exact geometry, LiDAR, annotations.

The format, geometry and annotation checks read the session's shared dataset (``tiny_synth_root``:
2 scenes x 4 samples at 400 x 225); the tests of arguments, determinism and failures generate their own.
Geometry checks go through the official devkit's records (pyquaternion, not our transforms) into the
renderer's internal depth and object-id buffers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nuscenes")
from nuscenes import NuScenes  # noqa: E402
from pyquaternion import Quaternion  # noqa: E402

from bevnext.errors import BevnextError  # noqa: E402
from bevnext.structures.boxes import CATEGORY_TO_CLASS, CLASSES, attribute_for  # noqa: E402
from bevnext.synth import VERSION, generate_dataset  # noqa: E402
from bevnext.synth import generator as gen  # noqa: E402
from bevnext.synth.camera_rig import CAMERA_CHANNELS, LIDAR_CHANNEL  # noqa: E402
from bevnext.synth.ground import GroundTexture  # noqa: E402
from bevnext.synth.render import GROUND, SKY, CameraRenderer  # noqa: E402
from bevnext.synth.tables import TABLE_NAMES  # noqa: E402
from bevnext.synth.world import SceneWorld  # noqa: E402

SMALL = {"scenes": 2, "samples_per_scene": 2, "image_size": (320, 180), "seed": 0, "progress": False}
"""Arguments for the tests that generate a dataset of their own (argument checks, failures, progress)."""
GENERATED = ("maps", "samples", "sweeps", VERSION)
"""What the generator writes into a data root (``tiny_synth_root`` also holds info files)."""


@pytest.fixture(scope="module")
def dataroot(tiny_synth_root: Path) -> Path:
    return tiny_synth_root


@pytest.fixture(scope="module")
def nusc(dataroot: Path) -> NuScenes:
    return NuScenes(VERSION, str(dataroot), verbose=False)


@pytest.fixture(scope="module")
def spec(tiny_synth_args) -> gen.SynthSpec:
    """The validated arguments ``dataroot`` was generated with (the defaults: 2 sweeps, val fraction 0.25)."""
    a = tiny_synth_args
    return gen.validate_args(a["scenes"], a["samples_per_scene"], a["image_size"], a["seed"], 2, 0.25)


@pytest.fixture(scope="module")
def worlds(spec: gen.SynthSpec) -> dict[str, SceneWorld]:
    return {w.name: w for w in (spec.world(i) for i in range(spec.scenes))}


def _transform(translation: list[float], rotation: list[float]) -> np.ndarray:
    """(4, 4) matrix of a nuScenes record, via pyquaternion (the devkit's own maths)."""
    m = np.eye(4)
    m[:3, :3] = Quaternion(rotation).rotation_matrix
    m[:3, 3] = translation
    return m


def _sensor2global(nusc: NuScenes, sd_token: str) -> np.ndarray:
    sd = nusc.get("sample_data", sd_token)
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    return _transform(pose["translation"], pose["rotation"]) @ _transform(cs["translation"], cs["rotation"])


def _scene_of(nusc: NuScenes, sample_token: str) -> str:
    return nusc.get("scene", nusc.get("sample", sample_token)["scene_token"])["name"]


def _object_index(world: SceneWorld, sample: dict, translation: list[float]) -> int:
    """Index of the world object whose centre at the sample's time is this annotation's translation."""
    centres = world.objects.centres(world.timeline.seconds(sample["timestamp"]))
    dist = np.linalg.norm(centres - np.asarray(translation), axis=1)
    k = int(np.argmin(dist))
    assert dist[k] < 1e-9
    return k


def _inside_own(points: np.ndarray, boxes: np.ndarray, margin: float) -> np.ndarray:
    """Point inside box ``[x, y, z, l, w, h, yaw]`` enlarged by ``margin`` on every side, broadcasting.

    Args:
        points: (..., 3) global points.
        boxes: (..., 7) global boxes, broadcastable against ``points``.
    """
    rel = points - boxes[..., :3]
    c, s = np.cos(boxes[..., 6]), np.sin(boxes[..., 6])
    x = rel[..., 0] * c + rel[..., 1] * s
    y = -rel[..., 0] * s + rel[..., 1] * c
    half = 0.5 * boxes[..., 3:6] + margin
    return (np.abs(x) <= half[..., 0]) & (np.abs(y) <= half[..., 1]) & (np.abs(rel[..., 2]) <= half[..., 2])


def _inside(points: np.ndarray, boxes: np.ndarray, margin: float) -> np.ndarray:
    """(P, B) bool: each of P points inside each of B boxes enlarged by ``margin``."""
    return _inside_own(points[:, None, :], boxes[None, :, :], margin)


def _load_points(dataroot: Path, nusc: NuScenes, sd_token: str) -> tuple[np.ndarray, np.ndarray]:
    sd = nusc.get("sample_data", sd_token)
    raw = np.fromfile(dataroot / sd["filename"], dtype=np.float32).reshape(-1, 5)
    m = _sensor2global(nusc, sd_token)
    return raw, raw[:, :3].astype(np.float64) @ m[:3, :3].T + m[:3, 3]


# ------------------------------------------------------------------------------------------------
# Format
# ------------------------------------------------------------------------------------------------


def test_devkit_loads_all_tables_and_files(dataroot: Path, nusc: NuScenes, spec: gen.SynthSpec):
    assert sorted(p.stem for p in (dataroot / VERSION).glob("*.json")) == sorted([*TABLE_NAMES, "splits"])
    for name in TABLE_NAMES:
        assert len(getattr(nusc, name)) > 0, name
    assert len(nusc.scene) == spec.scenes and len(nusc.sample) == spec.scenes * spec.samples_per_scene
    for sample in nusc.sample:
        assert set(sample["data"]) == {*CAMERA_CHANNELS, LIDAR_CHANNEL}
    for sd in nusc.sample_data:
        assert (dataroot / sd["filename"]).is_file(), sd["filename"]
        assert len(sd["token"]) == 32 and int(sd["token"], 16) >= 0
    for record in nusc.map:
        assert (dataroot / record["filename"]).is_file()
    front = nusc.get("sample_data", nusc.sample[0]["data"]["CAM_FRONT"])
    with Image.open(dataroot / front["filename"]) as im:
        assert im.format == "JPEG" and im.size == spec.image_size
    # Exactly the devkit's fields.
    assert set(nusc.sample_annotation[0]) - {"category_name"} == {
        "token", "sample_token", "instance_token", "visibility_token", "attribute_tokens", "translation",
        "size", "rotation", "prev", "next", "num_lidar_pts", "num_radar_pts"}
    raw = json.loads((dataroot / VERSION / "sample_data.json").read_text())
    assert set(raw[0]) == {"token", "sample_token", "ego_pose_token", "calibrated_sensor_token", "timestamp",
                           "fileformat", "is_key_frame", "height", "width", "filename", "prev", "next"}
    assert {a["name"] for a in nusc.attribute} == {
        "vehicle.moving", "vehicle.stopped", "vehicle.parked", "cycle.with_rider", "cycle.without_rider",
        "pedestrian.sitting_lying_down", "pedestrian.standing", "pedestrian.moving"}
    assert {v["token"]: v["level"] for v in nusc.visibility} == {
        "1": "v0-40", "2": "v40-60", "3": "v60-80", "4": "v80-100"}


def test_splits_cover_all_scenes(dataroot: Path, nusc: NuScenes):
    splits = json.loads((dataroot / VERSION / "splits.json").read_text())
    assert set(splits) == {"synth_train", "synth_val"}
    assert splits["synth_train"] and splits["synth_val"]
    assert sorted(splits["synth_train"] + splits["synth_val"]) == sorted(s["name"] for s in nusc.scene)
    from nuscenes.utils.splits import get_scenes_of_custom_split

    assert get_scenes_of_custom_split("synth_val", nusc) == splits["synth_val"]


def test_sample_data_chains_and_timing(nusc: NuScenes, spec: gen.SynthSpec):
    n = spec.samples_per_scene
    starts = sorted(s["timestamp"] for s in nusc.sample if not s["prev"])
    assert len(set(starts)) == spec.scenes
    for scene in nusc.scene:
        samples = [nusc.get("sample", scene["first_sample_token"])]
        while samples[-1]["next"]:
            samples.append(nusc.get("sample", samples[-1]["next"]))
        assert len(samples) == scene["nbr_samples"] == n
        assert samples[-1]["token"] == scene["last_sample_token"]
        key_times = np.array([s["timestamp"] for s in samples])
        np.testing.assert_allclose(np.diff(key_times), 500_000, atol=5000)
        for channel in (*CAMERA_CHANNELS, LIDAR_CHANNEL):
            sd = nusc.get("sample_data", samples[0]["data"][channel])
            assert sd["prev"] == ""
            chain = [sd]
            while chain[-1]["next"]:
                chain.append(nusc.get("sample_data", chain[-1]["next"]))
            stamps = [r["timestamp"] for r in chain]
            assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
            keys = [r for r in chain if r["is_key_frame"]]
            assert [r["sample_token"] for r in keys] == [s["token"] for s in samples]
            if channel == LIDAR_CHANNEL:
                assert [r["timestamp"] for r in keys] == list(key_times)
                assert len(chain) == n + (n - 1) * 2  # two sweeps between consecutive key frames
                for r in chain:
                    if not r["is_key_frame"]:  # a sweep belongs to the sample it precedes
                        owner = nusc.get("sample", r["sample_token"])
                        prev = nusc.get("sample", owner["prev"])
                        assert prev["timestamp"] < r["timestamp"] < owner["timestamp"]
                        assert r["filename"].startswith("sweeps/LIDAR_TOP/")
            else:
                assert len(chain) == n and all(r["fileformat"] == "jpg" for r in chain)
                offsets = np.array(stamps) - key_times
                assert np.all(np.abs(offsets) < 50_000) and np.all(np.abs(offsets) > 1000)
                # Each camera has its own ego pose at its own time.
                for r in chain:
                    assert nusc.get("ego_pose", r["ego_pose_token"])["timestamp"] == r["timestamp"]


def test_devkit_get_sample_data_and_velocity(nusc: NuScenes, spec: gen.SynthSpec):
    sample = nusc.sample[5]
    path, boxes, intrinsic = nusc.get_sample_data(sample["data"]["CAM_FRONT"])
    assert Path(path).is_file() and intrinsic.shape == (3, 3) and boxes
    assert intrinsic[0, 0] == pytest.approx(1264.0 * spec.image_size[0] / 1600, rel=0.01)
    _, lidar_boxes, none = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
    assert none is None and len(lidar_boxes) == len(sample["anns"])
    sweep = nusc.get("sample_data", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["prev"])
    assert not sweep["is_key_frame"]
    assert nusc.get_boxes(sweep["token"])  # interpolated boxes
    speeds = [np.linalg.norm(nusc.box_velocity(a["token"])) for a in nusc.sample_annotation]
    assert np.all(np.isfinite(speeds))


# ------------------------------------------------------------------------------------------------
# Determinism and safety
# ------------------------------------------------------------------------------------------------


def _digest(root: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file the generator writes under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in GENERATED for p in sorted((root / folder).rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(dataroot: Path, tmp_path: Path, tiny_synth_args):
    again = generate_dataset(tmp_path / "again", **tiny_synth_args, progress=False)
    assert sorted(p.name for p in again.iterdir()) == sorted(GENERATED)
    assert _digest(again) == _digest(dataroot)  # byte-identical tables, images, point clouds, maps
    other = generate_dataset(tmp_path / "other", **{**tiny_synth_args, "seed": 1}, progress=False)
    a, b = _digest(other), _digest(dataroot)
    assert a[f"{VERSION}/sample_annotation.json"] != b[f"{VERSION}/sample_annotation.json"]
    assert a[f"{VERSION}/ego_pose.json"] != b[f"{VERSION}/ego_pose.json"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"scenes": 1}, "scenes"),
        ({"scenes": 2.5}, "scenes"),
        ({"scenes": True}, "scenes"),
        ({"samples_per_scene": 1}, "samples_per_scene"),
        ({"image_size": (63, 36)}, "image_size"),
        ({"image_size": (64, 35)}, "image_size"),
        ({"image_size": (64,)}, "image_size"),
        ({"image_size": 64}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"lidar_sweeps_per_sample": 10}, "lidar_sweeps_per_sample"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0.0}, "val_fraction"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, name: str):
    out = tmp_path / "out"
    with pytest.raises(BevnextError, match=name) as info:
        generate_dataset(out, **{**SMALL, **kwargs})
    assert "\n" not in str(info.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_non_empty_out_is_refused_and_untouched(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(BevnextError, match="out"):
        generate_dataset(out, **SMALL)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder is fine
    assert generate_dataset(empty, **SMALL) == empty
    assert (empty / VERSION / "scene.json").is_file()


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while annotating")

    monkeypatch.setattr(gen, "_annotate", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_dataset(out, **SMALL)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture):
    generate_dataset(tmp_path / "out", **{**SMALL, "progress": True})
    captured = capsys.readouterr()
    assert captured.out == "" and "synth" in captured.err


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------


def _renderers(world: SceneWorld) -> dict[str, CameraRenderer]:
    texture = GroundTexture(world.road, world.texture_seed, world.ground_gain)
    return {cam.channel: CameraRenderer(world, c, texture) for c, cam in enumerate(world.rig.cameras)}


def test_rendered_objects_and_ground_match_devkit_projection(dataroot: Path, nusc: NuScenes, worlds):
    exact = occluded = ground_checked = images = 0
    rng = np.random.default_rng(0)
    for scene in nusc.scene:
        world = worlds[scene["name"]]
        renderers = _renderers(world)
        token = scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            anns = [nusc.get("sample_annotation", a) for a in sample["anns"]]
            for channel in CAMERA_CHANNELS:
                sd = nusc.get("sample_data", sample["data"][channel])
                result = renderers[channel].render(sd["timestamp"])
                images += 1
                # The JPEG on disk is this image.
                with Image.open(dataroot / sd["filename"]) as im:
                    jpeg = np.asarray(im.convert("RGB"), dtype=np.float64)
                assert np.abs(jpeg - result.rgb).mean() < 6.0
                cam2global = _sensor2global(nusc, sd["token"])
                global2cam = np.linalg.inv(cam2global)
                calib = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
                intrinsic = np.array(calib["camera_intrinsic"])
                dt = 1e-6 * (sd["timestamp"] - sample["timestamp"])
                # Box centres at the camera's own time, projected through the devkit's records.
                for ann in anns:
                    k = _object_index(world, sample, ann["translation"])
                    centre = np.asarray(ann["translation"]) + dt * nusc.box_velocity(ann["token"])
                    pc = global2cam[:3, :3] @ centre + global2cam[:3, 3]
                    if pc[2] < 1.0:
                        continue
                    u, v = (intrinsic @ pc)[:2] / pc[2]
                    if not (0 <= u < sd["width"] and 0 <= v < sd["height"]):
                        continue
                    row, col = int(np.floor(v)), int(np.floor(u))
                    seen, depth = result.ids[row, col], result.depth[row, col]
                    if seen == k:
                        exact += 1
                        assert depth <= pc[2] + 1e-4  # the visible surface lies in front of the centre
                    else:  # something nearer hides the centre: it must be another object
                        occluded += 1
                        assert seen >= 0 and depth < pc[2], (ann["token"], channel, seen, depth, pc[2])
                # Ground depth: analytic ray / plane intersection from the devkit's camera pose.
                rows, cols = np.nonzero(result.ids == GROUND)
                pick = rng.choice(rows.size, size=min(200, rows.size), replace=False)
                rows, cols = rows[pick], cols[pick]
                rays = np.linalg.inv(intrinsic) @ np.stack([cols + 0.5, rows + 0.5, np.ones(rows.size)])
                dirs = cam2global[:3, :3] @ rays
                analytic = -cam2global[2, 3] / dirs[2]
                np.testing.assert_allclose(result.depth[rows, cols], analytic, rtol=2e-5)
                ground_checked += rows.size
                sky_rows, sky_cols = np.nonzero(result.ids == SKY)
                if sky_rows.size:
                    sky = cam2global[:3, :3] @ (np.linalg.inv(intrinsic) @ np.stack(
                        [sky_cols + 0.5, sky_rows + 0.5, np.ones(sky_rows.size)]))
                    assert np.all(sky[2] >= -1e-9) and np.all(np.isinf(result.depth[sky_rows, sky_cols]))
            token = sample["next"]
    # Up to 200 ground pixels per image; a camera right next to a large object (a trailer) sees no ground.
    assert exact > 50 and occluded > 0 and ground_checked > 0.75 * 200 * images


def test_depth_of_object_pixels_matches_box_surface(nusc: NuScenes, worlds):
    """Pixels labelled with an object back-project onto that box's surface at the camera time."""
    sample = nusc.sample[1]
    world = worlds[_scene_of(nusc, sample["token"])]
    renderers = _renderers(world)
    checked = 0
    for channel in CAMERA_CHANNELS:
        sd = nusc.get("sample_data", sample["data"][channel])
        result = renderers[channel].render(sd["timestamp"])
        rows, cols = np.nonzero(result.ids >= 0)
        if rows.size == 0:
            continue
        cam2global = _sensor2global(nusc, sd["token"])
        calib = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        intrinsic = np.array(calib["camera_intrinsic"])
        rays = np.linalg.inv(intrinsic) @ np.stack([cols + 0.5, rows + 0.5, np.ones(rows.size)])
        pts_cam = rays * result.depth[rows, cols].astype(np.float64)
        pts = (cam2global[:3, :3] @ pts_cam).T + cam2global[:3, 3]
        boxes = world.objects.boxes(world.timeline.seconds(sd["timestamp"]))
        own = boxes[result.ids[rows, cols]]
        # Each point against its own box: on the surface within 1 cm, not deeper inside.
        assert _inside_own(pts, own, 0.01).all()
        assert not _inside_own(pts, own, -0.01).any()
        checked += rows.size
    assert checked > 1000


# ------------------------------------------------------------------------------------------------
# LiDAR
# ------------------------------------------------------------------------------------------------


def test_lidar_points_lie_on_ground_or_boxes(dataroot: Path, nusc: NuScenes, worlds, spec: gen.SynthSpec):
    checked = 0
    for sd in nusc.sample_data:  # key frames and sweeps, each with the objects at its own time
        if sd["fileformat"] != "pcd":
            continue
        world = worlds[_scene_of(nusc, sd["sample_token"])]
        raw, pts = _load_points(dataroot, nusc, sd["token"])
        assert raw.shape[0] > 10_000
        assert np.all((raw[:, 4] >= 0) & (raw[:, 4] < 32) & (raw[:, 4] == np.round(raw[:, 4])))
        assert np.all(np.linalg.norm(raw[:, :3], axis=1) <= 70.0 + 1e-3)
        assert np.all((raw[:, 3] >= 0) & (raw[:, 3] <= 255))
        boxes = world.objects.boxes(world.timeline.seconds(sd["timestamp"]))
        origin = _sensor2global(nusc, sd["token"])[:3, 3]
        boxes = boxes[np.hypot(*(boxes[:, :2] - origin[:2]).T) < 80.0]
        checked += 1
        on_ground = np.abs(pts[:, 2]) < 0.01
        in_box = _inside(pts[~on_ground], boxes, 0.01).any(axis=1)
        assert in_box.all(), f"{(~in_box).sum()} points off the ground and off every box in {sd['filename']}"
        assert in_box.sum() > 100
    n = spec.samples_per_scene
    assert checked == spec.scenes * (n + (n - 1) * 2)  # key frames and two sweeps between each pair


def test_num_lidar_pts_counts_key_points_in_boxes(dataroot: Path, nusc: NuScenes):
    total = 0
    for sample in nusc.sample:
        _, pts = _load_points(dataroot, nusc, sample["data"]["LIDAR_TOP"])
        anns = [nusc.get("sample_annotation", a) for a in sample["anns"]]
        boxes = np.array([[*a["translation"], a["size"][1], a["size"][0], a["size"][2],
                           Quaternion(a["rotation"]).yaw_pitch_roll[0]] for a in anns])
        counts = _inside(pts, boxes, 0.01).sum(axis=0)
        np.testing.assert_array_equal(counts, [a["num_lidar_pts"] for a in anns])
        assert all(a["num_radar_pts"] == 0 for a in anns)
        total += counts.sum()
    assert total > 1000


# ------------------------------------------------------------------------------------------------
# Annotations
# ------------------------------------------------------------------------------------------------


def test_annotations_attributes_classes_and_tracks(nusc: NuScenes, worlds):
    attribute_names = {a["token"]: a["name"] for a in nusc.attribute}
    classes, speeds = set(), []
    for ann in nusc.sample_annotation:
        cls = CATEGORY_TO_CLASS[ann["category_name"]]
        classes.add(cls)
        speed = float(np.linalg.norm(nusc.box_velocity(ann["token"])))
        speeds.append(speed)
        names = [attribute_names[t] for t in ann["attribute_tokens"]]
        expected = attribute_for(cls, speed)
        assert names == ([expected] if expected else []), (cls, speed, names)
        assert ann["visibility_token"] in {"1", "2", "3", "4"}
        assert len(ann["size"]) == 3 and len(ann["rotation"]) == 4
        # Annotated near the ego only.
        sd = nusc.get("sample_data", nusc.get("sample", ann["sample_token"])["data"]["LIDAR_TOP"])
        ego = np.asarray(nusc.get("ego_pose", sd["ego_pose_token"])["translation"])
        dist = np.hypot(*(np.asarray(ann["translation"][:2]) - ego[:2]))
        assert dist <= 50.0 or (dist <= 60.0 and ann["num_lidar_pts"] > 0)
    speeds = np.array(speeds)
    assert len(classes) >= 6, classes
    assert set(classes) == set(CLASSES)  # the anchors place every class near the ego
    assert (speeds > 0.5).any() and (speeds == 0.0).any()
    # Velocities equal the world's true velocities (straight constant-velocity tracks).
    for ann in nusc.sample_annotation[::7]:
        sample = nusc.get("sample", ann["sample_token"])
        world = worlds[_scene_of(nusc, sample["token"])]
        k = _object_index(world, sample, ann["translation"])
        np.testing.assert_allclose(nusc.box_velocity(ann["token"]), world.objects.velocity[k], atol=1e-6)
    # Instance chains: at least two annotations, linked first to last, one instance throughout.
    for inst in nusc.instance:
        assert inst["nbr_annotations"] >= 2
        chain = [nusc.get("sample_annotation", inst["first_annotation_token"])]
        while chain[-1]["next"]:
            chain.append(nusc.get("sample_annotation", chain[-1]["next"]))
        assert len(chain) == inst["nbr_annotations"] and chain[-1]["token"] == inst["last_annotation_token"]
        assert {a["instance_token"] for a in chain} == {inst["token"]}
        assert chain[0]["prev"] == ""
        sizes = {tuple(a["size"]) for a in chain}
        assert len(sizes) == 1


def test_official_detection_eval_scores_ground_truth_perfectly(nusc: NuScenes, tmp_path: Path):
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval
    from nuscenes.utils.splits import get_scenes_of_custom_split

    val_scenes = set(get_scenes_of_custom_split("synth_val", nusc))
    attribute_names = {a["token"]: a["name"] for a in nusc.attribute}
    results: dict[str, list[dict]] = {}
    for sample in nusc.sample:
        if _scene_of(nusc, sample["token"]) not in val_scenes:
            continue
        boxes = []
        for token in sample["anns"]:
            ann = nusc.get("sample_annotation", token)
            if ann["num_lidar_pts"] == 0:  # the eval drops such ground truth
                continue
            boxes.append({
                "sample_token": sample["token"], "translation": ann["translation"], "size": ann["size"],
                "rotation": ann["rotation"], "velocity": list(nusc.box_velocity(token)[:2]),
                "detection_name": CATEGORY_TO_CLASS[ann["category_name"]], "detection_score": 0.9,
                "attribute_name": attribute_names[t[0]] if (t := ann["attribute_tokens"]) else "",
            })
        results[sample["token"]] = boxes
    path = tmp_path / "results.json"
    meta = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False,
            "use_external": False}
    path.write_text(json.dumps({"meta": meta, "results": results}))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = DetectionEval(nusc, config_factory("detection_cvpr_2019"), str(path), "synth_val",
                                  str(tmp_path / "eval"), verbose=False)
        metrics, _ = evaluator.evaluate()
    present = {b.detection_name for b in evaluator.gt_boxes.all}
    assert len(present) >= 4
    for cls in present:
        assert metrics.mean_dist_aps[cls] == pytest.approx(1.0), cls


# ------------------------------------------------------------------------------------------------
# Brute force: every object against every ray, independent of the fast paths' culling
# ------------------------------------------------------------------------------------------------


def _nearest_hits(origin: np.ndarray, dirs: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest box hit of rays ``origin + t * dirs`` (float64): (P,) t (inf if none) and box index (-1)."""
    best_t = np.full(dirs.shape[0], np.inf)
    best_id = np.full(dirs.shape[0], -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k, (x, y, z, length, width, height, yaw) in enumerate(boxes):
            c, s = np.cos(yaw), np.sin(yaw)
            rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])  # global -> box
            o = rot @ (origin - np.array([x, y, z]))
            d = dirs @ rot.T
            half = np.array([length, width, height]) / 2
            t_near, t_far = np.full(d.shape[0], -np.inf), np.full(d.shape[0], np.inf)
            for i in range(3):  # classic slab test; fmax/fmin ignore the NaN of 0/0
                t1, t2 = (-half[i] - o[i]) / d[:, i], (half[i] - o[i]) / d[:, i]
                t_near = np.fmax(t_near, np.minimum(t1, t2))
                t_far = np.fmin(t_far, np.maximum(t1, t2))
            hit = (t_near < t_far) & (t_near > 0) & (t_near < best_t)
            best_t[hit], best_id[hit] = t_near[hit], k
    return best_t, best_id


def test_renderer_matches_brute_force_ray_casting(nusc: NuScenes, worlds):
    mismatched = total = 0
    for sample in nusc.sample[1::5]:
        world = worlds[_scene_of(nusc, sample["token"])]
        renderers = _renderers(world)
        for channel in CAMERA_CHANNELS:
            sd = nusc.get("sample_data", sample["data"][channel])
            result = renderers[channel].render(sd["timestamp"])
            cam2global = _sensor2global(nusc, sd["token"])
            calib = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            h, w = result.ids.shape
            rows, cols = np.mgrid[0:h, 0:w]
            pix = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5, np.ones(h * w)])
            dirs = (cam2global[:3, :3] @ np.linalg.inv(np.array(calib["camera_intrinsic"])) @ pix).T
            boxes = world.objects.boxes(world.timeline.seconds(sd["timestamp"]))
            # All objects within 150 m, whether in view or not (the world holds nothing much further).
            near = np.flatnonzero(np.hypot(*(boxes[:, :2] - cam2global[:2, 3]).T) < 150.0)
            t_box, ids = _nearest_hits(cam2global[:3, 3], dirs, boxes[near])
            ids = np.where(ids >= 0, near[ids], -1)
            with np.errstate(divide="ignore", invalid="ignore"):
                t_ground = np.where(dirs[:, 2] < 0, -cam2global[2, 3] / dirs[:, 2], np.inf)
            ref_ids = np.where(t_box < t_ground, ids, np.where(np.isfinite(t_ground), GROUND, SKY))
            ref_depth = np.minimum(t_box, t_ground)
            same = ref_ids == result.ids.ravel()
            mismatched += int((~same).sum())
            total += same.size
            finite = same & np.isfinite(ref_depth)
            np.testing.assert_allclose(result.depth.ravel()[finite], ref_depth[finite], rtol=1e-4)
    # Only silhouette pixels whose ray grazes an edge may differ (float32 vs float64).
    assert mismatched <= 1e-4 * total, (mismatched, total)
    print(f"brute-force render check: {mismatched} of {total} pixels differ")


def test_lidar_matches_brute_force_ray_casting(dataroot: Path, nusc: NuScenes, worlds):
    from bevnext.synth.lidar import ELEVATIONS_DEG, MAX_RANGE, N_AZIMUTH

    for sample in nusc.sample[::4]:
        world = worlds[_scene_of(nusc, sample["token"])]
        sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        lidar2global = _sensor2global(nusc, sd["token"])
        elev = np.deg2rad(ELEVATIONS_DEG)[:, None]
        az = (2 * np.pi * np.arange(N_AZIMUTH) / N_AZIMUTH)[None, :]
        local = np.stack(
            np.broadcast_arrays(np.cos(elev) * np.cos(az), np.cos(elev) * np.sin(az), np.sin(elev)), axis=-1
        ).reshape(-1, 3)
        dirs = local @ lidar2global[:3, :3].T
        origin = lidar2global[:3, 3]
        t_box, ids = _nearest_hits(origin, dirs, world.objects.boxes(world.timeline.seconds(sd["timestamp"])))
        with np.errstate(divide="ignore", invalid="ignore"):
            t_ground = np.where(dirs[:, 2] < 0, -origin[2] / dirs[:, 2], np.inf)
        t = np.minimum(t_box, t_ground)
        ref_ids = np.where(t_box < t_ground, ids, -1)[t <= MAX_RANGE]
        raw, _ = _load_points(dataroot, nusc, sd["token"])
        assert abs(raw.shape[0] - ref_ids.size) <= 2, (raw.shape[0], ref_ids.size)
        ref_counts = np.bincount(ref_ids[ref_ids >= 0], minlength=len(world.objects))
        anns = [nusc.get("sample_annotation", a) for a in sample["anns"]]
        for ann in anns:
            k = _object_index(world, sample, ann["translation"])
            assert abs(ann["num_lidar_pts"] - ref_counts[k]) <= 1, (ann["num_lidar_pts"], ref_counts[k])


def _footprints_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, B) bool: oriented footprints ``[x, y, l, w, yaw]`` overlap (separating-axis test)."""
    def corners(f: np.ndarray) -> np.ndarray:
        c, s = np.cos(f[:, 4]), np.sin(f[:, 4])
        lx = np.array([1, -1, -1, 1]) * f[:, 2:3] / 2
        ly = np.array([1, 1, -1, -1]) * f[:, 3:4] / 2
        return np.stack([f[:, :1] + lx * c[:, None] - ly * s[:, None],
                         f[:, 1:2] + lx * s[:, None] + ly * c[:, None]], axis=-1)  # (N, 4, 2)

    ca, cb = corners(a), corners(b)
    separated = np.zeros((a.shape[0], b.shape[0]), dtype=bool)
    for f, own in ((a, True), (b, False)):
        for angle in (f[:, 4], f[:, 4] + np.pi / 2):
            axis = np.stack([np.cos(angle), np.sin(angle)], axis=-1)  # (N, 2)
            if own:
                pa = np.einsum("ikd,id->ik", ca, axis)[:, None, :]
                pb = np.einsum("jkd,id->ijk", cb, axis)
            else:
                pa = np.einsum("ikd,jd->ijk", ca, axis)
                pb = np.einsum("jkd,jd->jk", cb, axis)[None, :, :]
            separated |= (pa.max(-1) < pb.min(-1)) | (pb.max(-1) < pa.min(-1))
    return ~separated


def test_objects_never_overlap_each_other_or_the_ego(worlds):
    from bevnext.synth.world import EGO_FRONT, EGO_REAR

    for world in worlds.values():
        objs = world.objects
        end = world.timeline.seconds(int(world.timeline.camera_us.max()))
        for t in np.linspace(0.0, end, 12):
            boxes = objs.boxes(t)
            fp = boxes[:, [0, 1, 3, 4, 6]]
            overlap = _footprints_overlap(fp, fp)
            np.fill_diagonal(overlap, False)
            assert not overlap.any(), np.argwhere(overlap)[:3]
            pose = world.ego.pose(t)
            yaw = np.arctan2(pose.rotation[1, 0], pose.rotation[0, 0])
            centre = pose.apply(np.array([(EGO_FRONT - EGO_REAR) / 2, 0.0, 0.0]))
            ego = np.array([[centre[0], centre[1], EGO_FRONT + EGO_REAR, 1.95, yaw]])
            assert not _footprints_overlap(ego, fp).any()
        assert np.all(objs.p0[:, 2] - objs.size[:, 2] / 2 > 0)  # on (just above) the ground
