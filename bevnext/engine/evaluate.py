"""Evaluation of a model on a split: ``bevnext eval``, and the periodic evaluation during training.

Every rank runs the test pipeline over whole scenes of the split (``SceneShardSampler``), in timestamp
order, reusing the image features of frames that return as history frames (``ImageFeatureCache``) unless
``eval.reuse_history`` is off. The detections (key frame, gravity centre) are gathered on rank 0, checked
to cover every sample of the split exactly once, formatted by the same code as ``bevnext check-data``
(``bevnext.eval.formatting``) into ``results_nusc.json`` and scored by the official nuScenes
``DetectionEval`` (``detection_cvpr_2019``). Rank 0 prints the devkit's summary lines (``mAP:``, the TP
errors, ``NDS:``), a per-class table and ``mAP (classes with ground truth)``, writes ``metrics.json``, and
draws ``--show N`` samples.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bevnext.config.run import RunConfig
from bevnext.data.info_record import InfoRecord, key_ego2global
from bevnext.data.infos import info_path, load_infos
from bevnext.data.loader import build_eval_loader
from bevnext.engine import dist as bdist
from bevnext.engine.checkpoint import CheckpointError, load_weights
from bevnext.engine.launch import start_process
from bevnext.engine.metrics import format_eta
from bevnext.errors import DataError
from bevnext.eval.formatting import detections_to_nusc, write_results
from bevnext.eval.nusc_eval import evaluate_nusc, format_metrics_lines
from bevnext.eval.visualize import draw_sample
from bevnext.io import atomic_write_json
from bevnext.models.detector import BEVNeXt, build_model
from bevnext.models.feature_cache import ImageFeatureCache

logger = logging.getLogger(__name__)

__all__ = ["EvalResult", "evaluate_checkpoint", "evaluate_model", "predict_split"]

_PROGRESS_EVERY_S = 30.0


@dataclass
class EvalResult:
    """What an evaluation produced (metrics and files exist on rank 0 only).

    Attributes:
        metrics: the devkit summary plus our additions (see ``bevnext.eval.nusc_eval.evaluate_nusc``).
        results_path: the nuScenes results JSON.
        metrics_path: ``metrics.json`` (the summary, the checkpoint and the timing).
        pictures: PNGs drawn for ``show``.
        samples_per_s: inference throughput of this rank (data loading included).
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    results_path: Path | None = None
    metrics_path: Path | None = None
    pictures: list[Path] = field(default_factory=list)
    samples_per_s: float = 0.0


Predictions = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
"""Sample token -> ``(boxes (K, 9) float32 key frame, scores (K,) float32, labels (K,) int64)``."""


@torch.no_grad()
def predict_split(model: BEVNeXt, run: RunConfig, split: str, info: bdist.DistInfo) -> tuple[Predictions, float]:
    """This rank's detections on its scenes of ``split``.

    Returns:
        ``(predictions, samples_per_s)``.
    """
    loader = build_eval_loader(run.data, run.eval, split, info.rank, info.world_size)
    reuse = run.eval.reuse_history and model.num_frames > 1
    cache = ImageFeatureCache() if reuse else None
    was_training = model.training
    model.eval()
    predictions: Predictions = {}
    total = len(loader)
    t0 = last_report = time.perf_counter()
    try:
        for i, batch in enumerate(loader):
            batch = batch.to(info.device, non_blocking=True)
            detections = model.predict(batch, cache)
            for meta, det in zip(batch.metas, detections):
                predictions[meta["token"]] = (det.boxes.float().cpu().numpy(), det.scores.float().cpu().numpy(),
                                              det.labels.cpu().numpy())
            now = time.perf_counter()
            if info.is_main and (now - last_report > _PROGRESS_EVERY_S or i + 1 == total):
                rate = (i + 1) / (now - t0)
                logger.info("eval [%d/%d] %.2f batches/s, eta %s", i + 1, total, rate,
                            format_eta((total - i - 1) / max(rate, 1e-9)))
                last_report = now
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - t0  # the .cpu() copies above waited for the device
    return predictions, len(predictions) / elapsed if elapsed > 0 else 0.0


def _merge(parts: list[Predictions], infos: list[InfoRecord], path: Path) -> Predictions:
    """One prediction per sample of the split, or a ``DataError`` naming what is missing."""
    merged: Predictions = {}
    for part in parts:
        for token, value in part.items():
            merged.setdefault(token, value)  # a sample predicted twice (padding) counts once
    expected = [info["token"] for info in infos]
    missing = [token for token in expected if token not in merged]
    if missing:
        raise DataError(f"{path}: no prediction for {len(missing)} of {len(expected)} samples (first: "
                        f"{', '.join(missing[:3])}); every sample of the split must be evaluated")
    unknown = set(merged) - set(expected)
    if unknown:
        raise DataError(f"{path}: predictions for {len(unknown)} samples not in the split (e.g. {min(unknown)})")
    return {token: merged[token] for token in expected}


