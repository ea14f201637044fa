"""Frames, box layout and transforms: the project's coordinate conventions, defined once."""

from bevnext.structures.batch import Batch
from bevnext.structures.boxes import (
    BOX_DIM,
    CATEGORY_TO_CLASS,
    CLASSES,
    attribute_for,
    box_corners,
    ego_boxes_to_global,
    global_boxes_to_ego,
)
from bevnext.structures.cameras import CameraGeometry, inverse_3x3
from bevnext.structures.detections import Detections
from bevnext.structures.transforms import (
    RigidTransform,
    quat_to_rotmat,
    quat_to_yaw,
    rotmat_to_quat,
    rotmat_to_yaw,
    wrap_angle,
    yaw_rotmat,
    yaw_to_quat,
)

__all__ = [
    "BOX_DIM",
    "Batch",
    "CameraGeometry",
    "CATEGORY_TO_CLASS",
    "CLASSES",
    "Detections",
    "RigidTransform",
    "attribute_for",
    "box_corners",
    "ego_boxes_to_global",
    "global_boxes_to_ego",
    "inverse_3x3",
    "quat_to_rotmat",
    "quat_to_yaw",
    "rotmat_to_quat",
    "rotmat_to_yaw",
    "wrap_angle",
    "yaw_rotmat",
    "yaw_to_quat",
]
