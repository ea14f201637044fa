"""The run config: presets carry the reference's numbers, overrides reach every leaf, one source of truth."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from bevnext.config.run import (
    DERIVED_DATA_KEYS,
    RUN_PRESETS,
    RunConfig,
    load_run,
    run_keys,
)
from bevnext.config.stages import stage1 as model_stage1
from bevnext.config.stages import stage2 as model_stage2
from bevnext.config.stages import tiny
from bevnext.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[2] / "bevnext"


def test_stage_presets_carry_the_reference_schedule():
    # reference/bevnext-model.md §5.
    s1, s2 = load_run("stage1"), load_run("stage2")
    for run in (s1, s2):
        t = run.train
        assert (t.batch_size, t.weight_decay, t.betas, t.grad_clip) == (8, 0.01, (0.9, 0.999), 5.0)
        assert (t.warmup_iters, t.warmup_ratio, t.lr_step_epochs) == (200, 0.001, (20,))
        assert (t.ema, t.ema_decay, t.ema_tau, t.ema_init_updates) == (True, 0.999, 2000.0, 10560)
        assert (t.precision, t.log_every, run.runtime.seed) == ("fp32", 50, 0)
        assert run.data.cbgs and run.data.train_split == "train" and run.data.val_split == "val"
        assert (run.eval.batch_size, run.eval.num_workers) == (1, 2)
    assert (s1.train.epochs, s1.train.lr, s1.train.syncbn_start_epoch) == (2, 2e-4, -1)
    assert (s2.train.epochs, s2.train.lr, s2.train.syncbn_start_epoch) == (12, 4e-4, 8)
    assert s1.model == model_stage1() and s2.model == model_stage2()


@pytest.mark.parametrize("name", sorted(RUN_PRESETS))
def test_data_geometry_follows_the_model(name):
    run = load_run(name)
    assert run.name == name
    assert run.data.input_size == run.model.input_size
    assert run.data.point_cloud_range == run.model.point_cloud_range
    assert run.data.depth_range == run.model.depth_range[:2]
    assert run.data.num_frames == run.model.num_frames
    changed = load_run(name, ["model.input_size=(128, 352)", "model.num_frames=3",
                              "model.depth_range=(2.0, 42.0, 5.0)"])
    assert changed.data.input_size == (128, 352) and changed.data.num_prev_frames == 2
    assert changed.data.depth_range == (2.0, 42.0)


def test_tiny_presets_are_the_tiny_models_on_synthetic_data():
    t1, t2 = load_run("tiny_stage1"), load_run("tiny-stage2")
    assert t1.model == tiny(1) and t2.model == tiny(2)
    assert t1.data.train_split == "synth_train" and t1.data.val_split == "synth_val"
    assert t2.data.num_frames == 3


def test_every_leaf_takes_an_override():
    base = load_run("stage2")
    for key in run_keys():
        section, _, leaf = key.rpartition(".")
        value = getattr(getattr(base, section) if section else base, leaf)
        assert load_run("stage2", [f"{key}={value!r}"]) == base, key
    assert load_run("stage2", ["train.lr=1e-3", "model.crf_init_weight=0.5", "runtime.device=cpu"]).train.lr == 1e-3


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        ("trian.epochs=3", "did you mean 'train.epochs'?"),
        ("model.contxt_channels=8", "did you mean 'model.context_channels'?"),
        ("data.input_size=(1, 2)", "'data.input_size' follows 'model.input_size'"),
        ("data.num_prev_frames=8", "'data.num_prev_frames' follows 'model.num_frames'"),
        ("train.precision=fp8", "train.precision='fp8'"),
        ("train.epochs=two", "config key 'train.epochs'"),
        ("train.batch_size=0", "train.batch_size=0"),
        ("runtime.device=tpu", "runtime.device='tpu'"),
        ("train", "is not of the form key=value"),
    ],
)
def test_bad_keys_and_values_are_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_run("stage1", [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_suggests_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'stage2'"):
        load_run("stag2")


def test_resolved_config_repeats_the_run(tmp_path):
    run = load_run("tiny_stage2", ["train.lr=3e-4", "data.data_root=/x/y", "model.input_size=(128, 352)"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(run.to_dict()))
    assert not set(run.to_dict()["data"]) & {k.split(".")[1] for k in DERIVED_DATA_KEYS}
    again = load_run(str(path))
    assert again == run
    assert load_run(str(path), ["train.epochs=3"]).train.epochs == 3


def test_bad_config_file_names_the_file_and_key(tmp_path):
    values = load_run("tiny_stage1").to_dict()
    values["train"]["lrr"] = 1.0
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=r"config.json: unknown config key 'train.lrr'; did you mean 'train.lr'"):
        load_run(str(path))
    values = load_run("tiny_stage1").to_dict()
    values["data"]["input_size"] = [1, 2]
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match="follows 'model.input_size'"):
        load_run(str(path))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable JSON config"):
        load_run(str(path))


# Where each section is read, and the names it is read through. A field that no consumer reads is a
# setting that silently does nothing (as the CRF's initial weight once was).
_CONSUMERS = {
    "model": (["models/detector.py"], ["cfg"]),
    "data": (["data/*.py"], ["cfg"]),
    "train": (["engine/trainer.py"], ["t", r"run\.train"]),
    "eval": (["data/loader.py", "engine/evaluate.py"], ["eval_cfg", r"run\.eval"]),
    "runtime": (["engine/trainer.py", "engine/launch.py"], [r"run\.runtime"]),
    "": (["engine/trainer.py", "cli.py"], ["run"]),
}


def test_every_config_field_is_read():
    unread = []
    for key in run_keys():
        section, _, leaf = key.rpartition(".")
        globs, names = _CONSUMERS[section]
        text = "\n".join(p.read_text() for g in globs for p in sorted(PACKAGE.glob(g)))
        if not re.search(rf"\b(?:{'|'.join(names)})\.{leaf}\b", text):
            unread.append(key)
    assert not unread, f"config fields nobody reads: {unread}"


def test_run_config_sections_are_frozen():
    run = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.train.lr = 1.0  # type: ignore[misc]
