"""``bench/train.py``: both arms and the ratio line, and the skipped loader arm without a data root.

Only the report's shape is checked (principle 8: no test asserts on wall-clock time).
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train.py"
ARGS = ["tiny_stage1", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "1"]
RATE = r"steady \d+\.\d+ samples/s"


def _main():
    return runpy.run_path(str(SCRIPT), run_name="bevnext_bench")["main"]


def test_both_arms_and_ratio(tiny_synth_root, capsys):
    assert _main()([*ARGS, "--data-root", str(tiny_synth_root), "data.src_size=[400,225]"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config tiny_stage1:")
    assert "device cpu" in out and "threads" in out and "torch" in out
    assert re.search(rf"^synthetic batches: +{RATE}", out, re.M)
    assert re.search(rf"^with the data loader: +{RATE} .*data wait \d+\.\d+ ms/step", out, re.M)
    assert re.search(r"^loader-in-the-loop / synthetic: \d+\.\d+x \(the (loader|step) limits: ", out, re.M)
    assert "skipped" not in out


def test_without_data_root_skips_the_loader_arm(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the preset's relative data/synth does not exist here
    assert _main()(ARGS) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^synthetic batches: +{RATE}", out, re.M)
    assert re.search(r"^with the data loader: skipped — no data root given", out, re.M)
    assert "loader-in-the-loop / synthetic: n/a (loader arm skipped)" in out


def _arm(name, step_ms, wait_ms=()):
    arm = runpy.run_path(str(SCRIPT), run_name="bevnext_bench")["_Arm"](name)
    arm.step_s = [ms / 1e3 for ms in step_ms]
    arm.wait_s = [ms / 1e3 for ms in wait_ms]
    return arm


def test_verdict_tells_slow_steps_from_a_slow_loader():
    verdict = runpy.run_path(str(SCRIPT), run_name="bevnext_bench")["_verdict"]
    synth = _arm("synthetic batches", [100, 100, 100, 100])
    # Waits of ~1 ms, one slow step: the step limits, the lower mean rate is noise.
    steps = [100, 100, 100, 160]
    text = verdict(synth, _arm("with the data loader", steps, [1, 1, 1, 1]), 0, 0.88)
    assert text.startswith("the step limits: data wait 1.0 ms of 100.0 ms/step (medians)") and "160.0 ms" in text
    # Short waits but one long one: the loader limits now and then.
    text = verdict(synth, _arm("with the data loader", steps, [1, 1, 1, 60]), 0, 0.88)
    assert text.startswith("the loader limits now and then: the median data wait is 1.0 ms") and "60.0 ms" in text
    # Long waits on every step: the loader limits.
    text = verdict(synth, _arm("with the data loader", [150] * 4, [50] * 4), 0, 0.67)
    assert text.startswith("the loader limits: it waits 50.0 ms/step for batches")
