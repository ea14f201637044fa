"""Rigid transforms and quaternions, with nuScenes conventions defined once.

Conventions:
* Quaternions are stored as ``[w, x, y, z]`` (nuScenes order) and represent active rotations.
* A ``RigidTransform`` named ``a2b`` maps points expressed in frame ``a`` into frame ``b``:
  ``p_b = R @ p_a + t``. nuScenes' ``calibrated_sensor`` records are ``sensor2ego`` and its
  ``ego_pose`` records are ``ego2global``.
* Frames: ``global`` (map, z up), ``ego`` (x forward, y left, z up; one per timestamp), ``lidar``
  (``LIDAR_TOP`` as calibrated) and camera frames, which are optical: x right, y down, z forward.

Everything here is float64 NumPy: data preparation and evaluation need exact round trips, and the
model side converts to tensors at its own boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def quat_to_rotmat(quat_wxyz: ArrayLike) -> np.ndarray:
    """Rotation matrix of a (not necessarily unit) quaternion.

    Args:
        quat_wxyz: (4,) quaternion ``[w, x, y, z]``.

    Returns:
        (3, 3) rotation matrix.
    """
    w, x, y, z = np.asarray(quat_wxyz, dtype=np.float64)
    norm = np.sqrt(w * w + x * x + y * y + z * z)
    if not np.isfinite(norm) or norm < 1e-12:
        raise ValueError(f"quaternion {list(quat_wxyz)} has no direction (norm {norm})")
    w, x, y, z = w / norm, x / norm, y / norm, z / norm
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def rotmat_to_quat(rotmat: np.ndarray) -> np.ndarray:
    """Quaternion ``[w, x, y, z]`` (with ``w >= 0``) of a rotation matrix.

    Uses the numerically stable branch on the largest diagonal term.

    Args:
        rotmat: (3, 3) rotation matrix.

    Returns:
        (4,) unit quaternion.
    """
    m = np.asarray(rotmat, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * np.sqrt(1.0 + trace)
        q = np.array([0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s])
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = np.array([(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s])
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = np.array([(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s])
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = np.array([(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s])
    q /= np.linalg.norm(q)
    return -q if q[0] < 0 else q


def yaw_to_quat(yaw: float) -> np.ndarray:
    """Quaternion ``[w, x, y, z]`` of a rotation by ``yaw`` radians about +z."""
    return np.array([np.cos(yaw / 2.0), 0.0, 0.0, np.sin(yaw / 2.0)])


def rotmat_to_yaw(rotmat: np.ndarray) -> float:
    """Heading of a rotation: angle of the rotated +x axis in the xy plane, from +x towards +y."""
    m = np.asarray(rotmat, dtype=np.float64)
    return float(np.arctan2(m[1, 0], m[0, 0]))


def quat_to_yaw(quat_wxyz: ArrayLike) -> float:
    """Heading (radians, about +z from +x) of the rotation ``quat_wxyz``."""
    return rotmat_to_yaw(quat_to_rotmat(quat_wxyz))


def yaw_rotmat(yaw: float) -> np.ndarray:
    """(3, 3) rotation by ``yaw`` radians about +z."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def wrap_angle(angle: np.ndarray | float) -> np.ndarray | float:
    """Wrap angles into ``[-pi, pi)``."""
    return (np.asarray(angle) + np.pi) % (2.0 * np.pi) - np.pi


@dataclass(frozen=True)
class RigidTransform:
    """A rigid transform ``a2b``: ``p_b = rotation @ p_a + translation``.

    Attributes:
        rotation: (3, 3) rotation matrix.
        translation: (3,) translation in metres, expressed in frame ``b``.
    """

    rotation: np.ndarray
    translation: np.ndarray

    @staticmethod
    def identity() -> RigidTransform:
        return RigidTransform(np.eye(3), np.zeros(3))

    @staticmethod
    def from_nusc(translation: ArrayLike, rotation_wxyz: ArrayLike) -> RigidTransform:
        """From a nuScenes record's ``translation`` (3,) and ``rotation`` ``[w, x, y, z]``."""
        t = np.asarray(translation, dtype=np.float64)
        if t.shape != (3,):
            raise ValueError(f"translation must have 3 values, got {list(translation)}")
        return RigidTransform(quat_to_rotmat(rotation_wxyz), t)

    @staticmethod
    def from_record(record: Mapping[str, Any]) -> RigidTransform:
        """From a pose record ``{"translation": [x, y, z], "rotation": [w, x, y, z]}`` (nuScenes, info files)."""
        return RigidTransform.from_nusc(record["translation"], record["rotation"])

    @staticmethod
    def from_matrix(matrix: np.ndarray) -> RigidTransform:
        """From a (4, 4) homogeneous matrix."""
        m = np.asarray(matrix, dtype=np.float64)
        return RigidTransform(m[:3, :3].copy(), m[:3, 3].copy())

    @property
    def matrix(self) -> np.ndarray:
        """(4, 4) homogeneous matrix."""
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.translation
        return m

    @property
    def quat(self) -> np.ndarray:
        """Rotation as ``[w, x, y, z]``."""
        return rotmat_to_quat(self.rotation)

    def inverse(self) -> RigidTransform:
        """``b2a`` from ``a2b``."""
        rot_t = self.rotation.T
        return RigidTransform(rot_t, -rot_t @ self.translation)

    def __matmul__(self, other: RigidTransform) -> RigidTransform:
        """Composition: ``(b2c @ a2b)`` is ``a2c`` (apply ``other`` first)."""
        return RigidTransform(self.rotation @ other.rotation, self.rotation @ other.translation + self.translation)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Transform points.

        Args:
            points: (..., 3) points in frame ``a``.

        Returns:
            (..., 3) points in frame ``b``.
        """
        return np.asarray(points, dtype=np.float64) @ self.rotation.T + self.translation

    def apply_rotation(self, vectors: np.ndarray) -> np.ndarray:
        """Rotate free vectors (velocities, directions): (..., 3) -> (..., 3)."""
        return np.asarray(vectors, dtype=np.float64) @ self.rotation.T
