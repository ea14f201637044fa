"""Model outputs -> a nuScenes detection results file.

This is the one code path from boxes in the key ego frame to the records the official devkit reads;
model evaluation and ``bevnext check-data`` both go through it, so a check of the ground truth through
this path is a check of what the model's evaluation does.

A results file is ``{"meta": {...}, "results": {sample_token: [record, ...]}}`` with one record per box::

    {"sample_token", "translation" [x, y, z] (global, m), "size" [w, l, h] (m),
     "rotation" [w, x, y, z] (global), "velocity" [vx, vy] (global, m/s),
     "detection_name", "detection_score", "attribute_name"}

The box centre we send is the **gravity centre**, which is what nuScenes annotations store. The
reference sends the bottom centre (its head output after a ``z - h/2`` shift). The difference does not
reach mAP or NDS: the devkit matches and measures translation error on the xy centre distance, and its
scale error aligns the centres before comparing sizes. We send the gravity centre anyway because it is
the nuScenes convention, so 3-D uses of the file (visualisation, tracking) are right as well.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bevnext.io import atomic_write_text
from bevnext.structures.boxes import BOX_DIM, CLASSES, attribute_for, ego_boxes_to_global
from bevnext.structures.transforms import RigidTransform

MAX_BOXES_PER_SAMPLE = 500
"""The devkit (``detection_cvpr_2019``) refuses a results file with more boxes than this for a sample."""

DEFAULT_META: dict[str, bool] = {
    "use_camera": True,
    "use_lidar": False,
    "use_radar": False,
    "use_map": False,
    "use_external": False,
}
"""The ``meta`` block of our results files: a camera-only method without map or external data."""


def detections_to_nusc(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    sample_token: str,
    ego2global: RigidTransform,
) -> list[dict[str, Any]]:
    """Turn one sample's detections into nuScenes result records.

    Args:
        boxes: (N, 9) ``[x, y, z, l, w, h, yaw, vx, vy]`` in the key ego frame (the ego pose at the
            sample's CAM_FRONT timestamp); ``z`` is the gravity centre, ``yaw`` about +z from +x,
            velocity in m/s in that frame.
        scores: (N,) detection confidences.
        labels: (N,) class indices into ``CLASSES``.
        sample_token: the nuScenes sample the detections belong to.
        ego2global: the key ego pose (CAM_FRONT ``ego2global`` of the sample), key ego -> global.

    Returns:
        N records in the devkit's format, in input order: global ``translation`` (3,), ``size``
        ``[w, l, h]``, ``rotation`` ``[w, x, y, z]``, global ``velocity`` ``[vx, vy]``, the class name,
        the score and the attribute chosen by ``attribute_for`` from the class and the global planar speed.

    Raises:
        ValueError: on mismatched shapes, a label outside ``CLASSES``, non-finite values or a
            non-positive size (the devkit would reject the file later with a less clear message).
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim == 1 and boxes.size == 0:
        boxes = boxes.reshape(0, BOX_DIM)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if boxes.ndim != 2 or boxes.shape[1] != BOX_DIM:
        raise ValueError(f"boxes must have shape (N, {BOX_DIM}), got {boxes.shape}")
    n = boxes.shape[0]
    if scores.shape[0] != n or labels.shape[0] != n:
        raise ValueError(f"got {n} boxes but {scores.shape[0]} scores and {labels.shape[0]} labels")
    if n == 0:
        return []
    if not (np.all(np.isfinite(boxes)) and np.all(np.isfinite(scores))):
        raise ValueError(f"sample {sample_token}: boxes or scores contain NaN/inf")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(labels == np.round(labels)):
            raise ValueError(f"labels must be integer class indices, got {labels[:5]}")
        labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise ValueError(
            f"labels must lie in [0, {len(CLASSES)}), got range [{labels.min()}, {labels.max()}]"
        )
    if np.any(boxes[:, 3:6] <= 0):
        raise ValueError(f"sample {sample_token}: box sizes (l, w, h) must be > 0")

    glob = ego_boxes_to_global(boxes, ego2global)
    records = []
    for i in range(n):
        name = CLASSES[int(labels[i])]
        velocity = glob["velocity"][i]
        # The devkit compares global planar velocities, so the attribute heuristic reads the same speed.
        speed = float(np.hypot(velocity[0], velocity[1]))
        records.append(
            {
                "sample_token": sample_token,
                "translation": [float(v) for v in glob["translation"][i]],
                "size": [float(v) for v in glob["size"][i]],
                "rotation": [float(v) for v in glob["rotation"][i]],
                "velocity": [float(v) for v in velocity],
                "detection_name": name,
                # float() matters: the devkit asserts the JSON value is a float, and an int score of 1
                # would serialise as "1".
                "detection_score": float(scores[i]),
                "attribute_name": attribute_for(name, speed),
            }
        )
    return records


def write_results(
    path: str | os.PathLike[str],
    results: Mapping[str, Sequence[Mapping[str, Any]]],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write a nuScenes detection results file atomically.

    Args:
        path: destination ``.json`` file (parent folders are created).
        results: sample token -> that sample's records from ``detections_to_nusc``; samples without
            detections should map to ``[]`` (the devkit wants every sample of the split present).
        meta: entries that override ``DEFAULT_META`` (camera only, no lidar/radar/map/external data).

    Returns:
        The written path.

    Raises:
        ValueError: a sample has more than ``MAX_BOXES_PER_SAMPLE`` records (keep the top-scoring ones
            first), or a value is not JSON (NaN/inf).
    """
    for token, records in results.items():
        if len(records) > MAX_BOXES_PER_SAMPLE:
            raise ValueError(
                f"sample {token} has {len(records)} boxes; the nuScenes evaluation accepts at most "
                f"{MAX_BOXES_PER_SAMPLE} per sample (keep the highest-scoring ones)"
            )
    full_meta = dict(DEFAULT_META)
    if meta:
        full_meta.update(meta)
    payload = {"meta": full_meta, "results": {token: list(records) for token, records in results.items()}}
    dest = Path(path)
    # allow_nan=False: the devkit would read NaN back without complaint and produce NaN metrics.
    atomic_write_text(dest, json.dumps(payload, allow_nan=False))
    return dest


__all__ = ["DEFAULT_META", "MAX_BOXES_PER_SAMPLE", "detections_to_nusc", "write_results"]
