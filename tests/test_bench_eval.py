"""``bench/eval.py`` on the tiny stage-2 config: both arms, agreement, FLOP share and the speed-up line.

Only the report's shape is checked (principle 8: no test asserts on wall-clock time or on the speed-up).
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "eval.py"
NUM = r"\d+\.\d+"


def _main():
    return runpy.run_path(str(SCRIPT), run_name="bevnext_bench")["main"]


def test_tiny_report(capsys):
    # Scenes of 2 samples: the third sample starts a new scene, so agreement covers a scene change too.
    # One thread: beside other busy processes two threads wait on each other at every barrier (many times slower).
    args = ["tiny_stage2", "--no-full", "--device", "cpu", "--samples", "2", "--scene-length", "2", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert _main()(args) == 0
    finally:
        torch.set_num_threads(threads)  # the setting is process-wide: leave the rest of the session as it was
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith("config tiny-stage2: C=16, frames=3, input (64, 176), batch 1")
    assert re.search(r"device cpu, torch \S+, threads 1$", lines[0])
    assert "1 warm-up + 2 timed samples per arm" in out and "scenes of 2, 1 samples" in out
    arm = rf"steady {NUM} samples/s, {NUM} ms/sample \(median\) \| with warm-up {NUM} samples/s, warm-up {NUM} ms"
    recompute = re.search(rf"^  recompute: +{arm}.*image part {NUM} ms/frame .*, ({NUM}) frames computed", out, re.M)
    reuse = re.search(rf"^  reuse: +{arm}.*image part {NUM} ms/frame .*, ({NUM}) frames computed", out, re.M)
    assert recompute and reuse
    # Frame counts are not timings: recompute computes every frame's image part, reuse only the new key frame.
    assert float(recompute[1]) == 3.0 and float(reuse[1]) == 1.0
    agreement = re.search(r"^  agreement over 2 samples: max \|reuse - recompute\| heatmap logits (\S+), "
                          r"regression (\S+) .*decoded boxes (\S+) \(2/2 samples .*\) -> agree$", out, re.M)
    assert agreement and all(float(x) >= 0.0 for x in agreement.groups())
    flops = re.search(rf"image part ({NUM}) GFLOP per frame of 6 images, full forward ({NUM}) GFLOP; "
                      rf"image share 3 x {NUM} / {NUM} = ({NUM})%", out)
    assert flops and 0.0 < float(flops[1]) < float(flops[2]) and 0.0 < float(flops[3]) <= 100.0
    assert re.search(rf"^  measured speed-up {NUM}x \(median", out, re.M)
    assert re.search(rf"^  predicted speed-up by FLOPs 1 / \(1 - share x 2/3\) = {NUM}x.*by time: .*-> \S+x$",
                     out, re.M)
    # The tiny shape's line carries its name; with --no-full it is the last line (no unprefixed full-shape line).
    last = re.fullmatch(rf"tiny-stage2: history reuse speed-up: measured ({NUM})x, predicted ({NUM})x", lines[-1])
    assert last and float(last[1]) > 0.0
    # The prediction is the formula applied to the printed share (a number check, not a timing check).
    share = float(flops[3]) / 100
    assert float(last[2]) == pytest.approx(1 / (1 - share * 2 / 3), abs=0.02)
    assert not any(line.startswith("history reuse speed-up") for line in lines)


def test_single_frame_config_is_refused(capsys):
    with pytest.raises(SystemExit):
        _main()(["tiny-stage1", "--no-full"])
    assert "no history to reuse" in capsys.readouterr().err
