"""Box layout, detection classes and the one conversion between nuScenes boxes and our boxes.

Our box layout (the ``structures`` box, used by info files, the model and evaluation) is a 9-vector
``[x, y, z, l, w, h, yaw, vx, vy]`` in an ego frame (x forward, y left, z up):
``(x, y, z)`` is the gravity centre in metres, ``(l, w, h)`` the size along the box's own x (length),
y (width) and z (height) axes, ``yaw`` the heading about +z measured from +x towards +y (radians),
and ``(vx, vy)`` the velocity in m/s expressed in the same frame.

nuScenes stores boxes in the global frame as ``translation`` (centre), ``size`` **[w, l, h]** and
``rotation`` as a quaternion ``[w, x, y, z]``; its velocities are global ``(vx, vy)``.
"""

from __future__ import annotations

import numpy as np

from bevnext.structures.transforms import RigidTransform, quat_to_rotmat, rotmat_to_yaw, yaw_to_quat

BOX_DIM = 9
"""Length of one box vector."""
X, Y, Z, L, W, H, YAW, VX, VY = range(BOX_DIM)
"""Indices into a box vector."""

CLASSES: tuple[str, ...] = (
    "car",
    "truck",
    "construction_vehicle",
    "bus",
    "trailer",
    "barrier",
    "motorcycle",
    "bicycle",
    "pedestrian",
    "traffic_cone",
)
"""The 10 nuScenes detection classes in the reference's order; class index = position here."""

CATEGORY_TO_CLASS: dict[str, str] = {
    "movable_object.barrier": "barrier",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
}
"""nuScenes annotation categories that map into a detection class; all others are ignored."""

MOVING_SPEED = 0.2
"""Speed (m/s) above which a box counts as moving for the attribute heuristic."""

_DEFAULT_ATTRIBUTE: dict[str, str] = {
    "car": "vehicle.parked",
    "truck": "vehicle.parked",
    "construction_vehicle": "vehicle.parked",
    "bus": "vehicle.moving",
    "trailer": "vehicle.parked",
    "barrier": "",
    "motorcycle": "cycle.without_rider",
    "bicycle": "cycle.without_rider",
    "pedestrian": "pedestrian.moving",
    "traffic_cone": "",
}
_VEHICLES = frozenset({"car", "truck", "construction_vehicle", "bus", "trailer"})
_CYCLES = frozenset({"motorcycle", "bicycle"})


def attribute_for(class_name: str, speed: float) -> str:
    """The attribute the reference assigns to a detection from its class and speed.

    Moving (speed > 0.2 m/s): vehicles ``vehicle.moving``, cycles ``cycle.with_rider``. Static:
    pedestrians ``pedestrian.standing``, buses ``vehicle.stopped``. Otherwise a class default
    (``''`` for barriers and traffic cones, which have no attribute).

    Args:
        class_name: one of ``CLASSES``.
        speed: planar speed in m/s.
    """
    if class_name not in _DEFAULT_ATTRIBUTE:
        raise ValueError(f"unknown detection class {class_name!r}; expected one of {CLASSES}")
    if speed > MOVING_SPEED:
        if class_name in _VEHICLES:
            return "vehicle.moving"
        if class_name in _CYCLES:
            return "cycle.with_rider"
    else:
        if class_name == "pedestrian":
            return "pedestrian.standing"
        if class_name == "bus":
            return "vehicle.stopped"
    return _DEFAULT_ATTRIBUTE[class_name]


def global_boxes_to_ego(
    translation: np.ndarray,
    size_wlh: np.ndarray,
    rotation_wxyz: np.ndarray,
    velocity_xy: np.ndarray,
    ego2global: RigidTransform,
) -> np.ndarray:
    """nuScenes global boxes -> our boxes in the ego frame of ``ego2global``.

    Args:
        translation: (N, 3) global box centres.
        size_wlh: (N, 3) sizes as nuScenes stores them, ``[w, l, h]``.
        rotation_wxyz: (N, 4) global box orientations.
        velocity_xy: (N, 2) global planar velocities in m/s (NaN allowed; passed through).
        ego2global: the ego pose that defines the target frame.

    Returns:
        (N, 9) boxes ``[x, y, z, l, w, h, yaw, vx, vy]`` in that ego frame.
    """
    translation = np.asarray(translation, dtype=np.float64).reshape(-1, 3)
    size_wlh = np.asarray(size_wlh, dtype=np.float64).reshape(-1, 3)
    rotation_wxyz = np.asarray(rotation_wxyz, dtype=np.float64).reshape(-1, 4)
    velocity_xy = np.asarray(velocity_xy, dtype=np.float64).reshape(-1, 2)
    n = translation.shape[0]
    global2ego = ego2global.inverse()
    out = np.zeros((n, BOX_DIM), dtype=np.float64)
    out[:, X : Z + 1] = global2ego.apply(translation)
    out[:, L] = size_wlh[:, 1]
    out[:, W] = size_wlh[:, 0]
    out[:, H] = size_wlh[:, 2]
    for i in range(n):
        out[i, YAW] = rotmat_to_yaw(global2ego.rotation @ quat_to_rotmat(rotation_wxyz[i]))
    vel3 = np.concatenate([velocity_xy, np.zeros((n, 1))], axis=1)
    out[:, VX : VY + 1] = global2ego.apply_rotation(vel3)[:, :2]
    return out


