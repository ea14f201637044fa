"""``bevnext eval`` on the tiny synthetic dataset: perfect head outputs score mAP 1.0 through the evaluation code,
1 and 2 processes give identical results, history-feature reuse equals recomputing on a multi-scene split,
and bad inputs fail with one line naming the file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, process_env

from bevnext.cli import main
from bevnext.config.run import load_run
from bevnext.data.infos import info_path
from bevnext.engine import dist as bdist
from bevnext.engine.checkpoint import save_checkpoint
from bevnext.engine.evaluate import evaluate_model, predict_split
from bevnext.models.detector import BEVNeXt, HeadOutputs, build_model
from bevnext.models.oracle import oracle_head_outputs

DATA = ["data.src_size=[400,225]", "eval.num_workers=0"]


def _run(root: Path, preset: str = "tiny_stage2", *overrides: str):
    return load_run(preset, [f"data.data_root={root}", *DATA, *overrides])


class _PerfectDetector(BEVNeXt):
    """The tiny detector with its network replaced by the oracle: every output after the heads is the real path."""

    def forward_features(self, batch, cache=None):
        proposals, regression = oracle_head_outputs(self.target_builder(batch.gt_boxes, batch.gt_labels))
        return HeadOutputs(proposals=proposals, regression=regression, depth=torch.zeros(0))


def test_perfect_head_outputs_reach_map_one_through_the_evaluation(tiny_synth_root, tmp_path):
    # The reference's 0.8 m cells: on the tiny 3.2 m grid two objects can share a cell, and one is lost.
    run = _run(tiny_synth_root, "tiny_stage1", "model.bev_cell=[0.8,0.8,8.0]")
    model = build_model(run.model).eval()
    model.__class__ = _PerfectDetector
    result = evaluate_model(model, run, tmp_path, quiet=True)
    metrics = result.metrics
    assert metrics["classes_with_gt"], "the split has ground truth"
    assert metrics["map_classes_with_gt"] == pytest.approx(1.0, abs=1e-9)
    for name in metrics["classes_with_gt"]:
        assert all(ap == pytest.approx(1.0, abs=1e-9) for ap in metrics["label_aps"][name].values()), name
        assert metrics["label_tp_errors"][name]["trans_err"] < 1e-3, name
    results = json.loads(result.results_path.read_text())["results"]
    infos = json.loads(info_path(tiny_synth_root, run.data.val_split).read_text())["infos"]
    assert sorted(results) == sorted(info["token"] for info in infos)
    saved = json.loads(result.metrics_path.read_text())
    assert saved["map_classes_with_gt"] == pytest.approx(1.0) and saved["samples"] == len(infos)


@pytest.fixture(scope="module")
def two_scene_root(tiny_synth_root, tmp_path_factory) -> Path:
    """The tiny dataset (files linked, not copied) with a split ``both`` holding its two scenes."""
    root = tmp_path_factory.mktemp("two_scenes")
    for entry in tiny_synth_root.iterdir():
        if not entry.name.startswith("bevnext_infos_"):
            (root / entry.name).symlink_to(entry)
        else:
            shutil.copy(entry, root / entry.name)
    train = json.loads(info_path(root, "synth_train").read_text())
    val = json.loads(info_path(root, "synth_val").read_text())
    both = dict(train, split="both", infos=train["infos"] + val["infos"])
    info_path(root, "both").write_text(json.dumps(both))
    return root


def test_history_reuse_equals_recompute_on_a_multi_scene_split(two_scene_root):
    torch.manual_seed(0)
    run = _run(two_scene_root)
    model = build_model(run.model).eval()
    info = bdist.init_distributed("cpu")
    reused, _ = predict_split(model, run, "both", info)
    recomputed, _ = predict_split(model, _run(two_scene_root, "tiny_stage2", "eval.reuse_history=false"), "both",
                                  info)
    assert len(reused) == 8 and reused.keys() == recomputed.keys()
    for token, (boxes, scores, labels) in recomputed.items():
        r_boxes, r_scores, r_labels = reused[token]
        assert np.array_equal(labels, r_labels), token
        np.testing.assert_allclose(r_boxes, boxes, rtol=0, atol=1e-5, err_msg=token)
        np.testing.assert_allclose(r_scores, scores, rtol=0, atol=1e-5, err_msg=token)


def _bevnext(args: list[str], cwd: Path, nproc: int = 1, timeout: float = 600) -> str:
    launcher = [sys.executable, "-m", "bevnext"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        "-m", "bevnext"]
    proc = subprocess.Popen([*launcher, *args], cwd=cwd, env=process_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"bevnext {' '.join(args)} still running after {timeout} s")
    assert proc.returncode == 0, out[-6000:]
    return out


def test_one_and_two_processes_give_identical_results(two_scene_root, tmp_path):
    torch.manual_seed(0)
    run = _run(two_scene_root)
    ckpt = tmp_path / "epoch_1_ema.pth"
    save_checkpoint(ckpt, {"state_dict": build_model(run.model).state_dict(), "epoch": 1, "updates": 4})
    # One CPU thread per process in both runs: with 2 threads a CPU sums some products in another order, and
    # with random weights near-tied scores can then swap places; the point here is the sharding and gathering.
    common = ["eval", "tiny_stage2", str(ckpt), f"data.data_root={two_scene_root}", *DATA, "runtime.num_threads=1",
              "--device", "cpu"]
    one = _bevnext([*common, "--work-dir", str(tmp_path / "one")], tmp_path)
    two = _bevnext([*common, "--work-dir", str(tmp_path / "two")], tmp_path, nproc=2)
    for out in (one, two):
        assert "mAP: " in out and "NDS: " in out and "mAP (classes with ground truth): " in out
        assert "AP@0.5" in out and "results: " in out
    results = [json.loads((tmp_path / name / "results_nusc.json").read_text())["results"] for name in ("one", "two")]
    assert results[0] == results[1] and len(results[0]) == 4  # the val scene, bit for bit
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two")]
    assert (metrics[0]["world_size"], metrics[1]["world_size"]) == (1, 2)
    for key in ("mean_ap", "nd_score", "label_aps", "label_tp_errors", "tp_errors"):
        assert metrics[0][key] == metrics[1][key], key


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_bad_inputs_fail_in_one_line_naming_the_file(tiny_synth_root, tmp_path, capsys):
    base = ["--work-dir", str(tmp_path / "eval"), f"data.data_root={tiny_synth_root}", *DATA]
    stage1 = _run(tiny_synth_root, "tiny_stage1")
    good = tmp_path / "stage1.pth"
    save_checkpoint(good, {"state_dict": build_model(stage1.model).state_dict()})

    assert main(["eval", "tiny_stage1", str(tmp_path / "nope.pth"), *base]) == 2
    assert "nope.pth: no such checkpoint file" in _error_line(capsys)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert main(["eval", "tiny_stage1", str(truncated), *base]) == 2
    assert "truncated.pth: not a readable checkpoint" in _error_line(capsys)

    assert main(["eval", "tiny_stage2", str(good), *base]) == 2  # a stage-1 checkpoint for the stage-2 model
    line = _error_line(capsys)
    assert "stage1.pth: saved for another model configuration" in line and "missing; table above" in line
    log = (tmp_path / "eval" / "eval_log.txt").read_text()
    assert "missing from the checkpoint" in log and "img_bev_encoder_backbone." in log

    wider = tmp_path / "wider.pth"  # the same architecture with C = 24 instead of 16
    save_checkpoint(wider, {"state_dict": build_model(_run(tiny_synth_root, "tiny_stage1",
                                                           "model.context_channels=24").model).state_dict()})
    assert main(["eval", "tiny_stage1", str(wider), *base]) == 2
    assert "wider.pth: saved for another model configuration (" in _error_line(capsys)
    log = (tmp_path / "eval" / "eval_log.txt").read_text()
    assert "shape-mismatched, kept" in log and "checkpoint [24" in log and "model [16" in log

    # An info file of another format version, a split without samples, a data root without the images.
    root = tmp_path / "root"
    shutil.copytree(tiny_synth_root, root, ignore=shutil.ignore_patterns("samples", "sweeps"))
    data = [f"data.data_root={root}", *DATA, "--work-dir", str(tmp_path / "eval")]
    assert main(["eval", "tiny_stage1", str(good), *data]) == 2
    assert "(sample " in (line := _error_line(capsys)) and "samples/CAM_FRONT" in line
    val = info_path(root, "synth_val")
    original = json.loads(val.read_text())
    val.write_text(json.dumps(dict(original, format_version=original["format_version"] + 1)))
    assert main(["eval", "tiny_stage1", str(good), *data]) == 2
    assert str(val) in (line := _error_line(capsys)) and "version" in line
    val.write_text(json.dumps(dict(original, infos=[])))
    assert main(["eval", "tiny_stage1", str(good), *data]) == 2
    assert str(val) in (line := _error_line(capsys)) and "no samples" in line


def test_training_evaluates_the_ema_weights_every_epoch(tiny_synth_root, tmp_path):
    work = tmp_path / "run"
    out = _bevnext(["train", "tiny_stage1", "--work-dir", str(work), "--device", "cpu",
                    f"data.data_root={tiny_synth_root}", *DATA, "train.num_workers=0", "train.epochs=2",
                    "data.cbgs=false", "train.max_iters=3", "train.eval_every=1"], tmp_path)
    # 4 training samples in batches of 2: epochs end after steps 2 and 3 (max_iters), both evaluated.
    assert out.count("evaluation (EMA weights, synth_val): mAP ") == 2, out[-3000:]
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval_mAP" in row]
    assert [row["epoch"] for row in evals] == [1, 2]
    assert all(0.0 <= row["eval_mAP"] <= 1.0 and 0.0 <= row["eval_NDS"] <= 1.0 for row in evals)
    saved = json.loads((work / "eval_epoch_2" / "metrics.json").read_text())
    assert saved["checkpoint"] == "EMA weights after epoch 2" and saved["mean_ap"] == evals[1]["eval_mAP"]
