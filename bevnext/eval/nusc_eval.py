"""The official nuScenes detection evaluation, wrapped.

``evaluate_nusc`` runs the devkit's ``DetectionEval`` with the ``detection_cvpr_2019`` config (the one
the reference reports) on any split: the predefined ones (``val``, ``mini_val``, ...) and custom ones
listed in ``DATA_ROOT/VERSION/splits.json`` (our synthetic data's ``synth_train`` / ``synth_val``),
which devkit 1.2.0 supports. The devkit's own progress output is silenced unless asked for, and its
failures (assertions, unknown splits) come back as one-line ``DataError`` messages.

To evaluate several results files on one split (e.g. model predictions written with
``bevnext.eval.formatting.write_results``), load the database once with ``load_split`` and call
``evaluate_results`` for each file; ``evaluate_nusc`` does both for a single file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bevnext.errors import DataError, one_line
from bevnext.io import atomic_write_text, to_jsonable

_TP_NAMES = {
    "trans_err": "mATE",
    "scale_err": "mASE",
    "orient_err": "mAOE",
    "vel_err": "mAVE",
    "attr_err": "mAAE",
}
"""The devkit's TP error keys and the names it prints for their class means, in its print order."""

_SENTINEL_OFFSET_M = 10_000.0
"""How far from the ego vehicle the placeholder prediction sits; far beyond every class range."""

_DEVKIT_CONFIG = "detection_cvpr_2019"
"""The devkit's detection config the reference reports its numbers with."""


@dataclass(frozen=True)
class NuscSplit:
    """A loaded nuScenes database and one of its splits, checked to be evaluable (see ``load_split``).

    Loading and indexing the tables is the slow part on a full nuScenes release, so a caller with
    several results files loads once and passes this to ``evaluate_results`` for each.
    """

    nusc: Any
    """The devkit's ``NuScenes`` database."""
    data_root: Path
    version: str
    split: str
    sample_tokens: tuple[str, ...]
    """The split's samples, in database order (never empty)."""


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    # The devkit prints loading/filtering chatter to stdout and tqdm bars to stderr; both are noise in
    # our logs. tqdm picks sys.stderr when a bar is created, so redirecting it here is enough.
    if verbose:
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _split_sample_tokens(nusc: Any, split: str) -> list[str]:
    """Sample tokens of a predefined or custom (``splits.json``) split, in database order."""
    from nuscenes.utils.splits import create_splits_scenes, get_scenes_of_custom_split, is_predefined_split

    if is_predefined_split(split_name=split):
        # The devkit's own pairing of predefined splits and versions (its load_gt asserts the same).
        needs = "test" if split == "test" else "mini" if split.startswith("mini_") else "trainval"
        if not nusc.version.endswith(needs):
            raise ValueError(f"split {split!r} is a split of v1.0-{needs}, not of {nusc.version}")
        scene_names = set(create_splits_scenes()[split])
    else:
        scene_names = set(get_scenes_of_custom_split(split_name=split, nusc=nusc))
    scene_of = {s["token"]: s["name"] for s in nusc.scene}
    return [s["token"] for s in nusc.sample if scene_of[s["scene_token"]] in scene_names]


def _has_detection_annotations(nusc: Any, sample_tokens: list[str]) -> bool:
    from nuscenes.eval.detection.utils import category_to_detection_name

    for token in sample_tokens:
        for ann_token in nusc.get("sample", token)["anns"]:
            if category_to_detection_name(nusc.get("sample_annotation", ann_token)["category_name"]):
                return True
    return False


def _sentinel_box(nusc: Any, sample_token: str) -> dict[str, Any]:
    """A placeholder prediction that the devkit's distance filter removes before matching.

    The devkit cannot evaluate a results file without a single box (its filter looks up the box type
    from the first box it finds and fails on none). One box far away from the ego vehicle makes the
    file acceptable and is then dropped by the class-range filter, so the metrics are those of an
    empty submission.
    """
    sample = nusc.get("sample", sample_token)
    pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
    x, y, z = pose["translation"]
    return {
        "sample_token": sample_token,
        "translation": [x + _SENTINEL_OFFSET_M, y, z],
        "size": [1.0, 1.0, 1.0],
        "rotation": [1.0, 0.0, 0.0, 0.0],
        "velocity": [0.0, 0.0],
        "detection_name": "car",
        "detection_score": 0.0,
        "attribute_name": "vehicle.parked",
    }


