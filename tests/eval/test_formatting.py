"""Model outputs -> nuScenes result records, checked against hand-written math."""

import json

import numpy as np
import pytest

from bevnext.eval.formatting import DEFAULT_META, MAX_BOXES_PER_SAMPLE, detections_to_nusc, write_results
from bevnext.eval.nusc_eval import format_metrics_lines
from bevnext.structures.boxes import CLASSES, global_boxes_to_ego
from bevnext.structures.transforms import RigidTransform


def hamilton(a, b):
    """Quaternion product a * b, both [w, x, y, z]."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return np.array(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ]
    )


def rotate(q, v):
    """Rotate vector v by unit quaternion q: q * (0, v) * conj(q)."""
    conj = np.array([q[0], -q[1], -q[2], -q[3]])
    return hamilton(hamilton(q, np.concatenate([[0.0], v])), conj)[1:]


def same_rotation(q1, q2):
    # q and -q are the same rotation.
    q1, q2 = np.asarray(q1) / np.linalg.norm(q1), np.asarray(q2) / np.linalg.norm(q2)
    return min(np.abs(q1 - q2).max(), np.abs(q1 + q2).max()) < 1e-9


CAR = CLASSES.index("car")


def test_yaw_only_pose_by_hand():
    # Ego at global (100, 200, 1.5), heading 30 deg. A car 10 m ahead, 3 m to the right, centre 0.8 m up,
    # heading 60 deg in the ego frame, (l, w, h) = (4.5, 2.0, 1.6), moving (3, 4) m/s in the ego frame.
    ego_yaw = np.deg2rad(30.0)
    pose = RigidTransform.from_nusc([100.0, 200.0, 1.5], [np.cos(ego_yaw / 2), 0.0, 0.0, np.sin(ego_yaw / 2)])
    box = np.array([[10.0, -3.0, 0.8, 4.5, 2.0, 1.6, np.deg2rad(60.0), 3.0, 4.0]])
    (rec,) = detections_to_nusc(box, np.array([0.75]), np.array([CAR]), "tok", pose)

    c, s = np.cos(ego_yaw), np.sin(ego_yaw)
    expected = [100 + c * 10 - s * -3, 200 + s * 10 + c * -3, 2.3]
    np.testing.assert_allclose(rec["translation"], expected, atol=1e-12)
    assert rec["size"] == [2.0, 4.5, 1.6]  # nuScenes order [w, l, h]
    # Global heading 30 + 60 = 90 deg -> quaternion (cos 45, 0, 0, sin 45).
    assert same_rotation(rec["rotation"], [np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)])
    np.testing.assert_allclose(rec["velocity"], [c * 3 - s * 4, s * 3 + c * 4], atol=1e-12)
    assert rec["sample_token"] == "tok"
    assert rec["detection_name"] == "car"
    assert rec["detection_score"] == 0.75 and isinstance(rec["detection_score"], float)
    assert rec["attribute_name"] == "vehicle.moving"


def test_general_quaternion_pose_by_hand():
    q_pose = np.array([0.9, 0.1, -0.2, 0.3])
    q_pose /= np.linalg.norm(q_pose)
    t_pose = np.array([-50.0, 1200.0, 3.0])
    pose = RigidTransform.from_nusc(t_pose, q_pose)
    yaw = -2.0
    box = np.array([[-7.0, 12.0, -0.4, 0.8, 0.6, 1.7, yaw, 0.1, -0.05]])
    ped = CLASSES.index("pedestrian")
    (rec,) = detections_to_nusc(box, np.array([1.0]), np.array([ped]), "s", pose)

    np.testing.assert_allclose(rec["translation"], rotate(q_pose, box[0, :3]) + t_pose, atol=1e-9)
    assert rec["size"] == [0.6, 0.8, 1.7]
    q_yaw = np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])
    assert same_rotation(rec["rotation"], hamilton(q_pose, q_yaw))
    np.testing.assert_allclose(rec["velocity"], rotate(q_pose, np.array([0.1, -0.05, 0.0]))[:2], atol=1e-12)
    assert rec["attribute_name"] == "pedestrian.standing"  # ~0.11 m/s is below the 0.2 m/s threshold


def test_round_trip_through_global_boxes_to_ego():
    rng = np.random.default_rng(0)
    n = 30
    boxes = np.concatenate(
        [rng.normal(size=(n, 3)) * 20, rng.uniform(0.3, 12, size=(n, 3)), rng.uniform(-np.pi, np.pi, (n, 1)),
         rng.normal(size=(n, 2)) * 4],
        axis=1,
    )
    labels = rng.integers(0, len(CLASSES), n)
    yaw_pose = RigidTransform.from_nusc([300.0, -20.0, 0.5], [np.cos(0.7), 0.0, 0.0, np.sin(0.7)])
    recs = detections_to_nusc(boxes, rng.uniform(size=n), labels, "t", yaw_pose)
    back = global_boxes_to_ego(
        [r["translation"] for r in recs], [r["size"] for r in recs], [r["rotation"] for r in recs],
        [r["velocity"] for r in recs], yaw_pose,
    )
    np.testing.assert_allclose(back[:, :6], boxes[:, :6], atol=1e-9)
    np.testing.assert_allclose(np.cos(back[:, 6] - boxes[:, 6]), 1.0, atol=1e-12)
    np.testing.assert_allclose(back[:, 7:], boxes[:, 7:], atol=1e-9)
    assert [r["detection_name"] for r in recs] == [CLASSES[i] for i in labels]


@pytest.mark.parametrize(
    ("name", "velocity", "attribute"),
    [
        ("car", (5.0, 0.0), "vehicle.moving"),
        ("car", (0.0, 0.0), "vehicle.parked"),
        ("truck", (0.1, 0.1), "vehicle.parked"),
        ("bus", (0.1, 0.0), "vehicle.stopped"),
        ("bus", (0.0, -8.0), "vehicle.moving"),
        ("pedestrian", (0.0, 0.0), "pedestrian.standing"),
        ("pedestrian", (1.2, 0.3), "pedestrian.moving"),
        ("bicycle", (3.0, 0.0), "cycle.with_rider"),
        ("bicycle", (0.0, 0.0), "cycle.without_rider"),
        ("motorcycle", (0.0, 6.0), "cycle.with_rider"),
        ("barrier", (0.0, 0.0), ""),
        ("traffic_cone", (2.0, 0.0), ""),
    ],
)
def test_attribute_heuristic(name, velocity, attribute):
    pose = RigidTransform.from_nusc([1.0, 2.0, 0.0], [np.cos(1.0), 0.0, 0.0, np.sin(1.0)])
    box = np.array([[5.0, 1.0, 0.5, 2.0, 1.0, 1.0, 0.3, *velocity]])
    (rec,) = detections_to_nusc(box, np.array([0.5]), np.array([CLASSES.index(name)]), "t", pose)
    assert rec["attribute_name"] == attribute


def test_empty_and_bad_inputs():
    pose = RigidTransform.identity()
    assert detections_to_nusc(np.zeros((0, 9)), np.zeros(0), np.zeros(0, dtype=int), "t", pose) == []
    good = np.array([[1.0, 0, 0, 1, 1, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"\(N, 9\)"):
        detections_to_nusc(good[:, :7], np.ones(1), np.zeros(1, dtype=int), "t", pose)
    with pytest.raises(ValueError, match="labels"):
        detections_to_nusc(good, np.ones(1), np.array([10]), "t", pose)
    with pytest.raises(ValueError, match="NaN"):
        detections_to_nusc(good * np.nan, np.ones(1), np.zeros(1, dtype=int), "t", pose)
    with pytest.raises(ValueError, match="> 0"):
        detections_to_nusc(good * [1, 1, 1, 0, 1, 1, 1, 1, 1], np.ones(1), np.zeros(1, dtype=int), "t", pose)
    with pytest.raises(ValueError, match="scores"):
        detections_to_nusc(good, np.ones(2), np.zeros(1, dtype=int), "t", pose)


def test_write_results(tmp_path):
    pose = RigidTransform.identity()
    recs = detections_to_nusc(
        np.array([[1.0, 2, 0.5, 4, 2, 1.5, 0.1, 0, 0]]), np.array([1.0]), np.array([CAR]), "a", pose
    )
    path = write_results(tmp_path / "sub" / "results.json", {"a": recs, "b": []}, meta={"use_map": True})
    data = json.loads(path.read_text())
    assert data["meta"] == {**DEFAULT_META, "use_map": True}
    assert data["results"]["b"] == [] and data["results"]["a"][0]["detection_score"] == 1.0
    assert "1.0" in path.read_text()  # the score is written as a JSON float, as the devkit asserts
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp file left behind
    assert DEFAULT_META == {
        "use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False,
    }
    with pytest.raises(ValueError, match="at most 500"):
        write_results(tmp_path / "big.json", {"a": recs * (MAX_BOXES_PER_SAMPLE + 1)})
    assert not (tmp_path / "big.json").exists()


def test_format_metrics_lines_style():
    classes = ["car", "truck", "bus", "trailer", "construction_vehicle", "pedestrian", "motorcycle",
               "bicycle", "traffic_cone", "barrier"]
    tp = {"trans_err": 0.01, "scale_err": 0.02, "orient_err": 0.03, "vel_err": 0.04, "attr_err": 0.05}
    metrics = {
        "mean_ap": 0.43156, "nd_score": 0.548, "tp_errors": tp,
        "mean_dist_aps": {c: (1.0 if c == "car" else 0.0) for c in classes},
        "label_tp_errors": {c: dict(tp, attr_err=float("nan")) for c in classes},
        "classes_with_gt": ["car"], "map_classes_with_gt": 1.0,
        "num_gt": {c: int(c == "car") * 7 for c in classes},
    }
    lines = format_metrics_lines(metrics)
    assert lines[0] == "mAP: 0.4316"
    assert lines[1:6] == ["mATE: 0.0100", "mASE: 0.0200", "mAOE: 0.0300", "mAVE: 0.0400", "mAAE: 0.0500"]
    assert lines[6] == "NDS: 0.5480"
    assert "mAP (classes with ground truth): 1.000" in lines
    car_row = next(line for line in lines if line.startswith("car "))
    assert car_row.split()[:8] == ["car", "1.000", "0.010", "0.020", "0.030", "0.040", "nan", "7"]
    assert any(line.startswith("truck") and "(no GT)" in line for line in lines)


def test_format_metrics_lines_full_layout_of_a_devkit_only_summary():
    # A summary without our additions (num_gt, classes_with_gt, ...): GT counts print as "?", no class is
    # marked "(no GT)", and the classes-with-GT mAP is nan. Every line, tabs and padding included.
    tp = {"trans_err": 0.1, "scale_err": 0.2, "orient_err": 0.3, "vel_err": 0.4, "attr_err": 0.5}
    metrics = {
        "mean_ap": 0.5, "nd_score": 0.25, "tp_errors": tp,
        "mean_dist_aps": {"car": 0.5, "barrier": 0.0},
        "label_tp_errors": {"car": tp, "barrier": dict(tp, vel_err=float("nan"), attr_err=float("nan"))},
    }
    assert format_metrics_lines(metrics) == [
        "mAP: 0.5000",
        "mATE: 0.1000",
        "mASE: 0.2000",
        "mAOE: 0.3000",
        "mAVE: 0.4000",
        "mAAE: 0.5000",
        "NDS: 0.2500",
        "mAP (classes with ground truth): nan",
        "",
        "Per-class results:",
        "Object Class        \tAP    \tATE   \tASE   \tAOE   \tAVE   \tAAE   \tGT",
        "car                 \t0.500 \t0.100 \t0.200 \t0.300 \t0.400 \t0.500 \t?",
        "barrier             \t0.000 \t0.100 \t0.200 \t0.300 \tnan   \tnan   \t?",
    ]


def test_per_class_table_lists_the_ap_at_each_match_distance():
    tp = {"trans_err": 0.1, "scale_err": 0.2, "orient_err": 0.3, "vel_err": 0.4, "attr_err": 0.5}
    metrics = {
        "mean_ap": 0.5, "nd_score": 0.25, "tp_errors": tp, "mean_dist_aps": {"car": 0.5},
        "label_aps": {"car": {"0.5": 0.125, "1.0": 0.25, "2.0": 0.75, "4.0": 0.875}},
        "label_tp_errors": {"car": tp},
    }
    lines = format_metrics_lines(metrics)
    assert lines[-2].split("\t")[:6] == ["Object Class        ", "AP    ", "AP@0.5", "AP@1.0", "AP@2.0", "AP@4.0"]
    assert lines[-1].split()[:6] == ["car", "0.500", "0.125", "0.250", "0.750", "0.875"]
