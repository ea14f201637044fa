"""Quaternion and rigid-transform conventions: nuScenes [w, x, y, z], a2b maps points of a into b."""

import numpy as np
import pytest

from bevnext.structures.transforms import (
    RigidTransform,
    quat_to_rotmat,
    quat_to_yaw,
    rotmat_to_quat,
    wrap_angle,
    yaw_rotmat,
    yaw_to_quat,
)


def _random_quat(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    return q / np.linalg.norm(q)


def test_quat_to_rotmat_known_rotations():
    # 90 degrees about +z maps +x to +y (right-handed, active rotation).
    r = quat_to_rotmat([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)])
    np.testing.assert_allclose(r @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    # 90 degrees about +x maps +y to +z.
    r = quat_to_rotmat([np.cos(np.pi / 4), np.sin(np.pi / 4), 0, 0])
    np.testing.assert_allclose(r @ [0, 1, 0], [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(quat_to_rotmat([2.0, 0, 0, 0]), np.eye(3))  # normalised


def test_quat_rotmat_round_trip_is_orthonormal():
    rng = np.random.default_rng(0)
    for _ in range(200):
        q = _random_quat(rng)
        r = quat_to_rotmat(q)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0)
        q2 = rotmat_to_quat(r)
        assert q2[0] >= 0
        np.testing.assert_allclose(q2, q if q[0] >= 0 else -q, atol=1e-10)


def test_zero_quaternion_is_rejected():
    with pytest.raises(ValueError, match="no direction"):
        quat_to_rotmat([0, 0, 0, 0])


@pytest.mark.parametrize("yaw", [-3.0, -1.2, 0.0, 0.4, 1.5707963, 3.1])
def test_yaw_helpers_agree(yaw):
    assert quat_to_yaw(yaw_to_quat(yaw)) == pytest.approx(yaw)
    np.testing.assert_allclose(quat_to_rotmat(yaw_to_quat(yaw)), yaw_rotmat(yaw), atol=1e-12)


def test_wrap_angle_range():
    angles = np.linspace(-20, 20, 1001)
    wrapped = wrap_angle(angles)
    assert np.all(wrapped >= -np.pi) and np.all(wrapped < np.pi)
    np.testing.assert_allclose(np.sin(wrapped), np.sin(angles), atol=1e-9)
    np.testing.assert_allclose(np.cos(wrapped), np.cos(angles), atol=1e-9)


def test_rigid_transform_compose_and_inverse():
    rng = np.random.default_rng(1)
    a2b = RigidTransform.from_nusc(rng.normal(size=3), _random_quat(rng))
    b2c = RigidTransform.from_nusc(rng.normal(size=3), _random_quat(rng))
    pts = rng.normal(size=(10, 3))
    # (b2c @ a2b) applies a2b first.
    np.testing.assert_allclose((b2c @ a2b).apply(pts), b2c.apply(a2b.apply(pts)), atol=1e-12)
    np.testing.assert_allclose(a2b.inverse().apply(a2b.apply(pts)), pts, atol=1e-12)
    np.testing.assert_allclose((a2b.inverse() @ a2b).matrix, np.eye(4), atol=1e-12)
    # Homogeneous matrix agrees with apply.
    homo = np.concatenate([pts, np.ones((10, 1))], axis=1) @ a2b.matrix.T
    np.testing.assert_allclose(homo[:, :3], a2b.apply(pts), atol=1e-12)
    np.testing.assert_allclose(RigidTransform.from_matrix(a2b.matrix).matrix, a2b.matrix)


def test_ego_pose_semantics_match_nuscenes():
    # An ego at global (10, 5, 0) facing +y: a point 2 m ahead of it (ego +x) is at global (10, 7, 0).
    ego2global = RigidTransform.from_nusc([10.0, 5.0, 0.0], yaw_to_quat(np.pi / 2))
    np.testing.assert_allclose(ego2global.apply([2.0, 0.0, 0.0]), [10.0, 7.0, 0.0], atol=1e-12)
    # A velocity of 3 m/s along ego +x is 3 m/s along global +y.
    np.testing.assert_allclose(ego2global.apply_rotation([3.0, 0.0, 0.0]), [0.0, 3.0, 0.0], atol=1e-12)


def test_from_nusc_rejects_bad_translation():
    with pytest.raises(ValueError, match="3 values"):
        RigidTransform.from_nusc([1.0, 2.0], [1, 0, 0, 0])
