"""What the demo shows at the end: the scores of its three evaluations and the loss curve of its two trainings.

Pure functions on plain inputs (metrics dicts from ``bevnext.eval.nusc_eval.evaluate_nusc``, the trainer's
``metrics.jsonl`` files), so that each piece is tested on small fake inputs. The loss curve is drawn with PIL:
matplotlib is not a dependency of the package.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from bevnext.eval.visualize import sized_font
from bevnext.io import atomic_write_bytes

__all__ = [
    "SCORE_COLUMNS",
    "LossSeries",
    "chain_loss_series",
    "draw_loss_curves",
    "format_clock",
    "read_losses",
    "score_line",
    "scores",
    "scores_table",
]

SCORE_COLUMNS: tuple[str, ...] = (
    "mAP (classes with GT)", "mAP", "NDS", "mATE", "mAVE", "AP@0.5", "AP@1.0", "AP@2.0", "AP@4.0",
)
"""The columns of the summary table, in order; ``scores`` returns a dict with exactly these keys."""

_DISTANCES = (0.5, 1.0, 2.0, 4.0)
"""The devkit's match distances (metres, centre distance on the ground plane) of ``detection_cvpr_2019``."""


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def scores(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one row of the summary table, keyed by ``SCORE_COLUMNS``.

    ``mAP`` and ``NDS`` are the devkit's official values (means over its ten classes). The other columns are
    means over the classes with ground truth in the split (``metrics["classes_with_gt"]``): a synthetic split
    lacks some classes, and the official means count each of those as AP 0 / error 1, which hides what the
    model does on the classes that are there. NaN where a number is undefined (no class with ground truth).

    Args:
        metrics: a metrics dict from ``evaluate_nusc`` (``EvalResult.metrics``).
    """
    with_gt = list(metrics.get("classes_with_gt", []))
    label_aps = metrics.get("label_aps", {})
    tp = metrics.get("tp_errors_classes_with_gt", {})
    row = {
        "mAP (classes with GT)": float(metrics.get("map_classes_with_gt", math.nan)),
        "mAP": float(metrics["mean_ap"]),
        "NDS": float(metrics["nd_score"]),
        "mATE": float(tp.get("trans_err", math.nan)),
        "mAVE": float(tp.get("vel_err", math.nan)),
    }
    for distance in _DISTANCES:
        per_class = []
        for name in with_gt:
            # The devkit's distances are float keys; once through JSON they are strings ("0.5", "1.0", ...).
            by_distance = {float(key): value for key, value in label_aps.get(name, {}).items()}
            per_class.append(float(by_distance.get(distance, math.nan)))
        row[f"AP@{distance:.1f}"] = _mean(per_class)
    return row


def _num(value: float, digits: int = 4) -> str:
    # Four decimals, as the devkit prints them: an AP of 0.0001 after a short training must not read as zero.
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def score_line(name: str, metrics: Mapping[str, Any]) -> str:
    """One line with the headline scores of an evaluation, e.g. for the console after each evaluation::

        stage 1: mAP (classes with GT) 0.2130 | mAP 0.1280 | NDS 0.2010 | mAVE 0.9340 | AP@0.5/1/2/4 0.021/...
    """
    s = scores(metrics)
    aps = "/".join(_num(s[f"AP@{d:.1f}"], 3) for d in _DISTANCES)
    return (f"{name}: mAP (classes with GT) {_num(s['mAP (classes with GT)'])} | mAP {_num(s['mAP'])} | "
            f"NDS {_num(s['NDS'])} | mAVE {_num(s['mAVE'])} | AP@0.5/1/2/4 {aps}")


def scores_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """The summary table: one row per ``(name, metrics)``, the columns ``SCORE_COLUMNS``, plain text.

    Returns:
        The header line, a rule and one line per row (no newlines), columns aligned with spaces.
    """
    names = [name for name, _ in rows]
    first = max([len(n) for n in names] + [len("model")])
    widths = [max(len(title), 6) for title in SCORE_COLUMNS]  # 6: 0.1234
    header = "  ".join([f"{'model':<{first}}", *(f"{t:>{w}}" for t, w in zip(SCORE_COLUMNS, widths))])
    lines = [header, "-" * len(header)]
    for name, metrics in rows:
        s = scores(metrics)
        cells = (f"{_num(s[t]):>{w}}" for t, w in zip(SCORE_COLUMNS, widths))
        lines.append("  ".join([f"{name:<{first}}", *cells]))
    return lines


def format_clock(seconds: float) -> str:
    """Seconds as ``M:SS`` (minutes unbounded: ``75:03``), the demo's elapsed/budget notation."""
    total = max(0, int(round(seconds)))
    return f"{total // 60}:{total % 60:02d}"


# ----------------------------------------------------------------------------------------------------
# Loss curves.


@dataclass(frozen=True)
class LossSeries:
    """One training's total loss per logged step, on the x axis it is drawn at.

    Attributes:
        label: the legend entry (e.g. ``stage 1``).
        steps: x positions (optimizer steps, increasing).
        losses: the total loss at each of ``steps``.
    """

    label: str
    steps: tuple[int, ...]
    losses: tuple[float, ...]


def read_losses(metrics_jsonl: str | Path) -> list[tuple[int, float]]:
    """``(iteration, total loss)`` of every logged training step in a run's ``metrics.jsonl``.

    Lines without a finite numeric ``loss`` (evaluation records, a non-finite loss the writer stored as the
    string ``"nan"``) are left out; so is a line that does not parse (a run killed while writing it).
    """
    points = []
    for line in Path(metrics_jsonl).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        loss, step = record.get("loss"), record.get("iteration")
        if isinstance(loss, int | float) and not isinstance(loss, bool) and math.isfinite(loss) and \
                isinstance(step, int):
            points.append((step, float(loss)))
    return points


def chain_loss_series(stages: Sequence[tuple[str, Sequence[tuple[int, float]]]]) -> list[LossSeries]:
    """Put trainings one after the other on a shared x axis.

    Each training counts its steps from 1; stage ``k`` is shifted by the last step of the stages before it,
    so that stage 2 continues where stage 1 ended.

    Args:
        stages: ``(label, [(step, loss), ...])`` per training, in training order.
    """
    offset = 0
    out = []
    for label, points in stages:
        steps = tuple(offset + step for step, _ in points)
        out.append(LossSeries(label, steps, tuple(loss for _, loss in points)))
        if steps:
            offset = steps[-1]
    return out


def _nice_step(span: float, target: int) -> float:
    """A 1 / 2 / 5 x 10^k step that cuts ``span`` into about ``target`` intervals."""
    raw = span / max(1, target)
    power = 10.0 ** math.floor(math.log10(raw))
    for mult in (1.0, 2.0, 5.0, 10.0):
        if raw <= mult * power:
            return mult * power
    return 10.0 * power


def _linear_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    step = _nice_step(hi - lo, target)
    first = math.ceil(lo / step) * step
    ticks = []
    value = first
    while value <= hi + 1e-9 * step:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis from ``lo`` to ``hi`` (> 0): decades, with 2 and 5 (or every digit) between
    them when the range is short, so that there are always a few labelled ticks."""
    decades = math.log10(hi) - math.log10(lo)
    mults = (1,) if decades > 3 else (1, 2, 5) if decades > 1 else (1, 2, 3, 4, 5, 6, 7, 8, 9)
    ticks = []
    for power in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for mult in mults:
            value = mult * 10.0**power
            if lo <= value <= hi:
                ticks.append(value)
    if len(ticks) < 2:  # within one digit step (e.g. 2.1 .. 2.9): fall back to linear values on the log axis
        ticks = [v for v in _linear_ticks(lo, hi, 4) if v > 0]
    return ticks


def _tick_label(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.0e}"


_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
"""Series colours, one per training (blue, orange, then green and red should there be more)."""


def draw_loss_curves(
    series: Sequence[LossSeries],
    out_png: str | Path,
    title: str = "training loss",
    size: tuple[int, int] = (960, 560),
) -> Path:
    """Draw the trainings' loss curves into one PNG: axes with ticks and labels, a legend, stage boundaries.

    The y axis is logarithmic when every loss is positive (a detector's total loss falls over orders of
    magnitude early on, then slowly), linear otherwise. A dashed vertical line marks where each training after
    the first starts. Written atomically.

    Args:
        series: the trainings, e.g. from ``chain_loss_series``.
        out_png: the PNG to write.
        title: drawn above the plot.
        size: ``(width, height)`` in pixels.

    Returns:
        ``out_png``.
    """
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = sized_font(max(12, height // 32)), sized_font(max(10, height // 40))
    left, right, top, bottom = 90, 24, 48, 70  # margins around the plot area: room for tick labels and titles
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot area; y0 is the top edge

    xs = [s for ser in series for s in ser.steps]
    ys = [v for ser in series for v in ser.losses]
    log_y = bool(ys) and min(ys) > 0
    if xs:
        x_lo, x_hi = min(0, min(xs)), max(xs)
        x_hi = x_hi if x_hi > x_lo else x_lo + 1
    else:
        x_lo, x_hi = 0, 1
    if ys:
        if log_y:
            # 5 % of the range (in log space) as padding above and below, so no point sits on the frame.
            a, b = math.log10(min(ys)), math.log10(max(ys))
            pad = max(0.05 * (b - a), 0.02)
            y_lo, y_hi = 10 ** (a - pad), 10 ** (b + pad)
        else:
            pad = max(0.05 * (max(ys) - min(ys)), 1e-6)
            y_lo, y_hi = min(ys) - pad, max(ys) + pad
    else:  # nothing to draw: an empty frame with a note
        log_y, y_lo, y_hi = True, 0.1, 10.0

    def px(step: float) -> float:
        return x0 + (step - x_lo) / (x_hi - x_lo) * (x1 - x0)

    def py(value: float) -> float:
        if log_y:
            frac = (math.log10(value) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo))
        else:
            frac = (value - y_lo) / (y_hi - y_lo)
        return y1 - frac * (y1 - y0)

    # Grid and ticks.
    grid, axis, text = (228, 228, 228), (60, 60, 60), (30, 30, 30)
    for value in _linear_ticks(x_lo, x_hi):
        x = px(value)
        draw.line([(x, y0), (x, y1)], fill=grid)
        draw.line([(x, y1), (x, y1 + 5)], fill=axis)
        label = _tick_label(value)
        w = draw.textlength(label, font=small)
        draw.text((x - w / 2, y1 + 8), label, fill=text, font=small)
    for value in (_log_ticks(y_lo, y_hi) if log_y else _linear_ticks(y_lo, y_hi)):
        y = py(value)
        draw.line([(x0, y), (x1, y)], fill=grid)
        draw.line([(x0 - 5, y), (x0, y)], fill=axis)
        label = _tick_label(value)
        w = draw.textlength(label, font=small)
        bbox = draw.textbbox((0, 0), label, font=small)
        draw.text((x0 - 8 - w, y - (bbox[3] - bbox[1]) / 2 - bbox[1]), label, fill=text, font=small)
    draw.rectangle([x0, y0, x1, y1], outline=axis)

    # Legend geometry (drawn last, top right inside the plot): boundary labels keep clear of it.
    row_h = int(small.size if hasattr(small, "size") else 12) + 8
    labels = [ser.label for ser in series]
    box_w = int(max((draw.textlength(lab, font=small) for lab in labels), default=0)) + 52
    bx1, by0 = x1 - 10, y0 + 10
    bx0, by1 = bx1 - box_w, by0 + row_h * len(series) + 8

    # Stage boundaries: where each training after the first begins, labelled left of the line when the
    # label would run into the legend.
    for before, ser in zip(series, series[1:]):
        if ser.steps and before.steps:
            x = px(before.steps[-1])
            for y in range(int(y0), int(y1), 12):
                draw.line([(x, y), (x, min(y + 6, y1))], fill=(120, 120, 120), width=1)
            note = f"{ser.label} starts"
            w = draw.textlength(note, font=small)
            draw.text((x + 4 if x + 4 + w < bx0 - 4 else x - 4 - w, y0 + 4), note, fill=(90, 90, 90), font=small)

    # The curves.
    for index, ser in enumerate(series):
        colour = _COLOURS[index % len(_COLOURS)]
        points = [(px(s), py(v)) for s, v in zip(ser.steps, ser.losses)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        # Markers only while they stay apart; a long run's hundreds of points would merge into a thick band.
        radius = 3.0 if len(points) <= 60 else 0.0
        for x, y in points if radius else []:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    if not ys:
        msg = "no training loss was logged"
        w = draw.textlength(msg, font=font)
        draw.text(((x0 + x1 - w) / 2, (y0 + y1) / 2), msg, fill=(150, 150, 150), font=font)

    # Legend, top right inside the plot.
    if series:
        draw.rectangle([bx0, by0, bx1, by1], fill="white", outline=(180, 180, 180))
        for index, lab in enumerate(labels):
            cy = by0 + 4 + row_h * index + row_h / 2
            colour = _COLOURS[index % len(_COLOURS)]
            draw.line([(bx0 + 8, cy), (bx0 + 36, cy)], fill=colour, width=3)
            bbox = draw.textbbox((0, 0), lab, font=small)
            draw.text((bx0 + 44, cy - (bbox[3] - bbox[1]) / 2 - bbox[1]), lab, fill=text, font=small)

    # Titles: plot title, x label below the ticks, y label rotated along the left edge.
    w = draw.textlength(title, font=font)
    draw.text(((x0 + x1 - w) / 2, 12), title, fill=text, font=font)
    x_label = "optimizer step (stage 2 continues the count of stage 1)" if len(series) > 1 else "optimizer step"
    w = draw.textlength(x_label, font=font)
    draw.text(((x0 + x1 - w) / 2, height - 32), x_label, fill=text, font=font)
    y_label = "total loss" + (" (log scale)" if log_y else "")
    bbox = draw.textbbox((0, 0), y_label, font=font)
    label_img = Image.new("RGB", (bbox[2] + 4, bbox[3] + 4), "white")
    ImageDraw.Draw(label_img).text((2, 2), y_label, fill=text, font=font)
    label_img = label_img.rotate(90, expand=True)
    image.paste(label_img, (8, int((y0 + y1 - label_img.height) / 2)))

    out_png = Path(out_png)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(out_png, buffer.getvalue())
    return out_png