def ego_boxes_to_global(boxes: np.ndarray, ego2global: RigidTransform) -> dict[str, np.ndarray]:
    """Our ego-frame boxes -> nuScenes global box fields (the inverse of ``global_boxes_to_ego``).

    The ego frame is taken as gravity-aligned: a box's orientation is its yaw about the ego z axis,
    composed with the ego pose's full rotation.

    Args:
        boxes: (N, 9) ``[x, y, z, l, w, h, yaw, vx, vy]`` in the ego frame of ``ego2global``;
            (N, 7) is accepted and means zero velocity.

    Returns:
        dict with ``translation`` (N, 3), ``size`` (N, 3) as ``[w, l, h]``, ``rotation`` (N, 4)
        ``[w, x, y, z]`` and ``velocity`` (N, 2), all in the global frame.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] not in (7, BOX_DIM):
        raise ValueError(f"boxes must have shape (N, 9) or (N, 7), got {boxes.shape}")
    n = boxes.shape[0]
    vel = boxes[:, VX : VY + 1] if boxes.shape[1] == BOX_DIM else np.zeros((n, 2))
    rotation = np.zeros((n, 4))
    for i in range(n):
        box_rot = RigidTransform(quat_to_rotmat(yaw_to_quat(boxes[i, YAW])), np.zeros(3))
        rotation[i] = (ego2global @ box_rot).quat
    vel3 = np.concatenate([vel, np.zeros((n, 1))], axis=1)
    return {
        "translation": ego2global.apply(boxes[:, X : Z + 1]),
        "size": boxes[:, [W, L, H]].copy(),
        "rotation": rotation,
        "velocity": ego2global.apply_rotation(vel3)[:, :2],
    }


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """The 8 corners of each box.

    Corner order: bottom face (z - h/2) then top face, each counter-clockwise seen from above,
    starting at the front-left corner: (+l/2, +w/2), (-l/2, +w/2), (-l/2, -w/2), (+l/2, -w/2).

    Args:
        boxes: (N, >=7) boxes ``[x, y, z, l, w, h, yaw, ...]``.

    Returns:
        (N, 8, 3) corners in the boxes' frame.
    """
    boxes = np.atleast_2d(np.asarray(boxes, dtype=np.float64))
    signs = np.array(
        [[1, 1, -1], [-1, 1, -1], [-1, -1, -1], [1, -1, -1], [1, 1, 1], [-1, 1, 1], [-1, -1, 1], [1, -1, 1]],
        dtype=np.float64,
    )
    local = signs[None] * 0.5 * boxes[:, None, L : H + 1]  # (N, 8, 3)
    cos, sin = np.cos(boxes[:, YAW]), np.sin(boxes[:, YAW])
    x = local[..., 0] * cos[:, None] - local[..., 1] * sin[:, None]
    y = local[..., 0] * sin[:, None] + local[..., 1] * cos[:, None]
    return np.stack([x, y, local[..., 2]], axis=-1) + boxes[:, None, X : Z + 1]


def speed(boxes: np.ndarray) -> np.ndarray:
    """Planar speed (N,) of (N, 9) boxes."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return np.hypot(boxes[:, VX], boxes[:, VY])


__all__ = [
    "BOX_DIM",
    "CATEGORY_TO_CLASS",
    "CLASSES",
    "MOVING_SPEED",
    "attribute_for",
    "box_corners",
    "ego_boxes_to_global",
    "global_boxes_to_ego",
    "speed",
]
