"""The synthetic car's sensor rig: six cameras and a roof LiDAR, laid out like the nuScenes car.

Frames (see ``bevnext.structures.transforms``): the ego frame has x forward, y left, z up with its
origin on the ground under the rear axle; camera frames are optical (x right, y down, z forward);
the ``LIDAR_TOP`` frame is level and turned by -90 degrees about z, as on the real car, so its x
axis points to the ego's right and its y axis forwards.

Every log (one per synthetic scene) gets its own calibration: the nominal mounts below plus small
seeded perturbations (a centimetre, a few tenths of a degree, a fraction of a percent of focal
length), like the two real nuScenes cars whose calibrations differ from log to log. Code that
assumes one fixed calibration therefore fails on synthetic data as it would on real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevnext.structures.sensors import CAMERAS
from bevnext.structures.transforms import RigidTransform, quat_to_rotmat, rotmat_to_quat, yaw_rotmat

CAMERA_CHANNELS = CAMERAS

LIDAR_CHANNEL = "LIDAR_TOP"
"""The one LiDAR channel."""

REFERENCE_SIZE = (1600, 900)
"""Image size (width, height) the nominal intrinsics refer to; other sizes scale them."""

OPTICAL_TO_FORWARD = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
"""(3, 3) rotation from the optical frame to a level frame looking along its own +x.

Its columns are the optical axes in that frame: x right = -y, y down = -z, z forward = +x.
"""


@dataclass(frozen=True)
class _Mount:
    """Nominal mount of one camera (at the reference size 1600 x 900)."""

    channel: str
    translation: tuple[float, float, float]  # ego frame, metres
    yaw_deg: float  # about ego +z, positive = towards the left
    pitch_deg: float  # positive = looking down
    focal: float  # fx = fy, pixels
    principal: tuple[float, float]  # (cx, cy), pixels
    time_offset_us: int  # capture time relative to the LiDAR key time


# Roughly the real rig: front cameras ~1.5 m up near the windscreen, side cameras at the A and C
# pillars, a wider camera at the back. The time offsets mimic cameras that fire when the spinning
# LiDAR sweeps past their field of view.
_CAMERA_MOUNTS: tuple[_Mount, ...] = (
    _Mount("CAM_FRONT", (1.70, 0.015, 1.51), 0.0, 0.3, 1264.0, (812.0, 478.0), -35_400),
    _Mount("CAM_FRONT_RIGHT", (1.55, -0.493, 1.50), -55.0, 0.2, 1259.0, (806.0, 489.0), -27_600),
    _Mount("CAM_FRONT_LEFT", (1.52, 0.495, 1.51), 55.0, 0.1, 1271.0, (823.0, 470.0), -42_700),
    _Mount("CAM_BACK", (0.03, 0.003, 1.58), 180.0, 0.0, 808.0, (826.0, 476.0), -10_300),
    _Mount("CAM_BACK_LEFT", (1.04, 0.485, 1.59), 110.0, 0.2, 1255.0, (815.0, 455.0), -3_100),
    _Mount("CAM_BACK_RIGHT", (1.01, -0.480, 1.56), -110.0, 0.3, 1258.0, (805.0, 497.0), 29_800),
)

_LIDAR_TRANSLATION = (0.943, 0.0, 1.840)
_LIDAR_YAW_DEG = -90.0


@dataclass(frozen=True)
class CameraCalib:
    """One camera of one log.

    Attributes:
        channel: e.g. ``"CAM_FRONT"``.
        sensor2ego: camera (optical) -> ego transform; its rotation is rebuilt from the stored
            quaternion so that what we render with equals what the devkit reads back.
        intrinsic: (3, 3) pinhole matrix for ``width`` x ``height`` images.
        width: image width in pixels.
        height: image height in pixels.
        time_offset_us: nominal capture time relative to the LiDAR key time, microseconds.
        rotation_wxyz: (4,) the stored quaternion of ``sensor2ego``.
    """

    channel: str
    sensor2ego: RigidTransform
    intrinsic: np.ndarray
    width: int
    height: int
    time_offset_us: int
    rotation_wxyz: np.ndarray


@dataclass(frozen=True)
class LidarCalib:
    """The roof LiDAR of one log: level, yawed about z only (which the ray caster relies on).

    Attributes:
        sensor2ego: LiDAR -> ego transform.
        yaw: rotation of the sensor about ego +z, radians (about -pi/2).
        rotation_wxyz: (4,) the stored quaternion of ``sensor2ego``.
    """

    sensor2ego: RigidTransform
    yaw: float
    rotation_wxyz: np.ndarray


@dataclass(frozen=True)
class Rig:
    """All sensors of one log."""

    cameras: tuple[CameraCalib, ...]
    lidar: LidarCalib


def _rot_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _as_stored(rotation: np.ndarray, translation: np.ndarray) -> tuple[RigidTransform, np.ndarray]:
    """The transform as it reads back from a nuScenes record (quaternion round trip), and the quaternion."""
    quat = rotmat_to_quat(rotation)
    return RigidTransform(quat_to_rotmat(quat), np.asarray(translation, dtype=np.float64)), quat


def camera_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Camera (optical) -> ego rotation of a camera with the given mount angles.

    Args:
        yaw: heading of the optical axis about ego +z, radians (positive = left).
        pitch: downward tilt of the optical axis, radians.
        roll: rotation about the optical axis, radians.

    Returns:
        (3, 3) rotation matrix.
    """
    return yaw_rotmat(yaw) @ _rot_y(pitch) @ _rot_x(roll) @ OPTICAL_TO_FORWARD


