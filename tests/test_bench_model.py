"""``bench/model.py``: one preset's report, ``--set``, and ``--compare`` with its ratio lines.

Only the report's shape is checked (principle 8: no test asserts on wall-clock time or memory).
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "model.py"
ARGS = ["tiny-stage1", "--device", "cpu", "--repeats", "1"]


def _main():
    return runpy.run_path(str(SCRIPT), run_name="bevnext_bench")["main"]


def test_one_preset_with_a_setting(capsys):
    assert _main()([*ARGS, "--set", "model.refine_query_chunk=256"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config tiny-stage1:")
    assert re.search(r"^total parameters: \d+$", out, re.M)
    assert re.search(r"^forward \d+\.\d+ s, backward \d+\.\d+ s per step of batch 1", out, re.M)
    assert re.search(r"^peak memory: .*max_rss_mb \d+", out, re.M)


def test_compare_runs_both_settings_and_prints_ratios(capsys):
    assert _main()([*ARGS, "--compare", "model.refine_query_chunk=None"]) == 0
    out = capsys.readouterr().out
    # Two child runs: the preset, then the preset with the compared setting.
    runs = re.findall(r"^\$ .*model\.py tiny-stage1 .*$", out, re.M)
    assert len(runs) == 2 and "--set" not in runs[0] and "--set model.refine_query_chunk=None" in runs[1]
    change = r"tiny-stage1 with model\.refine_query_chunk=None vs without"
    assert re.search(rf"^{change}: step time \d+\.\d\dx \(\d+\.\d+ -> \d+\.\d+ s\)$", out, re.M)
    assert re.search(rf"^{change}: peak memory \(max_rss_mb\) \d+\.\d\dx \(\d+ -> \d+ MB\)$", out, re.M)


def test_a_bad_setting_is_one_line_naming_the_key(capsys):
    assert _main()([*ARGS, "--compare", "model.refine_points=4"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "bench model: model.refine_points=4 must be a positive multiple of the 8 pillar heights of "
        "model.refine_pillar_z=(-5.0, 3.0, 1.0)"
    ]
