"""``bevnext check-data``: push the ground truth through our whole output path into the official eval.

The info files' ground truth (boxes in the key ego frame, as the model is trained on them) is treated
as a set of detections with score 1, formatted by exactly the code that formats model outputs
(``detections_to_nusc``), and scored by the devkit against the dataset's own annotations. Any error in
frames, box layout, size order, yaw or quaternion conventions, velocity frames or the attribute
heuristic shows up as a lost AP point or a non-zero TP error, and the drawn sample shows it by eye.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from bevnext.data.info_record import InfoRecord, key_ego2global
from bevnext.data.infos import info_path, load_infos, splits_for_version
from bevnext.errors import DataError
from bevnext.eval.formatting import detections_to_nusc, write_results
from bevnext.eval.nusc_eval import evaluate_nusc, format_metrics_lines
from bevnext.eval.visualize import draw_sample
from bevnext.structures.boxes import BOX_DIM


def default_split(data_root: str | os.PathLike[str], version: str) -> str:
    """The split ``check-data`` uses when none is given: the version's validation split.

    ``val`` for v1.0-trainval, ``mini_val`` for v1.0-mini, ``synth_val`` for our synthetic data, and
    otherwise the last split named in ``splits.json`` (custom splits list validation last by habit).

    Raises:
        DataError: the version has no annotated split (v1.0-test) or no splits at all.
    """
    if version.endswith("test"):
        raise DataError(f"{version} has no annotations, so check-data has nothing to check; "
                        "use v1.0-trainval or v1.0-mini")
    splits = list(splits_for_version(data_root, version))
    if not splits:
        raise DataError(f"no splits known for nuScenes {version} at {data_root}")
    for name in ("val", "mini_val", "synth_val"):
        if name in splits:
            return name
    return splits[-1]


def _gt_as_detections(info: InfoRecord) -> tuple[np.ndarray, np.ndarray]:
    """(N, 9) key-ego boxes and (N,) labels of the info's ground truth that the devkit will evaluate."""
    boxes = np.asarray(info["gt_boxes"], dtype=np.float64).reshape(-1, BOX_DIM)
    labels = np.asarray(info["gt_labels"], dtype=np.int64).reshape(-1)
    points = np.asarray(info.get("gt_num_lidar_pts", []), dtype=np.int64).reshape(-1)
    radar = np.asarray(info.get("gt_num_radar_pts", []), dtype=np.int64).reshape(-1)
    if points.shape[0] == boxes.shape[0] and radar.shape[0] == boxes.shape[0]:
        # The devkit drops GT boxes with no LiDAR or radar point; a "detection" of one would count as a
        # false positive, so drop them here as well (info files normally leave them out already).
        keep = (points + radar) > 0
        boxes, labels = boxes[keep], labels[keep]
    return boxes, labels


def check_data(
    data_root: str | os.PathLike[str],
    version: str,
    split: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Evaluate the ground truth of one split as if it were a model's output, and draw one sample.

    Steps: load ``bevnext_infos_<split>.json``; convert each sample's ``gt_boxes`` / ``gt_labels`` with
    score 1.0 through ``detections_to_nusc`` into ``OUT_DIR/results_nusc.json``; run ``evaluate_nusc``
    and print ``format_metrics_lines`` (``mAP: ...``, ``NDS: ...``, ``mAP (classes with ground truth):
    ...``, per-class table) to stdout; draw the sample with the most boxes to
    ``OUT_DIR/check_data_<token>.png`` and print its path.

    What to expect:
        * Synthetic data (``v1.0-synth``): AP 1.000 for every class present, so ``mAP (classes with
          ground truth): 1.000``, and all TP errors of those classes ~0 (the generator's attributes follow
          the same speed rule as our attribute heuristic). The official ``mAP``/``NDS`` are lower when
          some of the 10 classes have no boxes in the split: the devkit counts them as AP 0, TP error 1.
        * Real nuScenes: AP 1.000 for every class and mATE/mASE/mAOE ~0 (tiny orientation and velocity
          differences from non-flat ego poses). mAVE is not exactly 0: the devkit's GT velocity is a
          finite difference over neighbouring annotations and is NaN at track ends, where the info file
          stores 0. mAAE is not 0 either: real attributes (e.g. a stopped car, a cyclist walking a bike,
          a sitting pedestrian) do not always match the speed heuristic the reference, and we, use to
          choose attributes. Both are the floor a perfect detector reaches with this attribute rule.
        Anything else (AP < 1, ATE/ASE/AOE clearly above 0) means a convention is broken somewhere.

    Args:
        data_root: the nuScenes data root (``VERSION/`` tables and the info files).
        version: e.g. ``v1.0-trainval``, ``v1.0-mini``, ``v1.0-synth``.
        split: the split to check; default the version's validation split (see ``default_split``).
        out_dir: where results, metrics and the picture go; default ``DATA_ROOT/check_data/SPLIT``.

    Returns:
        The metrics from ``evaluate_nusc`` plus ``"image"``, the drawn PNG's path (str).

    Raises:
        DataError: no info file for the split (run ``bevnext create-data`` first), unknown split,
            an unannotated version, or the devkit refusing the data.
    """
    data_root = Path(data_root)
    if split is None:
        split = default_split(data_root, version)
    elif version.endswith("test") or split == "test":
        raise DataError(
            f"split {split!r} of {version} has no annotations, so check-data has nothing to check"
        )
    known = splits_for_version(data_root, version)
    if split not in known:
        raise DataError(
            f"unknown split {split!r} for nuScenes {version}; known splits: {', '.join(known) or 'none'}"
        )
    path = info_path(data_root, split)
    if not path.is_file():
        raise DataError(
            f"no info file {path}; create it with: "
            f"bevnext create-data --data-root {data_root} --version {version}"
        )
    info_file = load_infos(path)
    if info_file.version != version or info_file.split != split:
        # The GT boxes would be scored against another version's annotations: every sample would miss.
        raise DataError(
            f"{path} was made from {info_file.version} split {info_file.split}, not {version} split {split}; "
            f"re-run: bevnext create-data --data-root {data_root} --version {version}"
        )
    if not info_file.infos:
        raise DataError(f"{path} holds no samples")
    out = Path(out_dir) if out_dir is not None else data_root / "check_data" / split

    results: dict[str, list[dict[str, Any]]] = {}
    best_info, best_count = info_file.infos[0], -1
    for info in info_file.infos:
        boxes, labels = _gt_as_detections(info)
        results[info["token"]] = detections_to_nusc(
            boxes, np.ones(boxes.shape[0]), labels, info["token"], key_ego2global(info)
        )
        if boxes.shape[0] > best_count:
            best_info, best_count = info, boxes.shape[0]
    result_path = write_results(out / "results_nusc.json", results)

    metrics = evaluate_nusc(data_root, version, split, result_path, out)
    for line in format_metrics_lines(metrics):
        print(line)

    boxes, labels = _gt_as_detections(best_info)
    image = draw_sample(data_root, best_info, boxes, labels, out / f"check_data_{best_info['token']}.png")
    print(f"drew the ground truth of sample {best_info['token']} ({best_count} boxes): {image}")
    metrics["image"] = str(image)
    return metrics


__all__ = ["check_data", "default_split"]
