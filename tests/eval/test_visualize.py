"""Pictures of predictions against ground truth (``bevnext.eval.visualize.draw_sample``).

Every check reads pixels of the written PNG at positions computed here from the documented layout (panel
sizes, the bird's-eye mapping: ego at the centre, x forward up, y left left, ±55 m across ``2 * ph`` pixels)
and the projection helpers, whose own pixel accuracy ``tests/eval/test_check_data.py`` checks by hand.
The dataset is the shared ``tiny_synth_root``: 400 x 225 images, so panels are 400 x 225 and the bird's-eye
panel is 450 x 450 (about 4.1 px per metre).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bevnext.data.infos import info_path, load_infos
from bevnext.eval.visualize import (
    ARROW_SECONDS,
    CLASS_COLOURS,
    GRID,
    GT_COLOUR,
    draw_sample,
    project_box_edges,
)
from bevnext.structures.boxes import CLASSES, box_corners

PW, PH = 400, 225  # camera panel size at the tiny dataset's image size (below max_panel_width)
SIDE = 2 * PH  # the bird's-eye panel
BEV_LEFT = 3 * PW  # its left edge in the picture
PX_PER_M = SIDE / 110.0  # ±55 m across the panel
CAR = CLASSES.index("car")


@pytest.fixture(scope="module")
def infos(tiny_synth_root) -> list[dict[str, Any]]:
    """The 8 samples of the tiny dataset (train and val)."""
    return [info for split in ("synth_train", "synth_val")
            for info in load_infos(info_path(tiny_synth_root, split)).infos]


def _gt(info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(info["gt_boxes"], dtype=np.float64).reshape(-1, 9),
            np.asarray(info["gt_labels"], dtype=np.int64))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB")).astype(np.int64)


def _bev_px(xy: np.ndarray) -> np.ndarray:
    """Key-ego (x, y) metres -> picture pixels (u, v), from the documented bird's-eye layout."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return np.stack([BEV_LEFT + SIDE / 2 - xy[:, 1] * PX_PER_M, SIDE / 2 - xy[:, 0] * PX_PER_M], axis=1)


def _near(pixels: np.ndarray, uv: np.ndarray, colour: tuple[int, int, int], radius: int = 1) -> bool:
    """Whether ``colour`` is exactly in the (2r+1)^2 neighbourhood of pixel ``uv`` (PIL rounds line ends)."""
    u, v = int(round(uv[0])), int(round(uv[1]))
    patch = pixels[max(0, v - radius): v + radius + 1, max(0, u - radius): u + radius + 1]
    return bool((patch == colour).all(axis=-1).any())


def _edge_points(boxes: np.ndarray, info: dict[str, Any]) -> list[tuple[np.ndarray, int]]:
    """Points along the box edges seen in each camera, as (picture pixel, box index).

    Points near a panel border (where lines are clipped) and under the camera name are left out.
    """
    points = []
    for row, channels in enumerate(GRID):
        for col, channel in enumerate(channels):
            segments, visible = project_box_edges(boxes, info, channel)
            for i, e in zip(*np.nonzero(visible)):
                a, b = segments[i, e]
                for t in np.linspace(0.1, 0.9, 9):
                    u, v = a + t * (b - a)  # image pixels = panel pixels at this size
                    if 3 <= u < PW - 3 and 3 <= v < PH - 3 and not (u < 140 and v < 22):
                        points.append((np.array([col * PW + u, row * PH + v]), int(i)))
    return points


def _busiest(infos: list[dict[str, Any]]) -> dict[str, Any]:
    return max(infos, key=lambda info: len(info["gt_boxes"]))


# ------------------------------------------------------------------------------------------------------------


