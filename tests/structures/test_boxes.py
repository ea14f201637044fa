"""Box layout, nuScenes <-> ego conversion and the attribute heuristic."""

import numpy as np
import pytest

from bevnext.structures.boxes import (
    CLASSES,
    attribute_for,
    box_corners,
    ego_boxes_to_global,
    global_boxes_to_ego,
)
from bevnext.structures.transforms import RigidTransform, yaw_to_quat


def test_class_order_is_the_reference_order():
    assert CLASSES == (
        "car", "truck", "construction_vehicle", "bus", "trailer",
        "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone",
    )


def test_global_to_ego_by_hand():
    # Ego at global (100, 200, 1) with heading 30 deg; a car at global (103, 205, 2) heading 120 deg,
    # size [w, l, h] = [2, 4.5, 1.6], moving 5 m/s along global +y.
    ego_yaw, box_yaw = np.deg2rad(30.0), np.deg2rad(120.0)
    ego2global = RigidTransform.from_nusc([100.0, 200.0, 1.0], yaw_to_quat(ego_yaw))
    box = global_boxes_to_ego(
        [[103.0, 205.0, 2.0]], [[2.0, 4.5, 1.6]], [yaw_to_quat(box_yaw)], [[0.0, 5.0]], ego2global
    )
    assert box.shape == (1, 9)
    c, s = np.cos(-ego_yaw), np.sin(-ego_yaw)
    dx, dy = 3.0, 5.0
    expected_xy = [c * dx - s * dy, s * dx + c * dy]
    np.testing.assert_allclose(box[0, :2], expected_xy, atol=1e-12)
    assert box[0, 2] == pytest.approx(1.0)
    np.testing.assert_allclose(box[0, 3:6], [4.5, 2.0, 1.6])  # l, w, h
    assert box[0, 6] == pytest.approx(np.deg2rad(90.0))
    np.testing.assert_allclose(box[0, 7:9], [-s * 5.0, c * 5.0], atol=1e-12)


def test_ego_global_round_trip_with_tilted_pose():
    rng = np.random.default_rng(3)
    q = rng.normal(size=4) * [1, 0.05, 0.05, 1]  # mostly yaw, a little pitch/roll like real poses
    ego2global = RigidTransform.from_nusc(rng.normal(size=3) * 100, q)
    boxes = np.concatenate(
        [rng.normal(size=(20, 3)) * 20, rng.uniform(0.3, 10, size=(20, 3)), rng.uniform(-np.pi, np.pi, (20, 1)),
         rng.normal(size=(20, 2)) * 5],
        axis=1,
    )
    g = ego_boxes_to_global(boxes, ego2global)
    back = global_boxes_to_ego(g["translation"], g["size"], g["rotation"], g["velocity"], ego2global)
    np.testing.assert_allclose(back[:, :6], boxes[:, :6], atol=1e-9)
    np.testing.assert_allclose(np.cos(back[:, 6] - boxes[:, 6]), 1.0, atol=1e-9)
    # The planar velocity survives only up to the tilt of the pose; it is close for small tilts.
    np.testing.assert_allclose(back[:, 7:], boxes[:, 7:], atol=0.05 * 5 * 3)


def test_ego_boxes_to_global_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(N, 9\)"):
        ego_boxes_to_global(np.zeros((3, 5)), RigidTransform.identity())


def test_box_corners_layout():
    corners = box_corners(np.array([[1.0, 2.0, 3.0, 4.0, 2.0, 1.0, np.pi / 2, 0, 0]]))
    assert corners.shape == (1, 8, 3)
    # yaw 90 deg: the box's +x (length) points along +y; front-left corner = centre + (−w/2, +l/2).
    np.testing.assert_allclose(corners[0, 0], [1.0 - 1.0, 2.0 + 2.0, 2.5], atol=1e-12)
    np.testing.assert_allclose(corners[0].mean(axis=0), [1.0, 2.0, 3.0], atol=1e-12)
    assert np.ptp(corners[0, :, 2]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("name", "speed", "expected"),
    [
        ("car", 5.0, "vehicle.moving"),
        ("car", 0.0, "vehicle.parked"),
        ("truck", 0.1, "vehicle.parked"),
        ("bus", 0.0, "vehicle.stopped"),
        ("bus", 3.0, "vehicle.moving"),
        ("bicycle", 2.0, "cycle.with_rider"),
        ("motorcycle", 0.0, "cycle.without_rider"),
        ("pedestrian", 1.2, "pedestrian.moving"),
        ("pedestrian", 0.0, "pedestrian.standing"),
        ("barrier", 0.0, ""),
        ("traffic_cone", 1.0, ""),
    ],
)
def test_attribute_heuristic(name, speed, expected):
    assert attribute_for(name, speed) == expected


def test_attribute_unknown_class():
    with pytest.raises(ValueError, match="unknown detection class"):
        attribute_for("animal", 0.0)
