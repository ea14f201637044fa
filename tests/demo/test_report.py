"""The demo's report pieces on small fake inputs: scores, table, loss reading, the loss-curve PNG, the plan."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from bevnext.demo.report import (
    SCORE_COLUMNS,
    LossSeries,
    chain_loss_series,
    draw_loss_curves,
    format_clock,
    read_losses,
    score_line,
    scores,
    scores_table,
)
from bevnext.demo.runner import _Planner
from bevnext.errors import BevnextError


def _metrics(car: dict[str, float], ped: dict[str, float], mean_ap: float = 0.1) -> dict:
    """A metrics dict shaped like evaluate_nusc's after a trip through JSON (distance keys are strings)."""
    return {
        "mean_ap": mean_ap,
        "nd_score": 0.2,
        "classes_with_gt": ["car", "pedestrian"],
        "map_classes_with_gt": (sum(car.values()) / 4 + sum(ped.values()) / 4) / 2,
        "label_aps": {"car": car, "pedestrian": ped, "truck": {"0.5": 0.9, "1.0": 0.9, "2.0": 0.9, "4.0": 0.9}},
        "tp_errors_classes_with_gt": {"trans_err": 0.5, "vel_err": 1.25, "scale_err": 0.3},
        "tp_errors": {"trans_err": 0.8, "vel_err": 1.0},
    }


CAR = {"0.5": 0.1, "1.0": 0.2, "2.0": 0.4, "4.0": 0.6}
PED = {"0.5": 0.0, "1.0": 0.1, "2.0": 0.2, "4.0": 0.4}


def test_scores_average_distance_aps_over_classes_with_ground_truth_only():
    s = scores(_metrics(CAR, PED))
    assert list(s) == list(SCORE_COLUMNS)
    # truck has no ground truth in this split: its 0.9s must not count.
    assert s["AP@0.5"] == pytest.approx(0.05)
    assert s["AP@1.0"] == pytest.approx(0.15)
    assert s["AP@2.0"] == pytest.approx(0.3)
    assert s["AP@4.0"] == pytest.approx(0.5)
    assert s["mAP"] == 0.1 and s["NDS"] == 0.2
    assert s["mATE"] == 0.5 and s["mAVE"] == 1.25


def test_scores_of_a_split_without_ground_truth_are_nan_not_an_error():
    m = _metrics(CAR, PED)
    m["classes_with_gt"] = []
    m["map_classes_with_gt"] = float("nan")
    s = scores(m)
    assert math.isnan(s["AP@0.5"]) and math.isnan(s["mAP (classes with GT)"])
    assert "n/a" in score_line("x", m)


def test_score_line_and_table():
    line = score_line("stage 1", _metrics(CAR, PED))
    assert line.startswith("stage 1: mAP (classes with GT) ")
    assert "mAP 0.1000" in line and "NDS 0.2000" in line and "mAVE 1.2500" in line
    assert "AP@0.5/1/2/4 0.050/0.150/0.300/0.500" in line
    rows = [("untrained", _metrics(CAR, PED, 0.0)), ("stage 2 (20 steps)", _metrics(CAR, PED, 0.25))]
    table = scores_table(rows)
    assert len(table) == 4
    assert all(title in table[0] for title in SCORE_COLUMNS)
    assert len({len(line) for line in table}) == 1  # every line as wide as the header: columns line up
    assert table[3].startswith("stage 2 (20 steps)") and "0.2500" in table[3]


def test_format_clock():
    assert format_clock(0) == "0:00"
    assert format_clock(42.4) == "0:42"
    assert format_clock(600) == "10:00"
    assert format_clock(4503) == "75:03"
    assert format_clock(-3) == "0:00"


