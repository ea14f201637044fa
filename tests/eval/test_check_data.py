"""Projection / drawing of boxes, and ground truth through the whole results path into the devkit."""

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bevnext.errors import DataError
from bevnext.eval.check_data import check_data
from bevnext.eval.formatting import write_results
from bevnext.eval.nusc_eval import evaluate_nusc, evaluate_results, load_split
from bevnext.eval.visualize import clip_segments_near_plane, draw_sample, project_box_edges, project_to_image
from bevnext.structures.boxes import CLASSES

# --------------------------------------------------------------------------------------------------
# A hand-made info: six cameras 1.5 m above the ego origin, 1600 x 900 pinhole, fx = fy = 800.
# --------------------------------------------------------------------------------------------------

FX, CX, CY = 800.0, 800.0, 450.0
CAM_YAWS = {
    "CAM_FRONT": 0.0, "CAM_FRONT_RIGHT": -55.0, "CAM_FRONT_LEFT": 55.0,
    "CAM_BACK": 180.0, "CAM_BACK_LEFT": 110.0, "CAM_BACK_RIGHT": -110.0,
}
# Optical camera (x right, y down, z forward) -> ego (x forward, y left, z up) looking along ego +x:
# columns are the camera axes in ego coordinates: x_cam = -y_ego, y_cam = -z_ego, z_cam = +x_ego.
# As a quaternion [w, x, y, z] that is (0.5, -0.5, 0.5, -0.5).
Q_FRONT = np.array([0.5, -0.5, 0.5, -0.5])


def _qmul(a, b):
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return [aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw]


def _pose(translation, yaw_rad=0.0):
    rotation = [np.cos(yaw_rad / 2), 0.0, 0.0, np.sin(yaw_rad / 2)]
    return {"translation": list(translation), "rotation": rotation}


def make_info(root, cam_ego_offset_x=0.0, size=(1600, 900)):
    """Key ego pose at global (10, 20, 0) heading 0; every camera's ego pose ``cam_ego_offset_x`` further."""
    w, h = size
    cams = {}
    for name, yaw_deg in CAM_YAWS.items():
        yaw = np.deg2rad(yaw_deg)
        rel = f"samples/{name}/img.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (90, 90, 90)).save(root / rel)
        cams[name] = {
            "path": rel, "sample_data_token": name, "timestamp": 0, "width": w, "height": h,
            "intrinsic": [[FX * w / 1600, 0, CX * w / 1600], [0, FX * w / 1600, CY * h / 900], [0, 0, 1]],
            "sensor2ego": {"translation": [0.0, 0.0, 1.5],
                           "rotation": _qmul([np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)], Q_FRONT)},
            "ego2global": _pose([10.0, 20.0, 0.0]),
        }
    for name in CAM_YAWS:
        if name != "CAM_FRONT":
            cams[name]["ego2global"] = _pose([10.0 + cam_ego_offset_x, 20.0, 0.0])
    return {"token": "tok", "cams": cams, "lidar": {"ego2global": _pose([10.0, 20.0, 0.0])}}


def test_point_ahead_projects_to_hand_computed_pixel(tmp_path):
    info = make_info(tmp_path)
    # 10 m ahead of the camera (camera at ego x=0, z=1.5), 2 m to the left, 0.5 m below the camera.
    # Camera frame: x right = -y_ego = -2, y down = -(z_ego - 1.5) = 0.5, z forward = x_ego = 10;
    # pixel = (cx + fx * x / z, cy + fy * y / z).
    uv, depth = project_to_image(np.array([[10.0, 2.0, 1.0]]), info, "CAM_FRONT")
    np.testing.assert_allclose(depth, [10.0], atol=1e-9)
    np.testing.assert_allclose(uv, [[CX - FX * 2 / 10, CY + FX * 0.5 / 10]], atol=1e-9)

    # Behind the camera: no pixel, negative depth.
    uv, depth = project_to_image(np.array([[-5.0, 0.0, 1.5]]), info, "CAM_FRONT")
    assert depth[0] == pytest.approx(-5.0) and np.isnan(uv).all()

    # CAM_BACK looks along -x: a point 8 m behind the ego, 1 m to the ego's left, at camera height.
    # Facing backwards, the ego's left is the camera's right: x_cam = +1.
    uv, depth = project_to_image(np.array([[-8.0, 1.0, 1.5]]), info, "CAM_BACK")
    np.testing.assert_allclose(depth, [8.0], atol=1e-9)
    np.testing.assert_allclose(uv, [[CX + FX * 1 / 8, CY]], atol=1e-9)