def test_picture_size_as_documented_for_every_mode_and_empty_sets(infos, tiny_synth_root, tmp_path):
    info = _busiest(infos)
    gt, gt_labels = _gt(info)
    cases = {
        "gt_only": dict(boxes=gt, labels=gt_labels),
        "compare": dict(boxes=gt[:3], labels=gt_labels[:3], scores=[0.9, 0.5, 0.3], gt_boxes=gt, gt_labels=gt_labels),
        "no_predictions": dict(boxes=np.zeros((0, 9)), labels=[], scores=[], gt_boxes=gt, gt_labels=gt_labels),
        "no_gt": dict(boxes=gt[:2], labels=gt_labels[:2], scores=[0.8, 0.7], gt_boxes=np.zeros((0, 9)),
                      gt_labels=[]),
        "nothing": dict(boxes=[], labels=[], gt_boxes=[], gt_labels=[]),
    }
    for name, kwargs in cases.items():
        out = draw_sample(tiny_synth_root, info, out_png=tmp_path / name / "p.png", **kwargs)
        assert out == tmp_path / name / "p.png"
        # (3 * pw + 2 * ph) x (2 * ph); written atomically: no temporary file is left next to it.
        assert _pixels(out).shape == (2 * PH, 3 * PW + SIDE, 3), name
        assert os.listdir(out.parent) == ["p.png"], name
    # Panels narrower than the image: pw = max_panel_width, ph = round(225 * 200 / 400) = 112.
    out = draw_sample(tiny_synth_root, info, gt, gt_labels, tmp_path / "small.png", max_panel_width=200,
                      gt_boxes=gt, gt_labels=gt_labels)
    assert _pixels(out).shape == (224, 3 * 200 + 224, 3)