def _read_results(result_path: Path) -> dict[str, Any]:
    """The parsed results file, checked to have the submission layout (``meta`` and ``results``)."""
    try:
        with open(result_path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read nuScenes results file {result_path}: {one_line(err)}") from err
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or "meta" not in data:
        raise DataError(f"{result_path}: not a nuScenes results file (expected keys 'meta' and 'results')")
    return data


def _complete_results(
    nusc: Any, result_path: Path, split: str, sample_tokens: list[str], out_dir: Path
) -> Path:
    """The results file as the devkit needs it: every sample of the split present, nothing else.

    Returns ``result_path`` itself when it already qualifies, else a completed copy in ``out_dir``.
    """
    data = _read_results(result_path)
    results: dict[str, list] = data["results"]
    in_split = set(sample_tokens)
    extra = [t for t in results if t not in in_split]
    if extra:
        raise DataError(
            f"{result_path}: {len(extra)} of its samples (e.g. {extra[0]}) are not in split {split!r}; "
            "evaluate the split the results were made for"
        )
    missing = [t for t in sample_tokens if t not in results]
    empty = not any(len(results.get(t, [])) for t in sample_tokens)
    if not missing and not empty:
        return result_path
    for token in missing:
        # A sample without detections is a valid submission entry; the devkit only insists it is listed.
        results[token] = []
    if empty and sample_tokens:
        results[sample_tokens[0]] = [_sentinel_box(nusc, sample_tokens[0])]
    completed = out_dir / "results_nusc_complete.json"
    atomic_write_text(completed, json.dumps(data))
    return completed


def _check_tables(data_root: Path, version: str) -> None:
    if not (data_root / version).is_dir():
        raise DataError(f"no nuScenes tables at {data_root / version} (check --data-root and --version)")


def _check_results_file(result_path: Path) -> None:
    if not result_path.is_file():
        raise DataError(f"nuScenes results file {result_path} does not exist")


def _load_database(data_root: Path, version: str, split: str, verbose: bool) -> tuple[Any, list[str]]:
    """The devkit's ``NuScenes`` database and the sample tokens of ``split``."""
    from nuscenes import NuScenes

    try:
        with _quiet(verbose):
            nusc = NuScenes(version=version, dataroot=str(data_root), verbose=verbose)
            sample_tokens = _split_sample_tokens(nusc, split)
    except Exception as err:  # the devkit signals bad input with assertions and bare exceptions
        raise DataError(f"nuScenes {version} at {data_root}, split {split!r}: {one_line(err)}") from err
    return nusc, sample_tokens


def _check_evaluable(nusc: Any, data_root: Path, version: str, split: str, sample_tokens: list[str]) -> None:
    """Refuse a split the devkit cannot score: no samples, no annotations, or none of a detection class."""
    if not sample_tokens:
        raise DataError(f"split {split!r} of nuScenes {version} at {data_root} has no samples")
    if version.endswith("test") or len(nusc.sample_annotation) == 0:
        raise DataError(f"nuScenes {version} at {data_root} has no annotations; it cannot be evaluated")
    if not _has_detection_annotations(nusc, sample_tokens):
        # The devkit would fail on this with "Invalid box type: None"; say what is actually wrong.
        raise DataError(f"split {split!r} of nuScenes {version} at {data_root} has no annotated objects "
                        "of the detection classes; it cannot be evaluated")


def load_split(
    data_root: str | os.PathLike[str], version: str, split: str, verbose: bool = False
) -> NuscSplit:
    """Load a nuScenes database with the devkit and check that ``split`` can be evaluated.

    Args:
        data_root: the nuScenes data root (holds ``VERSION/``).
        version: e.g. ``v1.0-trainval``, ``v1.0-mini``, ``v1.0-synth``.
        split: a predefined split (``val``, ``mini_val``, ...) or one named in ``VERSION/splits.json``.
        verbose: let the devkit print its progress.

    Raises:
        DataError: the tables are missing or invalid, the split is unknown or not of this version, or
            it has no samples or no annotated objects of the detection classes.
    """
    data_root = Path(data_root)
    _check_tables(data_root, version)
    nusc, sample_tokens = _load_database(data_root, version, split, verbose)
    _check_evaluable(nusc, data_root, version, split, sample_tokens)
    return NuscSplit(nusc, data_root, version, split, tuple(sample_tokens))


def _run_devkit(target: NuscSplit, cfg: Any, eval_path: Path, out_dir: Path, verbose: bool) -> tuple[Any, Any, Any]:
    """Run the devkit's ``DetectionEval``; returns the evaluator, its metrics and its metric data."""
    from nuscenes.eval.detection.evaluate import DetectionEval

    try:
        with _quiet(verbose):
            evaluator = DetectionEval(
                target.nusc, config=cfg, result_path=str(eval_path), eval_set=target.split,
                output_dir=str(out_dir), verbose=verbose,
            )
            metrics, metric_data = evaluator.evaluate()
    except Exception as err:
        raise DataError(
            f"nuScenes evaluation of {eval_path} on split {target.split!r} failed: {one_line(err)}"
        ) from err
    with contextlib.suppress(OSError):
        (out_dir / "plots").rmdir()  # DetectionEval creates it for curves we do not draw; drop it if empty
    return evaluator, metrics, metric_data


def _write_metric_files(out_dir: Path, summary: dict[str, Any], metric_data: Any) -> None:
    """``metrics_summary.json`` and ``metrics_details.json``, as the devkit's own ``main()`` writes them."""
    # NaN allowed: the devkit itself writes NaN for undefined TP errors. Unlike the devkit, the files
    # are written atomically and without its matplotlib curves, which take longer than the eval.
    atomic_write_text(out_dir / "metrics_summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out_dir / "metrics_details.json", json.dumps(metric_data.serialize(), indent=2))


def _gt_counts(gt_boxes: Any, class_names: list[str]) -> dict[str, int]:
    """Ground-truth boxes per class (in ``class_names`` order) left after the devkit's filters."""
    counts = dict.fromkeys(class_names, 0)
    for box in gt_boxes.all:
        counts[box.detection_name] += 1
    return counts


def _classes_with_gt_metrics(summary: dict[str, Any], num_gt: dict[str, int]) -> dict[str, Any]:
    """Our additions to the devkit's summary: AP and TP errors averaged over classes with ground truth.

    The official means count a class without ground truth as AP 0 and TP error 1, which says nothing
    about a split (a synthetic one, a small one) where some classes never occur.
    """
    with_gt = [name for name, count in num_gt.items() if count > 0]
    aps = summary["mean_dist_aps"]
    tp_with_gt = {}
    for metric in _TP_NAMES:
        values = [summary["label_tp_errors"][c][metric] for c in with_gt]
        finite = [v for v in values if not np.isnan(v)]
        tp_with_gt[metric] = float(np.mean(finite)) if finite else float("nan")
    return {
        "num_gt": num_gt,
        "classes_with_gt": with_gt,
        "map_classes_with_gt": float(np.mean([aps[c] for c in with_gt])) if with_gt else float("nan"),
        "tp_errors_classes_with_gt": tp_with_gt,
    }


def evaluate_results(
    target: NuscSplit,
    result_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    verbose: bool = False,
) -> dict[str, Any]:
    """Evaluate a results file on a loaded split (see ``evaluate_nusc`` for the metrics returned).

    Args:
        target: the database and split, from ``load_split``.
        result_path: the results file (see ``bevnext.eval.formatting``).
        out_dir: folder for the metric files (and a completed copy of the results, if one is needed).
        verbose: let the devkit print its progress.

    Raises:
        DataError: the results file is missing or invalid, or the devkit refused it.
    """
    from nuscenes.eval.common.config import config_factory

    result_path = Path(result_path)
    out_dir = Path(out_dir)
    _check_results_file(result_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = config_factory(_DEVKIT_CONFIG)
    eval_path = _complete_results(target.nusc, result_path, target.split, list(target.sample_tokens), out_dir)
    evaluator, metrics, metric_data = _run_devkit(target, cfg, eval_path, out_dir, verbose)
    summary = to_jsonable(metrics.serialize())
    summary["meta"] = dict(evaluator.meta)
    _write_metric_files(out_dir, summary, metric_data)
    summary.update(_classes_with_gt_metrics(summary, _gt_counts(evaluator.gt_boxes, list(cfg.class_names))))
    return summary


def evaluate_nusc(
    data_root: str | os.PathLike[str],
    version: str,
    split: str,
    result_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    verbose: bool = False,
) -> dict[str, Any]:
    """Evaluate a nuScenes detection results file with the official devkit.

    Samples of the split missing from the results count as samples without detections. The devkit's
    ``metrics_summary.json`` and ``metrics_details.json`` are written to ``out_dir`` (no PR-curve plots).

    Args:
        data_root: the nuScenes data root (holds ``VERSION/``).
        version: e.g. ``v1.0-trainval``, ``v1.0-mini``, ``v1.0-synth``.
        split: a predefined split (``val``, ``mini_val``, ...) or one named in ``VERSION/splits.json``.
        result_path: the results file (see ``bevnext.eval.formatting``).
        out_dir: folder for the metric files.
        verbose: let the devkit print its progress.

    Returns:
        The devkit's metrics summary, as plain Python: ``mean_ap``, ``nd_score``, ``mean_dist_aps``
        (class -> AP averaged over the distance thresholds), ``label_aps`` (class -> threshold -> AP),
        ``tp_errors`` (metric -> mean over classes), ``tp_scores``, ``label_tp_errors`` (class ->
        metric -> error; NaN where the devkit does not define one), ``eval_time``; plus our additions
        ``num_gt`` (class -> GT boxes left after the devkit's filters), ``classes_with_gt`` (classes
        with at least one such box, in the devkit's class order), ``map_classes_with_gt`` (mean AP over
        those; NaN if there are none) and ``tp_errors_classes_with_gt`` (TP errors averaged over those
        classes only; the official ``tp_errors`` count every GT-less class as error 1).

    Raises:
        DataError: the dataset, split or results file is missing or invalid, or the devkit refused them.
    """
    data_root = Path(data_root)
    result_path = Path(result_path)
    out_dir = Path(out_dir)
    # Cheap checks first, before the slow load of the database.
    _check_tables(data_root, version)
    _check_results_file(result_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    return evaluate_results(load_split(data_root, version, split, verbose), result_path, out_dir, verbose)


def format_metrics_lines(metrics: dict[str, Any]) -> list[str]:
    """Printable lines for a metrics dict from ``evaluate_nusc``, in the devkit's style.

    The first lines are exactly what the devkit prints (``mAP: 0.xxxx``, the five ``mXXE: 0.xxxx``
    lines, ``NDS: 0.xxxx``; four decimals), which scripts grep for. Then
    ``mAP (classes with ground truth): 0.xxx`` and a per-class table (AP, the AP at each match
    distance when the metrics have ``label_aps``, and the TP errors; three decimals, ``nan`` where the
    devkit defines no error) with an extra GT-count column.

    Args:
        metrics: the dict returned by ``evaluate_nusc``.

    Returns:
        The lines, without newlines.
    """
    return [*_headline_lines(metrics), "", *_class_table_lines(metrics)]


def _headline_lines(metrics: dict[str, Any]) -> list[str]:
    """The devkit's summary lines (``mAP``, the TP errors, ``NDS``), then our classes-with-GT mAP."""
    lines = [f"mAP: {metrics['mean_ap']:.4f}"]
    for key, name in _TP_NAMES.items():
        lines.append(f"{name}: {metrics['tp_errors'][key]:.4f}")
    lines.append(f"NDS: {metrics['nd_score']:.4f}")
    lines.append(f"mAP (classes with ground truth): {metrics.get('map_classes_with_gt', float('nan')):.3f}")
    return lines


def _class_table_lines(metrics: dict[str, Any]) -> list[str]:
    """The tab-separated per-class table: AP (mean over the match distances), the AP at each match distance
    (``AP@0.5`` ... ``AP@4.0``, metres), the five TP errors and the GT count of each class."""
    with_gt = metrics.get("classes_with_gt", [])
    num_gt = metrics.get("num_gt", {})
    distances = sorted({str(d) for aps in metrics.get("label_aps", {}).values() for d in aps}, key=float)
    titles = ("AP", *(f"AP@{d}" for d in distances), "ATE", "ASE", "AOE", "AVE", "AAE")
    head = "\t".join(f"{h:<6}" for h in titles)
    lines = ["Per-class results:", f"{'Object Class':<20}\t{head}\tGT"]
    for name, ap in metrics["mean_dist_aps"].items():
        tp = metrics["label_tp_errors"][name]
        count = num_gt.get(name, "?")
        # Only metrics from evaluate_nusc know the GT counts; without them no class is marked.
        marker = "" if name in with_gt or not num_gt else "  (no GT)"
        by_distance = {str(d): v for d, v in metrics.get("label_aps", {}).get(name, {}).items()}
        values = [ap, *(by_distance.get(d, float("nan")) for d in distances), *(tp[key] for key in _TP_NAMES)]
        cells = "\t".join(f"{v:<6.3f}" for v in values)
        lines.append(f"{name:<20}\t{cells}\t{count}{marker}")
    return lines


__all__ = ["NuscSplit", "evaluate_nusc", "evaluate_results", "format_metrics_lines", "load_split"]