def test_projection_uses_each_cameras_own_ego_pose(tmp_path):
    # The side cameras fired when the ego was 2 m further along global +x than at the key time.
    info = make_info(tmp_path, cam_ego_offset_x=2.0)
    yaw = np.deg2rad(-55.0)  # CAM_FRONT_RIGHT's optical axis in the ego frame
    axis = np.array([np.cos(yaw), np.sin(yaw), 0.0])
    point_key = np.array([2.0, 0.0, 1.5]) + 10.0 * axis  # 10 m along the axis of the camera's ego pose
    uv, depth = project_to_image(point_key[None], info, "CAM_FRONT_RIGHT")
    np.testing.assert_allclose(depth, [10.0], atol=1e-9)
    np.testing.assert_allclose(uv, [[CX, CY]], atol=1e-9)


def test_near_plane_clipping_moves_the_end_behind_the_camera():
    p0 = np.array([[1.0, 0.0, -2.0], [0.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    p1 = np.array([[1.0, 0.0, 2.0], [0.0, 0.0, -3.0], [0.0, 1.0, 5.0]])
    q0, q1, keep = clip_segments_near_plane(p0, p1, near=0.1)
    assert keep.tolist() == [True, False, True]
    np.testing.assert_allclose(q0[0], [1.0, 0.0, 0.1])
    np.testing.assert_allclose(q1[0], p1[0])
    np.testing.assert_allclose(q0[2], p0[2])
    # Also when the second end is the one behind, at a slant: the cut point lies on the segment.
    q0, q1, keep = clip_segments_near_plane(np.array([[2.0, 0.0, 4.1]]), np.array([[-2.0, 0.0, -3.9]]))
    assert keep[0]
    np.testing.assert_allclose(q1[0], [2.0 - 4.0 * 4.0 / 8.0, 0.0, 0.1], atol=1e-12)


def test_box_straddling_the_camera_plane_is_clipped_not_dropped(tmp_path):
    info = make_info(tmp_path)
    # A 10 m long bus centred on the camera: its front half is ahead of CAM_FRONT, its back half behind.
    bus = np.array([[0.0, 0.0, 1.5, 10.0, 3.0, 2.0, 0.0, 0.0, 0.0]])
    segments, visible = project_box_edges(bus, info, "CAM_FRONT")
    assert segments.shape == (1, 12, 2, 2)
    # Bottom/top faces: the two long side edges of each face cross the plane; front edges are in front;
    # rear edges behind. Verticals: the 2 front ones visible, the 2 rear ones not.
    # Edge order: bottom (0-1 left side, 1-2 rear, 2-3 right side, 3-0 front), top likewise, verticals 0..3.
    assert visible[0].tolist() == [True, False, True, True, True, False, True, True, True, False, False, True]
    # The left bottom edge runs from the front-left corner (5, 1.5, 0.5) to behind the camera; it is cut
    # where camera depth = 0.1, i.e. ego x = 0.1: camera (x, y) = (-1.5, 1.0) -> u = 800 - 800 * 15.
    left_bottom = segments[0, 0]
    np.testing.assert_allclose(left_bottom[0], [CX - FX * 1.5 / 5.0, CY + FX * 1.0 / 5.0], atol=1e-6)
    np.testing.assert_allclose(left_bottom[1], [CX - FX * 1.5 / 0.1, CY + FX * 1.0 / 0.1], atol=1e-6)
    assert np.isnan(segments[0, 1]).all()


def test_draw_sample_writes_the_documented_layout(tmp_path):
    info = make_info(tmp_path, size=(320, 180))
    boxes = np.array([
        [12.0, 1.0, 0.8, 4.5, 2.0, 1.6, 0.3, 3.0, 0.0],
        [0.0, 0.0, 1.5, 10.0, 3.0, 2.0, 0.0, 0.0, 0.0],  # straddles the front camera
        [-9.0, -4.0, 0.9, 0.6, 0.6, 1.8, 2.0, 0.0, 0.0],
    ])
    labels = [CLASSES.index("car"), CLASSES.index("bus"), CLASSES.index("pedestrian")]
    out = draw_sample(tmp_path, info, boxes, labels, tmp_path / "pics" / "s.png", scores=[0.9, 0.8, 0.4])
    assert out.is_file()
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size == (3 * 320 + 2 * 180, 2 * 180)
        pixels = np.asarray(img.convert("RGB"))
    # The car's orange is drawn in the CAM_FRONT panel (top row, middle).
    front = pixels[:180, 320:640].reshape(-1, 3)
    assert (np.abs(front.astype(int) - [255, 150, 20]).sum(axis=1) < 30).any()
    # Large images are scaled down to 800 px wide panels.
    info_big = make_info(tmp_path / "big")
    out = draw_sample(tmp_path / "big", info_big, boxes[:1], labels[:1], tmp_path / "big.png")
    with Image.open(out) as img:
        assert img.size == (3 * 800 + 2 * 450, 2 * 450)


def test_draw_sample_missing_image_is_a_data_error(tmp_path):
    info = make_info(tmp_path, size=(32, 18))
    os.remove(tmp_path / info["cams"]["CAM_BACK"]["path"])
    with pytest.raises(DataError, match="CAM_BACK"):
        draw_sample(tmp_path, info, np.zeros((0, 9)), [], tmp_path / "x.png")


# --------------------------------------------------------------------------------------------------
# End to end on a small synthetic dataset.
# --------------------------------------------------------------------------------------------------

VERSION = "v1.0-synth"


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory, tiny_synth_root):
    """A copy of the session's shared dataset with its info files: check_data writes into its data root."""
    root = tmp_path_factory.mktemp("synth") / "nuscenes"
    shutil.copytree(tiny_synth_root, root)
    return root


@pytest.fixture(scope="module")
def checked(synth_root):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        metrics = check_data(synth_root, VERSION)
    return metrics, buffer.getvalue()


@pytest.mark.slow
def test_ground_truth_scores_perfectly(checked):
    metrics, _ = checked
    assert metrics["classes_with_gt"], "the synthetic validation split has no evaluable boxes"
    assert metrics["map_classes_with_gt"] >= 0.9999
    for name in metrics["classes_with_gt"]:
        assert metrics["mean_dist_aps"][name] >= 0.9999, name
        for err_name, err in metrics["label_tp_errors"][name].items():
            # NaN: the devkit defines no such error for the class (cone orientation, barrier velocity...).
            assert np.isnan(err) or err <= 0.01, (name, err_name, err)


@pytest.mark.slow
def test_check_data_prints_and_draws(checked, synth_root):
    metrics, printed = checked
    lines = printed.splitlines()
    assert any(line.startswith("mAP: ") for line in lines)
    assert any(line.startswith("NDS: ") for line in lines)
    assert "mAP (classes with ground truth): 1.000" in lines
    out_dir = synth_root / "check_data" / "synth_val"
    image = Path(metrics["image"])
    assert image.parent == out_dir and image.name.startswith("check_data_") and image.suffix == ".png"
    assert image.is_file() and str(image) in printed
    assert (out_dir / "results_nusc.json").is_file()
    assert (out_dir / "metrics_summary.json").is_file()
    results = json.loads((out_dir / "results_nusc.json").read_text())
    assert results["meta"]["use_camera"] is True


@pytest.mark.slow
def test_missing_samples_count_as_empty_and_empty_results_score_zero(checked, synth_root, tmp_path):
    results_file = synth_root / "check_data" / "synth_val" / "results_nusc.json"
    results = json.loads(results_file.read_text())["results"]
    tokens = sorted(results)
    half = {t: results[t] for t in tokens[: len(tokens) // 2]}
    path = write_results(tmp_path / "half.json", half)
    metrics = evaluate_nusc(synth_root, VERSION, "synth_val", path, tmp_path / "half")
    assert 0.0 < metrics["mean_ap"] <= checked[0]["mean_ap"]

    path = write_results(tmp_path / "none.json", {})
    metrics = evaluate_nusc(synth_root, VERSION, "synth_val", path, tmp_path / "none")
    assert metrics["mean_ap"] == 0.0 and metrics["map_classes_with_gt"] == 0.0


@pytest.mark.slow
def test_one_loaded_split_evaluates_several_results_files(checked, synth_root, tmp_path):
    """``load_split`` once, ``evaluate_results`` per file: the same metrics as ``evaluate_nusc`` each time."""
    target = load_split(synth_root, VERSION, "synth_val")
    assert target.split == "synth_val" and len(target.sample_tokens) > 0
    results_file = synth_root / "check_data" / "synth_val" / "results_nusc.json"
    full = evaluate_results(target, results_file, tmp_path / "full")
    expected = checked[0]
    for key in ("mean_ap", "nd_score", "mean_dist_aps", "num_gt", "classes_with_gt", "map_classes_with_gt"):
        assert full[key] == expected[key], key
    assert (tmp_path / "full" / "metrics_summary.json").is_file()
    empty = evaluate_results(target, write_results(tmp_path / "none.json", {}), tmp_path / "none")
    assert empty["mean_ap"] == 0.0 and empty["num_gt"] == expected["num_gt"]


@pytest.mark.slow
def test_bad_input_is_a_one_line_data_error(synth_root, tmp_path):
    # No info file: the message names the file and the command that creates it.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / VERSION).symlink_to(synth_root / VERSION, target_is_directory=True)
    with pytest.raises(DataError) as err:
        check_data(bare, VERSION)
    message = str(err.value)
    assert "bevnext_infos_synth_val.json" in message
    assert f"bevnext create-data --data-root {bare} --version {VERSION}" in message

    with pytest.raises(DataError, match="nope"):
        check_data(synth_root, VERSION, split="nope")
    with pytest.raises(DataError, match="no annotations"):
        check_data(synth_root, "v1.0-test")

    path = write_results(tmp_path / "r.json", {})
    with pytest.raises(DataError) as err:
        evaluate_nusc(synth_root, VERSION, "nope", path, tmp_path / "e")
    assert "nope" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="not in split"):
        foreign = write_results(tmp_path / "f.json", {"not-a-sample": []})
        evaluate_nusc(synth_root, VERSION, "synth_val", foreign, tmp_path / "f")