def test_ground_truth_edges_are_white_in_every_camera_panel(infos, tiny_synth_root, tmp_path):
    info = _busiest(infos)
    gt, gt_labels = _gt(info)
    none = dict(boxes=np.zeros((0, 9)), labels=[], scores=[])
    with_gt = _pixels(draw_sample(tiny_synth_root, info, out_png=tmp_path / "gt.png", gt_boxes=gt,
                                  gt_labels=gt_labels, **none))
    without = _pixels(draw_sample(tiny_synth_root, info, out_png=tmp_path / "none.png", gt_boxes=np.zeros((0, 9)),
                                  gt_labels=[], **none))
    points = _edge_points(gt, info)
    assert len(points) > 200
    panels_hit = {(int(uv[0]) // PW, int(uv[1]) // PH) for uv, _ in points}
    assert len(panels_hit) >= 4  # the boxes are seen all around, so the per-camera placement is checked
    drawn = np.mean([_near(with_gt, uv, GT_COLOUR) for uv, _ in points])
    bare = np.mean([_near(without, uv, GT_COLOUR) for uv, _ in points])
    assert drawn > 0.97, drawn
    assert bare < 0.2, bare  # the camera images themselves are rarely pure white there


def test_prediction_on_its_ground_truth_shows_both(infos, tiny_synth_root, tmp_path):
    # A perfect prediction: the white ground truth on top of it must not hide its class-coloured band. One
    # box per picture, so that no other box's lines or label cover the edges; the four most visible boxes.
    info = _busiest(infos)
    gt, gt_labels = _gt(info)
    seen = sorted(range(len(gt)), key=lambda i: -len(_edge_points(gt[i : i + 1], info)))[:4]
    both = []
    for i in seen:
        one, label = gt[i : i + 1], gt_labels[i : i + 1]
        pixels = _pixels(draw_sample(tiny_synth_root, info, one, label, tmp_path / f"{i}.png", scores=[1.0],
                                     gt_boxes=one, gt_labels=label))
        colour = CLASS_COLOURS[CLASSES[label[0]]]
        both += [_near(pixels, uv, GT_COLOUR) and _near(pixels, uv, colour) for uv, _ in _edge_points(one, info)]
    assert len(both) > 300
    assert np.mean(both) > 0.95, np.mean(both)


def _isolated_box(infos: list[dict[str, Any]], shift: np.ndarray) -> tuple[dict[str, Any], int]:
    """A sample and one of its GT boxes behind the ego (lower half of the bird's-eye panel, away from the
    legend) whose shifted copy is at least 4 m from every GT centre."""
    for info in infos:
        gt, _ = _gt(info)
        for j, box in enumerate(gt):
            moved = box[:2] + shift
            if box[0] < -10 and moved[0] < -10 and abs(moved[1]) < 40 and box[3] < 6:
                if np.linalg.norm(gt[:, :2] - moved, axis=1).min() >= 4.0:
                    return info, j
    raise AssertionError("no suitable box in the tiny dataset")


@pytest.mark.parametrize("shift", [(0.0, 5.0), (5.0, 0.0), (0.0, -5.0)], ids=["left", "forward", "right"])
def test_prediction_shifted_by_5_m_is_drawn_there_in_its_class_colour(infos, tiny_synth_root, tmp_path, shift):
    shift = np.asarray(shift)
    info, j = _isolated_box(infos, shift)
    gt, gt_labels = _gt(info)
    pred = gt[j : j + 1].copy()
    pred[0, :2] += shift
    pred[0, 7:9] = 0.0  # no arrow: only the footprint and the heading tick are in the class colour
    label = int(gt_labels[j])
    colour = CLASS_COLOURS[CLASSES[label]]
    pixels = _pixels(draw_sample(tiny_synth_root, info, pred, [label], tmp_path / "p.png", scores=[0.9],
                                 gt_boxes=gt, gt_labels=gt_labels))
    bev = pixels[:, BEV_LEFT:]
    # Lower half only: the legend (top left) also shows the class colour.
    mask = (bev == colour).all(axis=-1)
    mask[: SIDE // 2] = False
    vs, us = np.nonzero(mask)
    assert len(us) > 20
    centroid = np.array([us.mean() + BEV_LEFT, vs.mean()])
    expected = _bev_px(pred[0, :2])[0]
    # A 5 m shift is about 20 px; the heading tick pulls the centroid a little towards the front.
    assert np.linalg.norm(centroid - expected) < 3.0, (centroid, expected)
    # The outline passes through the middles of the footprint's sides.
    corners = box_corners(pred)[0, :4, :2]
    for a, b in ((0, 1), (1, 2), (2, 3), (3, 0)):
        assert _near(pixels, _bev_px(0.5 * (corners[a] + corners[b]))[0], colour)
    # The ground truth it was shifted from is white at its own place.
    gt_corners = box_corners(gt[j : j + 1])[0, :4, :2]
    assert _near(pixels, _bev_px(0.5 * (gt_corners[0] + gt_corners[3]))[0], GT_COLOUR)


def test_velocity_arrow_tips_are_at_centre_plus_v_times_the_arrow_time(infos, tiny_synth_root, tmp_path):
    info = infos[0]
    # A prediction behind-right of the ego moving forward-right, ground truth behind-left moving right, and a
    # ground-truth box without a velocity (NaN), which gets no arrow.
    pred = np.array([[-25.0, -20.0, 0.8, 4.5, 1.9, 1.6, 0.0, 4.0, -3.0]])
    gt = np.array([[-30.0, 20.0, 0.8, 4.5, 1.9, 1.6, 0.0, 0.0, -6.0],
                   [-40.0, 0.0, 0.8, 4.5, 1.9, 1.6, 0.0, np.nan, np.nan]])
    colour = CLASS_COLOURS["car"]
    pixels = _pixels(draw_sample(tiny_synth_root, info, pred, [CAR], tmp_path / "p.png", scores=[0.7], gt_boxes=gt,
                                 gt_labels=[CAR, CAR]))
    for box, c in ((pred[0], colour), (gt[0], GT_COLOUR)):
        centre, v = box[:2], box[7:9]
        tip = centre + v * ARROW_SECONDS
        unit = v / np.linalg.norm(v)
        assert _near(pixels, _bev_px(tip)[0], c)
        # The shaft between the box's edge and the tip, and nothing of the arrow beyond the tip.
        assert _near(pixels, _bev_px(centre + 0.6 * (tip - centre))[0], c)
        assert not _near(pixels, _bev_px(tip + unit * 1.0)[0], c)
    # The NaN-velocity box: its outline is drawn, and nothing leaves it forwards or sideways.
    box = gt[1]
    assert _near(pixels, _bev_px(box[:2] + [2.25, 0.0])[0], GT_COLOUR)
    for offset in ([4.0, 0.0], [0.0, 3.0], [0.0, -3.0], [-4.0, 0.0]):
        assert not _near(pixels, _bev_px(box[:2] + offset)[0], GT_COLOUR, radius=2)


def test_prediction_label_is_class_and_score_on_a_dark_box_above_it(infos, tiny_synth_root, tmp_path):
    # The front-camera GT box with the largest projection whose top edge leaves room for a label above it.
    best = None
    for info in infos:
        gt, gt_labels = _gt(info)
        segments, visible = project_box_edges(gt, info, "CAM_FRONT")
        for i in range(len(gt)):
            pts = segments[i][visible[i]].reshape(-1, 2)
            if len(pts) < 8 or not ((pts >= 0) & (pts < [PW, PH])).all():
                continue  # only boxes entirely inside the image, so the label position is predictable
            u0, v0 = pts[:, 0].min(), pts[:, 1].min()
            area = np.ptp(pts[:, 0]) * np.ptp(pts[:, 1])
            if v0 > 40 and u0 > 150 and u0 < PW - 80 and (best is None or area > best[0]):
                best = (area, info, i, u0, v0)
    assert best is not None
    _, info, i, u0, v0 = best
    gt, gt_labels = _gt(info)
    colour = CLASS_COLOURS[CLASSES[gt_labels[i]]]
    kwargs = dict(gt_boxes=gt, gt_labels=gt_labels)
    with_label = _pixels(draw_sample(tiny_synth_root, info, gt[i : i + 1], gt_labels[i : i + 1], tmp_path / "a.png",
                                     scores=[0.87], **kwargs))
    bare = _pixels(draw_sample(tiny_synth_root, info, np.zeros((0, 9)), [], tmp_path / "b.png", scores=[], **kwargs))
    # CAM_FRONT is the panel at column 1 of row 0. The label's backing box ends just above the box's top.
    left, bottom = PW + int(np.ceil(u0)) + 1, int(np.floor(v0)) - 1
    column = with_label[:bottom, left]
    height = 0
    while height < bottom and (column[bottom - 1 - height] == (0, 0, 0)).all():
        height += 1
    # Readable at a 225-px panel: text at least 12 px (the style's minimum) plus padding, not a banner.
    assert 12 <= height <= 24, height
    region = with_label[bottom - height : bottom, left : left + 45]
    # Text in the class colour (anti-aliased: near it) on black; neither is there without the prediction.
    text = (np.abs(region - colour).sum(axis=-1) < 60).sum()
    assert text >= 10, text
    assert (region == 0).all(axis=-1).mean() > 0.5
    bare_region = bare[bottom - height : bottom, left : left + 45]
    assert (bare_region == 0).all(axis=-1).mean() < 0.1
    assert (np.abs(bare_region - colour).sum(axis=-1) < 60).sum() < text / 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(gt_labels=[CAR]), "gt_labels were given without gt_boxes"),
    (dict(gt_boxes=np.zeros((1, 9))), "gt_boxes: boxes were given without labels"),
    (dict(gt_boxes=np.zeros((2, 9)), gt_labels=[CAR]), "gt_boxes: got 2 boxes, 1 labels"),
    (dict(labels=[len(CLASSES)]), "boxes: label 10 is not a class index"),
    (dict(scores=[0.5, 0.4]), "boxes: got 1 boxes, 1 labels and 2 scores"),
])
def test_inconsistent_arguments_are_refused_before_drawing(infos, tiny_synth_root, tmp_path, kwargs, message):
    args = dict(boxes=np.zeros((1, 9)), labels=[CAR]) | kwargs
    with pytest.raises(ValueError, match=message):
        draw_sample(tiny_synth_root, infos[0], out_png=tmp_path / "x.png", **args)
    assert not (tmp_path / "x.png").exists()
