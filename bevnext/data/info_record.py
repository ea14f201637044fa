"""The schema of one info record (a key sample of an info file), shared by everything that reads one.

Written by ``bevnext create-data`` (``bevnext.data.infos``), read by the dataset, the samplers, the
evaluation and the pictures. Poses are nuScenes ``translation`` (metres) + ``rotation`` quaternion
``[w, x, y, z]``; ground truth is in the key frame, the ego frame at the key sample's CAM_FRONT timestamp.
"""

from __future__ import annotations

from typing import TypedDict

from bevnext.structures.sensors import KEY_CAMERA
from bevnext.structures.transforms import RigidTransform

__all__ = ["CameraRecord", "InfoRecord", "Pose", "SensorRecord", "key_ego2global", "sensor2global"]


class Pose(TypedDict):
    """A rigid transform as stored: ``translation`` (3,) metres, ``rotation`` ``[w, x, y, z]``."""

    translation: list[float]
    rotation: list[float]


class SensorRecord(TypedDict):
    """One sensor's key-frame file of a sample.

    ``path`` is relative to the data root; ``sensor2ego`` is the calibration, ``ego2global`` the ego pose at
    this sensor's ``timestamp`` (µs).
    """

    path: str
    sample_data_token: str
    timestamp: int
    sensor2ego: Pose
    ego2global: Pose


class CameraRecord(SensorRecord):
    """A camera's record: the sensor fields plus the image size and the 3x3 ``intrinsic`` of the original image."""

    width: int
    height: int
    intrinsic: list[list[float]]


class InfoRecord(TypedDict):
    """One key sample.

    ``timestamp`` is the LIDAR_TOP key sample_data's (µs); ``prev_tokens`` lists the earlier key samples of
    the scene, nearest first; ``cams`` is keyed by channel (``bevnext.structures.sensors.CAMERAS``).
    Ground truth, in the key frame: ``gt_boxes`` (M, 9) ``[x, y, z, l, w, h, yaw, vx, vy]`` (z the gravity
    centre), ``gt_labels`` (M,) indices into ``CLASSES``, the devkit's ``gt_num_lidar_pts`` /
    ``gt_num_radar_pts`` and ``gt_instance_tokens``, and ``all_labels`` (the labels of every annotation
    of the 10 classes, with or without sensor points, which class-balanced sampling counts).
    """

    token: str
    scene_token: str
    scene_name: str
    timestamp: int
    prev_tokens: list[str]
    lidar: SensorRecord
    cams: dict[str, CameraRecord]
    gt_boxes: list[list[float]]
    gt_labels: list[int]
    gt_num_lidar_pts: list[int]
    gt_num_radar_pts: list[int]
    gt_instance_tokens: list[str]
    all_labels: list[int]


def sensor2global(record: SensorRecord) -> RigidTransform:
    """Sensor -> global at the sensor's timestamp: ``ego2global @ sensor2ego``."""
    return RigidTransform.from_record(record["ego2global"]) @ RigidTransform.from_record(record["sensor2ego"])


def key_ego2global(info: InfoRecord) -> RigidTransform:
    """The ego pose that defines an info's key frame (the frame of ``gt_boxes``): the ego pose at the sample's
    CAM_FRONT timestamp, as key-ego -> global."""
    return RigidTransform.from_record(info["cams"][KEY_CAMERA]["ego2global"])