def test_read_losses_keeps_logged_training_steps_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"iteration": 10, "loss": 5.0, "lr": 1e-3},
        {"iteration": 20, "loss": "nan"},  # a non-finite loss, as MetricWriter stores it
        {"iteration": 20, "epoch": 1, "eval_mAP": 0.1},  # an evaluation record
        {"iteration": 30, "loss": 2.5},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"iteration\": 40, \"lo", encoding="utf-8")
    assert read_losses(path) == [(10, 5.0), (30, 2.5)]


def test_chain_loss_series_continues_the_step_count():
    series = chain_loss_series([("stage 1", [(10, 3.0), (20, 2.0)]), ("stage 2", [(5, 1.5), (10, 1.0)])])
    assert series[0] == LossSeries("stage 1", (10, 20), (3.0, 2.0))
    assert series[1] == LossSeries("stage 2", (25, 30), (1.5, 1.0))
    empty_first = chain_loss_series([("a", []), ("b", [(1, 1.0)])])
    assert empty_first[1].steps == (1,)


def _colour_pixels(path, colour, tol=40):
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.asarray(colour, dtype=np.int16)) <= tol).all(axis=-1).sum())


@pytest.mark.parametrize("losses", [
    [800.0 / (1 + i) for i in range(40)],  # positive: log scale over more than two decades
    [2.5 - 0.01 * i for i in range(40)],  # within one decade
    [1.0 - 0.05 * i for i in range(40)],  # reaches zero and below: linear scale
])
def test_draw_loss_curves_writes_a_png_with_both_series(tmp_path, losses):
    series = chain_loss_series([("stage 1", list(zip(range(1, 31), losses[:30]))),
                                ("stage 2", list(zip(range(1, 11), losses[30:])))])
    out = draw_loss_curves(series, tmp_path / "curve.png", size=(640, 400))
    assert out == tmp_path / "curve.png"
    image = Image.open(out)
    assert image.size == (640, 400) and image.format == "PNG"
    assert _colour_pixels(out, (31, 119, 180), 10) > 100  # stage 1, blue
    assert _colour_pixels(out, (255, 127, 14), 10) > 30  # stage 2, orange
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left behind


def test_draw_loss_curves_without_any_point(tmp_path):
    out = draw_loss_curves(chain_loss_series([("stage 1", []), ("stage 2", [])]), tmp_path / "empty.png")
    assert Image.open(out).size == (960, 560)
    single = draw_loss_curves([LossSeries("one", (7,), (3.0,))], tmp_path / "one.png")
    assert _colour_pixels(single, (31, 119, 180), 10) > 5


def test_plan_fits_the_budget_and_refuses_a_budget_too_short():
    planner = _Planner(budget_s=600.0, step_s=(0.4, 0.8), eval_s=15.0)
    (s1, s2), train_s = planner.first_plan(left_s=560.0)
    assert s1 >= 1 and s2 >= 1
    assert s1 * 0.4 + s2 * 0.8 <= train_s <= 560.0
    fixed = 560.0 - train_s
    assert fixed >= 15.0 + 2 * planner.overhead_s  # both evaluations and both trainings' fixed costs are kept
    with pytest.raises(BevnextError, match="too short.*--budget-minutes"):
        _Planner(budget_s=60.0, step_s=(0.4, 0.8), eval_s=15.0).first_plan(left_s=40.0)


def test_stage2_plan_uses_the_time_left_and_the_real_step_time():
    planner = _Planner(budget_s=600.0, step_s=(0.4, 0.8), eval_s=15.0)
    first, _ = planner.first_plan(left_s=560.0)
    planner.slowdown = 1.5  # stage 1's real steps took 1.5 x the measured time
    steps, train_s = planner.stage2_plan(left_s=250.0, first=first)
    assert 1 <= steps and steps * 0.8 * 1.5 <= train_s < 250.0
    fewer, _ = planner.stage2_plan(left_s=120.0, first=first)
    assert fewer < steps
    assert planner.stage2_plan(left_s=1.0, first=first)[0] == 1  # never zero: stage 2 always trains
