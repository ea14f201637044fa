"""Decoding and Scale-NMS: encode -> decode round trip, hand-computed decoding, rescaled NMS behaviour."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bevnext.errors import ConfigError
from bevnext.models.decode import (
    REFERENCE_TASK_DECODING,
    DecodeConfig,
    TaskDecoding,
    decode_boxes,
    decode_task,
    post_center_range_for,
    scale_nms,
)
from bevnext.models.heads import REG_BRANCHES
from bevnext.models.oracle import oracle_head_outputs
from bevnext.models.targets import TASKS, TargetBuilder

REAL_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)


def grid_cfg(pc_range, **kwargs) -> DecodeConfig:
    """Decoding on a grid of 0.8 m cells starting at ``pc_range``'s lower corner (reference settings otherwise)."""
    return DecodeConfig(grid_lower=(pc_range[0], pc_range[1]), cell_size=(0.8, 0.8), **kwargs)


def rotate_task(iou_threshold, factors=(1.0, 1.0)) -> TaskDecoding:
    """A two-class rotated-NMS task with the given per-class Scale-NMS factors."""
    return TaskDecoding((8, 9), "rotate", iou_threshold, tuple(factors))


def separated_boxes(generator, num, pc_range, spacing=10.0):
    """Random boxes on distinct lattice sites ``spacing`` apart (jitter +-2 m), small enough never to overlap."""
    x_sites = torch.arange(pc_range[0] + spacing / 2, pc_range[3] - 2.5, spacing)
    y_sites = torch.arange(pc_range[1] + spacing / 2, pc_range[4] - 2.5, spacing)
    sites = torch.cartesian_prod(x_sites, y_sites)
    pick = torch.randperm(sites.shape[0], generator=generator)[:num]
    num = pick.numel()
    xy = sites[pick] + (torch.rand(num, 2, generator=generator) * 4 - 2)
    z = -4 + 6 * torch.rand(num, 1, generator=generator)
    lw = 0.3 + 3.5 * torch.rand(num, 2, generator=generator)  # half diagonal <= 2.6 m < spacing / 2 - 2
    h = 0.3 + 3.0 * torch.rand(num, 1, generator=generator)
    yaw = (torch.rand(num, 1, generator=generator) * 2 - 1) * (math.pi - 1e-3)
    vel = torch.randn(num, 2, generator=generator) * 4
    boxes = torch.cat((xy, z, lw, h, yaw, vel), 1)
    labels = torch.randint(0, 10, (num,), generator=generator)
    return boxes, labels


def perfect_predictions(targets, tail_scale=0.09):
    """Head outputs of a perfect network after the sigmoid, with the Gaussian tails scaled below the 0.1 threshold."""
    proposals, reg_preds = oracle_head_outputs(targets, tail_scale=tail_scale)
    return [p["heatmap"].sigmoid() for p in proposals], reg_preds


def assert_same_boxes(decoded, boxes, labels, atol=1e-4):
    out_boxes, out_scores, out_labels = decoded
    assert out_boxes.shape == boxes.shape, (out_boxes.shape, boxes.shape)
    assert torch.all(out_scores == 1.0)
    # match each ground-truth box to the decoded box at the nearest centre
    dist = torch.cdist(boxes[:, :2], out_boxes[:, :2])
    match = dist.argmin(1)
    assert match.unique().numel() == boxes.shape[0]
    got = out_boxes[match]
    assert torch.equal(out_labels[match], labels)
    yaw_err = torch.remainder(got[:, 6] - boxes[:, 6] + math.pi, 2 * math.pi) - math.pi
    assert float(yaw_err.abs().max()) < atol
    other = [0, 1, 2, 3, 4, 5, 7, 8]
    torch.testing.assert_close(got[:, other], boxes[:, other], rtol=0, atol=atol)


def test_encode_decode_round_trip_real_grid():
    generator = torch.Generator().manual_seed(0)
    builder = TargetBuilder()
    samples = [separated_boxes(generator, 60, REAL_RANGE), separated_boxes(generator, 25, REAL_RANGE)]
    targets = builder([s[0] for s in samples], [s[1] for s in samples])
    heatmaps, reg_preds = perfect_predictions(targets)
    decoded = decode_boxes(heatmaps, reg_preds)  # reference settings, Scale-NMS included
    assert len(decoded) == 2
    for out, (boxes, labels) in zip(decoded, samples):
        assert_same_boxes(out, boxes, labels)