def _nan_to_none(obj: Any) -> Any:
    """NaN (an undefined TP error) as JSON null, so that ``metrics.json`` is standard JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {key: _nan_to_none(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(value) for value in obj]
    return obj


def _results_records(predictions: Predictions, infos: list[InfoRecord]) -> dict[str, list[dict[str, Any]]]:
    records = {}
    for info in infos:
        boxes, scores, labels = predictions[info["token"]]
        records[info["token"]] = detections_to_nusc(boxes, scores, labels, info["token"], key_ego2global(info))
    return records


def _draw(run: RunConfig, infos: list[InfoRecord], predictions: Predictions, show: int, out: Path) -> list[Path]:
    """Predictions against ground truth for the first ``show`` samples with ground truth."""
    pictures = []
    chosen = [info for info in infos if info["gt_boxes"]][:show] or infos[:show]
    for info in chosen:
        boxes, scores, labels = predictions[info["token"]]
        keep = scores >= run.eval.show_score_threshold
        pictures.append(draw_sample(
            run.data.data_root, info, boxes[keep], labels[keep], out / f"{info['token']}.png", scores=scores[keep],
            gt_boxes=np.asarray(info["gt_boxes"], dtype=np.float64).reshape(-1, 9),
            gt_labels=np.asarray(info["gt_labels"], dtype=np.int64),
        ))
    return pictures


def evaluate_model(
    model: nn.Module,
    run: RunConfig,
    work_dir: str | Path,
    split: str | None = None,
    show: int = 0,
    checkpoint: str | Path | None = None,
    quiet: bool = False,
) -> EvalResult:
    """Evaluate ``model`` (already on this rank's device) on ``split``; every rank of the group must call it.

    Args:
        model: a ``BEVNeXt`` (possibly wrapped in DistributedDataParallel; the bare module is used).
        run: the run configuration (data, eval settings).
        work_dir: where ``results_nusc.json``, ``metrics.json``, the devkit's files and pictures go.
        split: default ``run.data.val_split``.
        show: draw this many samples (predictions against ground truth).
        checkpoint: recorded in ``metrics.json``.
        quiet: do not print the metrics (the trainer logs its own line).

    Returns:
        The metrics and files on rank 0; an empty ``EvalResult`` with the throughput elsewhere.

    Raises:
        DataError: no info file, an info file of another format version, a split without samples or the
            devkit refusing the data; predictions that do not cover the split.
    """
    info = bdist.init_distributed(None if run.runtime.device == "auto" else run.runtime.device)
    split = split or run.data.val_split
    work_dir = Path(work_dir)
    path = info_path(run.data.data_root, split)
    if not path.is_file():
        raise DataError(f"{path}: no info file for split {split!r} — run bevnext create-data first")
    bare = bdist.unwrap_model(model)
    predictions, rate = predict_split(bare, run, split, info)
    parts = bdist.gather_object_to_main(predictions)
    result = EvalResult(samples_per_s=rate)
    if not info.is_main:
        bdist.barrier()
        return result
    try:
        info_file = load_infos(path)
        infos = info_file.infos
        merged = _merge(parts, infos, path)
        result.results_path = write_results(work_dir / "results_nusc.json", _results_records(merged, infos))
        metrics = evaluate_nusc(run.data.data_root, info_file.version, info_file.split, result.results_path,
                                work_dir / "nusc_eval")
        result.metrics = metrics
        result.metrics_path = work_dir / "metrics.json"
        atomic_write_json(result.metrics_path, _nan_to_none({
            "checkpoint": None if checkpoint is None else str(checkpoint), "split": split,
            "samples": len(infos), "world_size": info.world_size, "samples_per_s_rank0": rate,
            "reuse_history": bool(run.eval.reuse_history), **metrics,
        }), indent=2)
        if not quiet:
            for line in format_metrics_lines(metrics):
                print(line)
            print(f"results: {result.results_path}\nmetrics: {result.metrics_path}")
        if show:
            result.pictures = _draw(run, infos, merged, show, work_dir / "pictures")
            for picture in result.pictures:
                print(f"picture: {picture}")
    finally:
        bdist.barrier()
    return result


def evaluate_checkpoint(
    run: RunConfig, checkpoint: str | Path, work_dir: str | Path, split: str | None = None, show: int = 0
) -> EvalResult:
    """``bevnext eval``: build the run's model, load ``checkpoint`` strictly and evaluate it.

    ``checkpoint`` may be any of our files (``epoch_N.pth``, ``epoch_N_ema.pth``, ``last.pth``) or a reference
    BEVNeXt checkpoint. A checkpoint of another model configuration is refused with the table of tensors that
    do not fit.

    Raises:
        CheckpointError: the file is missing, unreadable, or does not fit the model.
        DataError: see ``evaluate_model``.
    """
    run.validate()
    work_dir = Path(work_dir)
    info, _ = start_process(run, work_dir, "eval_log.txt", run.eval.num_workers)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint file")
    model = build_model(run.model)
    report = load_weights(model, checkpoint)
    if report.mismatched or report.missing:
        if info.is_main:
            logger.error("%s does not fit this model:\n%s", checkpoint, report.table())
        raise CheckpointError(
            f"{checkpoint}: saved for another model configuration ({len(report.mismatched)} tensors of another "
            f"shape, {len(report.missing)} missing; table above) — evaluate it with the config of its run"
        )
    model.to(info.device).eval()
    if info.is_main:
        logger.info("evaluating %s (%s) on %d process(es), device %s", checkpoint, report.summary(),
                    info.world_size, info.device)
    result = evaluate_model(model, run, work_dir, split=split, show=show, checkpoint=checkpoint)
    if info.is_main and not math.isnan(result.metrics.get("mean_ap", math.nan)):
        logger.info("%s: mAP %.4f, NDS %.4f", checkpoint, result.metrics["mean_ap"], result.metrics["nd_score"])
    return result
