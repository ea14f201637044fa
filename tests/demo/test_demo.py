"""``bevnext demo``: its work dir (refusal, reuse, clean rerun), the EMA export, and a shortened demo end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from bevnext.cli import main
from bevnext.demo import DemoResult, run_demo
from bevnext.demo.recipe import DatasetSpec
from bevnext.demo.runner import (
    DEMO_MARKER,
    _Console,
    _dataset,
    _ema_weights,
    _prepare_work_dir,
    _spec_dict,
    _write_marker,
)
from bevnext.engine.checkpoint import extract_state_dict, load_checkpoint, save_checkpoint
from bevnext.engine.train_state import Position, full_checkpoint, save_epoch_files
from bevnext.errors import BevnextError

SHORT = DatasetSpec(scenes=4, samples_per_scene=10, image_size=(400, 225))
"""The shortened demo's dataset: 3 training scenes (30 samples), 1 validation scene (10 samples)."""
SHORT_STEPS = (100, 30)
"""Enough for stage 1 to score above the untrained model on the unseen scene (about 0.002 mAP, all of it at
the 4 m match distance), about two minutes on two cores."""


# ----------------------------------------------------------------------------------------------------
# The work dir.


def test_refuses_a_non_empty_folder_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(BevnextError, match=str(mine)):
        run_demo(mine, progress=False)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # Through the command: one line, exit status 2, no traceback.
    assert main(["demo", "--work-dir", str(mine)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(mine) in lines[0]
    # A demo.json that is not ours does not make the folder ours.
    (mine / DEMO_MARKER).write_text('{"something": "else"}')
    with pytest.raises(BevnextError, match="not made by bevnext demo"):
        run_demo(mine, progress=False)


def test_refuses_a_file_and_bad_arguments(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(BevnextError, match="is a file"):
        run_demo(tmp_path / "f", progress=False)
    with pytest.raises(BevnextError, match="budget-minutes"):
        run_demo(tmp_path / "d", budget_minutes=0, progress=False)
    with pytest.raises(BevnextError, match="steps"):
        run_demo(tmp_path / "d", steps=(10, 0), progress=False)
    assert not (tmp_path / "d").exists()  # arguments are checked before anything is written


def _copy_data(tiny_synth_root: Path, work_dir: Path) -> None:
    shutil.copytree(tiny_synth_root, work_dir / "data")


def test_rerun_reuses_the_same_dataset_and_clears_the_runs(tmp_path, tiny_synth_root, tiny_synth_args, capsys):
    spec = DatasetSpec(**tiny_synth_args)
    work = tmp_path / "demo"
    work.mkdir()
    _copy_data(tiny_synth_root, work)
    _write_marker(work, _spec_dict(spec), 0, 600.0)
    for name in ("untrained", "stage1", "stage2"):
        (work / name).mkdir()
        (work / name / "metrics.jsonl").write_text("{}\n")
    for name in ("summary.txt", "summary.json", "loss_curves.png"):
        (work / name).write_text("old")
    (work / "my_notes.txt").write_text("mine")
    console = _Console(600.0, enabled=True)

    reuse = _prepare_work_dir(work, spec, console)
    assert reuse == (True, True)
    out = capsys.readouterr().out
    assert "removing its untrained, stage1, stage2, summary.txt, summary.json, loss_curves.png" in out
    assert "start over" in out
    assert sorted(p.name for p in work.iterdir()) == ["data", DEMO_MARKER, "my_notes.txt"]

    data_before = {p: p.stat().st_mtime_ns for p in (work / "data").rglob("*") if p.is_file()}
    assert _dataset(work, spec, reuse, 0, console) == work / "data"
    assert f"reusing the synthetic dataset in {work / 'data'}" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (work / "data").rglob("*") if p.is_file()} == data_before


def test_rerun_with_missing_info_files_rewrites_only_them(tmp_path, tiny_synth_root, tiny_synth_args, capsys):
    spec = DatasetSpec(**tiny_synth_args)
    work = tmp_path / "demo"
    work.mkdir()
    _copy_data(tiny_synth_root, work)
    _write_marker(work, _spec_dict(spec), 0, 600.0)
    info = next((work / "data").glob("bevnext_infos_*.json"))
    info.unlink()
    console = _Console(600.0, enabled=True)
    reuse = _prepare_work_dir(work, spec, console)
    assert reuse == (True, False)
    _dataset(work, spec, reuse, 0, console)
    out = capsys.readouterr().out
    assert "reusing the synthetic dataset" in out and "writing them again" in out
    assert info.is_file()


def test_rerun_with_other_dataset_settings_generates_again(tmp_path, tiny_synth_root, tiny_synth_args, capsys):
    old = DatasetSpec(**tiny_synth_args)
    new = DatasetSpec(**{**tiny_synth_args, "samples_per_scene": 3})
    work = tmp_path / "demo"
    work.mkdir()
    _copy_data(tiny_synth_root, work)
    _write_marker(work, _spec_dict(old), 0, 600.0)
    (work / ".data.abc123.partial").mkdir()  # left by a generation that was killed
    console = _Console(600.0, enabled=True)
    reuse = _prepare_work_dir(work, new, console)
    assert reuse == (False, False)
    assert "was made with other settings: generating it again" in capsys.readouterr().out
    assert not (work / "data").exists() and not (work / ".data.abc123.partial").exists()
    _dataset(work, new, reuse, 0, console)
    marker = json.loads((work / DEMO_MARKER).read_text())
    assert marker["dataset"]["samples_per_scene"] == 3
    samples = json.loads((work / "data" / "v1.0-synth" / "sample.json").read_text())
    assert len(samples) == new.scenes * new.samples_per_scene


# ----------------------------------------------------------------------------------------------------
# The EMA weights of a finished training.


def _fake_stage(stage_dir: Path, position: Position, epoch_files: bool) -> tuple[dict, dict]:
    """A work dir as the trainer leaves it: live weights 1.0, EMA weights 2.0."""
    live = nn.Linear(3, 2).state_dict()
    live = {k: torch.ones_like(v) for k, v in live.items()}
    ema = {"state_dict": {k: torch.full_like(v, 2.0) for k, v in live.items()}, "updates": 30}
    payload = full_checkpoint(model_state=live, optimizer_state={}, ema_state=ema, scaler_state={}, base_lrs=[1e-3],
                              position=position, rngs=[], config={}, environment={}, bad_steps=0)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if epoch_files:
        save_epoch_files(stage_dir, payload, ema, position.epoch, keep=0)
    else:
        save_checkpoint(stage_dir / "last.pth", payload)
    return live, ema


def test_ema_weights_of_a_run_stopped_inside_an_epoch_are_written_out(tmp_path):
    _fake_stage(tmp_path, Position(epoch=3, step_in_epoch=2, global_step=20), epoch_files=False)
    path, what = _ema_weights(tmp_path)
    assert path == tmp_path / "ema.pth" and what == "EMA weights"
    ckpt = load_checkpoint(path)
    weights = extract_state_dict(ckpt, path)
    assert all(bool((v == 2.0).all()) for v in weights.values())
    assert ckpt["updates"] == 30 and ckpt["iter"] == 20


def test_ema_weights_of_a_run_ending_at_an_epoch_end_are_the_trainers_file(tmp_path):
    _fake_stage(tmp_path, Position(epoch=5, step_in_epoch=0, global_step=30), epoch_files=True)
    path, _ = _ema_weights(tmp_path)
    assert path == tmp_path / "epoch_5_ema.pth"
    assert not (tmp_path / "ema.pth").exists()


# ----------------------------------------------------------------------------------------------------
# End to end.


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if isinstance(r.get("loss"), float)]


@pytest.mark.slow
def test_shortened_demo_end_to_end(tmp_path, capsys):
    """Data, baseline, both stages, three evaluations, pictures, loss curve, summary; then a rerun starts over."""
    work = tmp_path / "demo"
    result = run_demo(work, budget_minutes=5, dataset=SHORT, steps=SHORT_STEPS, overrides=["train.log_every=1"])
    out = capsys.readouterr().out
    assert isinstance(result, DemoResult)
    for number in range(1, 8):
        assert f"[demo {number}/7] " in out
    # The demo's phase line, then the trainer's own lines.
    assert f"training stage 1: {SHORT_STEPS[0]} steps" in out and "iter" in out and "eta" in out

    # The training loss falls in both stages.
    for stage, steps in zip(("stage1", "stage2"), SHORT_STEPS):
        losses = _losses(work / stage / "metrics.jsonl")
        assert len(losses) == steps
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, (stage, losses)

    # The baseline scores nothing.
    assert result.untrained["mean_ap"] == pytest.approx(0.0, abs=1e-3)

    # Files: EMA weights that both the evaluation and stage 2 used, pictures, curve, summary.
    assert result.checkpoints["stage1"].is_file() and result.checkpoints["stage2"].is_file()
    stage2_log = (work / "stage2" / "log.txt").read_text()
    assert f"initialised weights from {result.checkpoints['stage1']}" in stage2_log
    assert len(result.pictures) == 3 and all(p.is_file() for p in result.pictures)
    assert result.loss_curve == work / "loss_curves.png" and result.loss_curve.is_file()
    summary = result.summary_txt.read_text()
    for needle in ("untrained", f"stage 1 ({SHORT_STEPS[0]} steps)", f"stage 2 ({SHORT_STEPS[1]} steps)",
                   "mAP (classes with GT)", "AP@4.0",
                   "bevnext train tiny_stage1", "bevnext eval", "--load-from", "wall time"):
        assert needle in summary, needle
    assert summary.strip() in out
    data = json.loads(result.summary_json.read_text())
    assert data["stage2"]["steps"] == SHORT_STEPS[1]
    assert data["stage1"]["checkpoint"] == str(result.checkpoints["stage1"])
    assert result.wall_s > 0 and result.budget_s == 300

    # A rerun into the same folder reuses the dataset and does not mix its runs with the first one's.
    again = run_demo(work, budget_minutes=5, dataset=SHORT, steps=(2, 2),
                     overrides=["train.log_every=1"])
    out = capsys.readouterr().out
    assert f"reusing the synthetic dataset in {work / 'data'}" in out
    assert "the runs start over" in out
    assert len(_losses(work / "stage1" / "metrics.jsonl")) == 2
    assert again.steps == (2, 2)

    # Training beats the untrained model on a scene it never saw (checked last: every other check above holds
    # whatever the scores). Stage 2 starts a new temporal BEV encoder and gets a few tens of steps here, too few
    # to score reliably; its loss falling is checked above.
    assert result.stage1["mean_ap"] > result.untrained["mean_ap"], (
        f"mAP untrained {result.untrained['mean_ap']}, stage 1 {result.stage1['mean_ap']}, "
        f"stage 2 {result.stage2['mean_ap']}")