def test_encode_decode_round_trip_tiny_grid_drops_outside(device):
    generator = torch.Generator().manual_seed(3)
    pc_range = (-12.8, -6.4, -5.0, 12.8, 6.4, 3.0)  # 32 x 16 cells of 0.8 m
    builder = TargetBuilder(point_cloud_range=pc_range, max_objs=20)
    boxes, labels = separated_boxes(generator, 6, pc_range, spacing=6.0)
    boxes[:, 3:5] = boxes[:, 3:5].clamp(max=1.5)
    outside = torch.tensor([[20.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    all_boxes = torch.cat((boxes, outside)).to(device)
    targets = builder([all_boxes], [torch.cat((labels, torch.tensor([0]))).to(device)])
    heatmaps, reg_preds = perfect_predictions(targets)
    (decoded,) = decode_boxes(heatmaps, reg_preds, grid_cfg(pc_range, post_center_range=pc_range))
    assert all(t.device == all_boxes.device for t in decoded)
    assert_same_boxes(tuple(t.cpu() for t in decoded), boxes, labels)


def test_decode_task_hand_computed():
    heatmap = torch.zeros(1, 2, 4, 5)
    heatmap[0, 1, 2, 3] = 0.8  # class 1 at row 2, column 3
    heatmap[0, 0, 0, 0] = 0.1  # exactly at the threshold: dropped (strict >)
    preds = {
        "reg": torch.zeros(1, 2, 4, 5),
        "height": torch.zeros(1, 1, 4, 5),
        "dim": torch.zeros(1, 3, 4, 5),
        "rot": torch.zeros(1, 2, 4, 5),
        "vel": torch.zeros(1, 2, 4, 5),
    }
    preds["reg"][0, :, 2, 3] = torch.tensor([0.25, 0.75])
    preds["height"][0, 0, 2, 3] = -1.5
    preds["dim"][0, :, 2, 3] = torch.tensor([math.log(4.0), math.log(2.0), math.log(1.5)])
    preds["rot"][0, :, 2, 3] = torch.tensor([1.0, -1.0])  # sin, cos -> 135 degrees
    preds["vel"][0, :, 2, 3] = torch.tensor([2.0, -3.0])
    pc_range = (-2.0, -1.6, -5.0, 2.0, 1.6, 3.0)  # 0.8 m cells
    ((boxes, scores, labels),) = decode_task(heatmap, preds, grid_cfg(pc_range, post_center_range=None, topk=40))
    assert labels.tolist() == [1] and scores.tolist() == [pytest.approx(0.8)]
    expected = torch.tensor([[(3 + 0.25) * 0.8 - 2.0, (2 + 0.75) * 0.8 - 1.6, -1.5, 4.0, 2.0, 1.5, 0.75 * math.pi,
                              2.0, -3.0]])
    torch.testing.assert_close(boxes, expected, rtol=0, atol=1e-5)
    # post_center_range drops the box when its centre leaves the range
    (boxes, _, _), = decode_task(heatmap, preds, grid_cfg(pc_range, post_center_range=(-5, -5, -1.0, 5, 5, 1), topk=40))
    assert boxes.shape == (0, 9)
    # topk larger than the map is fine; topk smaller keeps the best
    best_two = grid_cfg(pc_range, score_threshold=0.0, post_center_range=None, topk=2)
    ((boxes, scores, _),) = decode_task(heatmap, preds, best_two)
    assert scores.tolist() == [pytest.approx(0.8), pytest.approx(0.1)]


def _box(x, y, length, width, yaw=0.0, z=0.5, h=1.7):
    return [x, y, z, length, width, h, yaw, 0.0, 0.0]


def test_scale_nms_pedestrians_suppressed_only_with_rescale():
    # two pedestrians 0.3 m apart: IoU 0.4 (< 0.5, both kept); scaled x4.5 the IoU is 0.83 (> 0.5)
    boxes = torch.tensor([_box(10.0, 5.0, 0.7, 0.7), _box(10.3, 5.0, 0.7, 0.7)])
    scores = torch.tensor([0.9, 0.8])
    labels = torch.tensor([0, 0])
    plain = scale_nms(boxes, scores, labels, rotate_task(0.5))
    scaled = scale_nms(boxes, scores, labels, rotate_task(0.5, (4.5, 9.0)))
    assert plain.tolist() == [0, 1]
    assert scaled.tolist() == [0]


def test_scale_nms_per_class_factor_and_rotation():
    # 0.4 m boxes 1 m apart: pedestrians (x4.5 -> IoU 0.29) are kept, traffic cones (x9 -> IoU 0.57) suppressed
    boxes = torch.tensor([_box(0.0, 0.0, 0.4, 0.4), _box(1.0, 0.0, 0.4, 0.4)])
    scores = torch.tensor([0.9, 0.8])
    factors = (4.5, 9.0)
    assert scale_nms(boxes, scores, torch.tensor([0, 0]), rotate_task(0.5, factors)).tolist() == [0, 1]
    assert scale_nms(boxes, scores, torch.tensor([1, 1]), rotate_task(0.5, factors)).tolist() == [0]
    # the same pair rotated by 90 degrees about the origin, boxes and offset together: same decision
    rotated = torch.tensor([_box(0.0, 0.0, 0.4, 0.4, math.pi / 2), _box(0.0, 1.0, 0.4, 0.4, math.pi / 2)])
    assert scale_nms(rotated, scores, torch.tensor([1, 1]), rotate_task(0.5, factors)).tolist() == [0]
    # length along the heading: two 4 x 1 cars 3 m apart along their heading overlap (IoU 1/7 > 0.1),
    # side by side 3 m apart they do not
    along = torch.tensor([_box(0.0, 0.0, 4.0, 1.0, 0.3), _box(3 * math.cos(0.3), 3 * math.sin(0.3), 4.0, 1.0, 0.3)])
    beside = torch.tensor([_box(0.0, 0.0, 4.0, 1.0, 0.3), _box(-3 * math.sin(0.3), 3 * math.cos(0.3), 4.0, 1.0, 0.3)])
    assert scale_nms(along, scores, torch.tensor([0, 0]), rotate_task(0.1)).tolist() == [0]
    assert scale_nms(beside, scores, torch.tensor([0, 0]), rotate_task(0.1)).tolist() == [0, 1]


def test_circle_nms_barrier_uses_squared_distance():
    boxes = torch.tensor([_box(0.0, 0.0, 2.0, 0.5), _box(0.9, 0.0, 2.0, 0.5), _box(0.0, 1.1, 2.0, 0.5)])
    scores = torch.tensor([0.9, 0.8, 0.7])
    barrier = TaskDecoding((5,), "circle", circle_threshold=1.0)
    keep = scale_nms(boxes, scores, torch.zeros(3, dtype=torch.long), barrier)
    assert keep.tolist() == [0, 2]  # 0.81 m^2 <= 1 suppressed; 1.21 m^2 kept


def _single_cell_preds(grid, entries):
    """Heatmaps and reg maps for one sample with one detection per entry (task, class, row, col, score, box)."""
    grid_y, grid_x = grid
    heatmaps = [torch.zeros(1, len(g), grid_y, grid_x) for g in TASKS]
    maps = [torch.zeros(1, 10, grid_y, grid_x) for _ in TASKS]
    for task, cls, row, col, score, box in entries:
        heatmaps[task][0, cls, row, col] = score
        values = [box[0], box[1], box[2], math.log(box[3]), math.log(box[4]), math.log(box[5]), math.sin(box[6]),
                  math.cos(box[6]), box[7], box[8]]
        maps[task][0, :, row, col] = torch.tensor(values)
    reg_preds = [dict(zip(REG_BRANCHES, torch.split(m, list(REG_BRANCHES.values()), dim=1))) for m in maps]
    return heatmaps, reg_preds


def test_decode_boxes_labels_nms_and_gravity_centre():
    pc_range = (-8.0, -8.0, -5.0, 8.0, 8.0, 3.0)  # 20 x 20 cells of 0.8 m
    # (task, class in task, row, col, score, [x_frac, y_frac, z, l, w, h, yaw, vx, vy])
    entries = [
        (5, 0, 10, 10, 0.9, [0.5, 0.5, 0.8, 0.7, 0.7, 1.8, 0.0, 1.0, 0.0]),  # pedestrian at (0.4, 0.4)
        (5, 1, 12, 4, 0.6, [0.5, 0.5, -1.0, 0.4, 0.4, 0.9, 0.0, 0.0, 0.0]),  # traffic cone
        (0, 0, 3, 15, 0.7, [0.2, 0.3, 0.1, 4.5, 1.9, 1.6, 1.0, 5.0, -2.0]),  # car
        (3, 0, 16, 16, 0.3, [0.1, 0.1, 0.0, 2.0, 0.5, 1.0, 0.0, 0.0, 0.0]),  # barrier
    ]
    heatmaps, reg_preds = _single_cell_preds((20, 20), entries)
    # a second pedestrian 0.3 m to the right of the first (next cell with x_frac 0.875 - 1): suppressed by x4.5
    heatmaps[5][0, 0, 10, 11] = 0.8
    reg_preds[5]["reg"][0, :, 10, 11] = torch.tensor([-0.125, 0.5])
    reg_preds[5]["height"][0, 0, 10, 11] = 0.8
    reg_preds[5]["dim"][0, :, 10, 11] = torch.log(torch.tensor([0.7, 0.7, 1.8]))
    reg_preds[5]["rot"][0, :, 10, 11] = torch.tensor([0.0, 1.0])
    (boxes, scores, labels), = decode_boxes(heatmaps, reg_preds, grid_cfg(pc_range))
    # task order: car, barrier, pedestrian, traffic cone; the second pedestrian is gone
    assert labels.tolist() == [0, 5, 8, 9]
    torch.testing.assert_close(scores, torch.tensor([0.7, 0.3, 0.9, 0.6]))
    car = boxes[0]
    torch.testing.assert_close(
        car, torch.tensor([(15.2) * 0.8 - 8.0, 3.3 * 0.8 - 8.0, 0.1, 4.5, 1.9, 1.6, 1.0, 5.0, -2.0]), atol=1e-5, rtol=0
    )
    # gravity centre z and the predicted sizes survive (no h/2 shift, Scale-NMS factors undone)
    torch.testing.assert_close(boxes[2, 2:6], torch.tensor([0.8, 0.7, 0.7, 1.8]), atol=1e-6, rtol=0)
    torch.testing.assert_close(boxes[3, 2:6], torch.tensor([-1.0, 0.4, 0.4, 0.9]), atol=1e-6, rtol=0)
    # without the rescale factors both pedestrians stay
    tasks = (*REFERENCE_TASK_DECODING[:5], dataclasses.replace(REFERENCE_TASK_DECODING[5], rescale_factors=(1.0, 1.0)))
    (_, _, labels), = decode_boxes(heatmaps, reg_preds, grid_cfg(pc_range, tasks=tasks))
    assert labels.tolist() == [0, 5, 8, 8, 9]


def test_decode_boxes_post_max_size_and_empty():
    pc_range = (-8.0, -8.0, -5.0, 8.0, 8.0, 3.0)
    heatmaps, reg_preds = _single_cell_preds((20, 20), [])
    (boxes, scores, labels), = decode_boxes(heatmaps, reg_preds, grid_cfg(pc_range))
    assert boxes.shape == (0, 9) and scores.shape == (0,) and labels.dtype == torch.long
    # ten well separated cars, at most 4 kept, the best ones
    heatmaps[0][0, 0, 2, 0:20:2] = torch.linspace(0.2, 0.65, 10)
    reg_preds[0]["dim"].zero_()
    (boxes, scores, labels), = decode_boxes(heatmaps, reg_preds, grid_cfg(pc_range, post_max_size=4))
    torch.testing.assert_close(scores, torch.linspace(0.2, 0.65, 10)[-4:].flip(0))


def test_decode_config_errors():
    with pytest.raises(ConfigError, match="nms_type"):
        TaskDecoding((8, 9), "square")
    with pytest.raises(ConfigError, match="rescale_factors"):
        TaskDecoding((8, 9), "rotate", 0.5, (4.5,))
    with pytest.raises(ConfigError, match="tasks"):
        DecodeConfig(tasks=(TaskDecoding((0, 1)), TaskDecoding((1, 2))))  # class 1 in two tasks
    heatmaps, reg_preds = _single_cell_preds((4, 4), [])
    with pytest.raises(ValueError, match="heatmaps has 6 entries for 5 tasks"):
        decode_boxes(heatmaps, reg_preds, DecodeConfig(tasks=REFERENCE_TASK_DECODING[:5]))


def test_reference_task_decoding_and_centre_range():
    assert [t.classes for t in REFERENCE_TASK_DECODING] == [tuple(g) for g in TASKS]
    assert [t.nms_type for t in REFERENCE_TASK_DECODING] == ["rotate"] * 3 + ["circle"] + ["rotate"] * 2
    assert REFERENCE_TASK_DECODING[5].rescale_factors == (4.5, 9.0) and REFERENCE_TASK_DECODING[5].iou_threshold == 0.5
    assert REFERENCE_TASK_DECODING[0].rescale_factors == (1.0,) and REFERENCE_TASK_DECODING[3].circle_threshold == 1.0
    assert post_center_range_for(REAL_RANGE) == (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