def make_rig(rng: np.random.Generator, image_size: tuple[int, int]) -> Rig:
    """A seeded calibration of the whole rig for one log.

    Args:
        rng: source of the per-log perturbations.
        image_size: (width, height) of the camera images; intrinsics scale from 1600 x 900.

    Returns:
        The rig: six cameras in ``CAMERA_CHANNELS`` order and the LiDAR.
    """
    width, height = image_size
    sx, sy = width / REFERENCE_SIZE[0], height / REFERENCE_SIZE[1]
    cameras = []
    for mount in _CAMERA_MOUNTS:
        yaw = np.deg2rad(mount.yaw_deg + rng.uniform(-0.3, 0.3))
        pitch = np.deg2rad(mount.pitch_deg + rng.uniform(-0.4, 0.4))
        roll = np.deg2rad(rng.uniform(-0.2, 0.2))
        translation = np.asarray(mount.translation) + rng.uniform(-0.01, 0.01, size=3)
        focal = mount.focal * (1.0 + rng.uniform(-0.004, 0.004))
        cx = mount.principal[0] + rng.uniform(-3.0, 3.0)
        cy = mount.principal[1] + rng.uniform(-3.0, 3.0)
        intrinsic = np.array([[focal * sx, 0.0, cx * sx], [0.0, focal * sy, cy * sy], [0.0, 0.0, 1.0]])
        sensor2ego, quat = _as_stored(camera_rotation(yaw, pitch, roll), translation)
        cameras.append(
            CameraCalib(
                channel=mount.channel,
                sensor2ego=sensor2ego,
                intrinsic=intrinsic,
                width=width,
                height=height,
                time_offset_us=mount.time_offset_us,
                rotation_wxyz=quat,
            )
        )
    lidar_yaw = float(np.deg2rad(_LIDAR_YAW_DEG + rng.uniform(-0.2, 0.2)))
    lidar_translation = np.asarray(_LIDAR_TRANSLATION) + np.array([rng.uniform(-0.01, 0.01), 0.0, 0.0])
    # Keep the LiDAR exactly level: its quaternion is built from the yaw alone, so the stored record
    # has zero roll/pitch and the caster's yaw-only geometry is exact.
    lidar_quat = np.array([np.cos(lidar_yaw / 2), 0.0, 0.0, np.sin(lidar_yaw / 2)])
    lidar = LidarCalib(
        sensor2ego=RigidTransform(quat_to_rotmat(lidar_quat), lidar_translation),
        yaw=lidar_yaw,
        rotation_wxyz=lidar_quat,
    )
    return Rig(cameras=tuple(cameras), lidar=lidar)


__all__ = [
    "CAMERA_CHANNELS",
    "LIDAR_CHANNEL",
    "CameraCalib",
    "LidarCalib",
    "Rig",
    "camera_rotation",
    "make_rig",
]
