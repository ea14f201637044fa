"""Rotated BEV IoU and NMS: shapely oracle (test-only), python greedy oracles, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from bevnext.ops.nms import bev_box_corners, circle_nms, nms_rotated_bev, rotated_iou_bev

shapely_geometry = pytest.importorskip("shapely.geometry")


def shapely_box(box) -> object:
    """Oracle polygon of one [x, y, l, w, yaw] box, built independently of bev_box_corners."""
    x, y, length, width, yaw = (float(v) for v in box)
    c, s = math.cos(yaw), math.sin(yaw)
    corners = []
    for lx, ly in (
        (length / 2, width / 2),
        (-length / 2, width / 2),
        (-length / 2, -width / 2),
        (length / 2, -width / 2),
    ):
        corners.append((x + c * lx - s * ly, y + s * lx + c * ly))
    return shapely_geometry.Polygon(corners)


def shapely_iou(boxes_a, boxes_b) -> torch.Tensor:
    polys_a = [shapely_box(b) for b in boxes_a.tolist()]
    polys_b = [shapely_box(b) for b in boxes_b.tolist()]
    out = torch.zeros(len(polys_a), len(polys_b), dtype=torch.float64)
    for i, pa in enumerate(polys_a):
        for j, pb in enumerate(polys_b):
            inter = pa.intersection(pb).area
            union = pa.area + pb.area - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def random_boxes(n, spread=6.0, centre=(0.0, 0.0), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    xy = (torch.rand(n, 2, generator=gen, dtype=dtype) - 0.5) * spread + torch.tensor(centre, dtype=dtype)
    size = torch.rand(n, 2, generator=gen, dtype=dtype) * 4 + 0.2
    yaw = (torch.rand(n, 1, generator=gen, dtype=dtype) - 0.5) * 4 * math.pi
    return torch.cat((xy, size, yaw), dim=1)


def greedy_nms_oracle(iou, scores, threshold, pre_max_size=None, post_max_size=None, inclusive=False):
    """Plain python greedy NMS over a precomputed pairwise matrix (IoU or squared distance)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    if pre_max_size is not None:
        order = order[:pre_max_size]
    keep = []
    for i in order:
        if all(not (iou[k][i] <= threshold if inclusive else iou[k][i] > threshold) for k in keep):
            keep.append(i)
    return keep if post_max_size is None else keep[:post_max_size]


def test_corners_counter_clockwise():
    corners = bev_box_corners(random_boxes(20))
    x, y = corners[..., 0], corners[..., 1]
    area = 0.5 * (x * y.roll(-1, 1) - x.roll(-1, 1) * y).sum(1)
    assert torch.all(area > 0)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_random_boxes_match_shapely(device, dtype, atol):
    boxes_a = random_boxes(40, seed=1)
    boxes_b = random_boxes(30, seed=2)
    iou = rotated_iou_bev(boxes_a.to(device, dtype), boxes_b.to(device, dtype))
    assert iou.shape == (40, 30) and iou.dtype == dtype
    expected = shapely_iou(boxes_a, boxes_b)
    assert (expected > 0).sum() > 100  # the fixture really overlaps
    torch.testing.assert_close(iou.cpu().double(), expected, atol=atol, rtol=0)


def test_far_from_origin_float32(device):
    boxes = random_boxes(30, spread=4.0, centre=(48.0, -47.0), seed=3)
    iou = rotated_iou_bev(boxes.float().to(device), boxes.float().to(device))
    torch.testing.assert_close(iou.cpu().double(), shapely_iou(boxes, boxes), atol=1e-5, rtol=0)


def test_known_values(device):
    half_pi = math.pi / 2
    boxes = torch.tensor(
        [
            [0.0, 0.0, 2.0, 2.0, 0.0],
            [0.0, 0.0, 2.0, 2.0, half_pi],  # the square rotated 90 deg about its centre
            [0.0, 0.0, 4.0, 2.0, 0.0],
            [0.0, 0.0, 4.0, 2.0, half_pi],  # 4x2 rotated 90 deg: overlap 2x2 = 4, union 12
            [10.0, 0.0, 2.0, 2.0, 0.3],  # far away
            [0.0, 0.0, 2.0, 2.0, math.pi / 4],
        ],
        dtype=torch.float64,
        device=device,
    )
    iou = rotated_iou_bev(boxes, boxes).cpu()
    assert iou[0, 0] == pytest.approx(1.0, abs=1e-12)
    assert iou[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert iou[2, 3] == pytest.approx(1 / 3, abs=1e-12)
    assert iou[0, 2] == pytest.approx(0.5, abs=1e-12)
    assert iou[0, 4] == 0 and iou[4, 0] == 0
    # square vs the same square at 45 deg: octagon, area 8 (sqrt 2 - 1); check against shapely too.
    expected = 8 * (math.sqrt(2) - 1) / (8 - 8 * (math.sqrt(2) - 1))
    assert iou[0, 5] == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(iou, shapely_iou(boxes.cpu(), boxes.cpu()), atol=1e-12, rtol=0)


def test_identical_boxes_give_one(device):
    boxes = random_boxes(200, spread=100.0, seed=4).float().to(device)
    iou = rotated_iou_bev(boxes, boxes).cpu()
    torch.testing.assert_close(iou.diagonal(), torch.ones(200), atol=2e-6, rtol=0)
    assert torch.isfinite(iou).all() and (iou >= 0).all() and (iou <= 1).all()


def test_touching_contained_and_degenerate_boxes(device):
    boxes = torch.tensor(
        [
            [0.0, 0.0, 2.0, 2.0, 0.0],
            [2.0, 0.0, 2.0, 2.0, 0.0],  # shares the edge x = 1: IoU 0
            [2.0, 2.0, 2.0, 2.0, 0.0],  # shares only a corner
            [0.5, 0.0, 1.0, 2.0, 0.0],  # inside box 0, sharing three edges: IoU 0.5
            [0.0, 0.0, 0.0, 2.0, 0.0],  # zero length
            [0.0, 0.0, 0.0, 0.0, 0.0],  # a point
            [0.0, 0.0, 1.0, 1.0, 0.7],  # strictly inside box 0: IoU 0.25
            [0.0, 0.0, -1.0, 2.0, 0.0],  # negative size: treated as zero
        ],
        dtype=torch.float32,
        device=device,
    )
    iou = rotated_iou_bev(boxes, boxes).cpu()
    assert torch.isfinite(iou).all()
    assert iou[0, 1] == pytest.approx(0.0, abs=1e-6) and iou[0, 2] == pytest.approx(0.0, abs=1e-6)
    assert iou[0, 3] == pytest.approx(0.5, abs=1e-6) and iou[3, 0] == pytest.approx(0.5, abs=1e-6)
    assert iou[0, 6] == pytest.approx(0.25, abs=1e-6)
    assert torch.all(iou[4:6] == 0) and torch.all(iou[:, 4:6] == 0)
    assert torch.all(iou[7] == 0) and torch.all(iou[:, 7] == 0)


def test_shared_edges_with_rounding(device):
    # Boxes whose edges coincide up to rounding (same yaw, adjacent or nested) at many angles.
    yaws = torch.linspace(-math.pi, math.pi, 37, dtype=torch.float64)
    rows = []
    for yaw in yaws.tolist():
        c, s = math.cos(yaw), math.sin(yaw)
        rows.append([3.0, -2.0, 4.0, 2.0, yaw])
        rows.append([3.0 + c * 1.0, -2.0 + s * 1.0, 2.0, 2.0, yaw])  # right half of the first box
    boxes = torch.tensor(rows, dtype=torch.float64)
    iou = rotated_iou_bev(boxes.float().to(device), boxes.float().to(device)).cpu().double()
    torch.testing.assert_close(iou, shapely_iou(boxes, boxes), atol=2e-5, rtol=0)


def test_empty_inputs(device):
    empty = torch.zeros(0, 5, device=device)
    some = random_boxes(3).float().to(device)
    assert rotated_iou_bev(empty, some).shape == (0, 3)
    assert rotated_iou_bev(some, empty).shape == (3, 0)
    kept = nms_rotated_bev(empty, torch.zeros(0, device=device), 0.2)
    assert kept.dtype == torch.long and kept.numel() == 0 and kept.device == some.device
    kept = circle_nms(torch.zeros(0, 2, device=device), torch.zeros(0, device=device), 1.0)
    assert kept.dtype == torch.long and kept.numel() == 0


@pytest.mark.parametrize(
    "threshold, pre_max_size, post_max_size", [(0.1, None, None), (0.5, None, None), (0.2, 40, 10), (0.0, 25, None)]
)
def test_nms_rotated_matches_greedy_oracle(device, threshold, pre_max_size, post_max_size):
    boxes = random_boxes(60, spread=8.0, seed=7)
    scores = torch.rand(60, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    kept = nms_rotated_bev(boxes.float().to(device), scores.float().to(device), threshold, pre_max_size, post_max_size)
    assert kept.dtype == torch.long and kept.device.type == torch.device(device).type
    expected = greedy_nms_oracle(
        shapely_iou(boxes, boxes).tolist(), scores.tolist(), threshold, pre_max_size, post_max_size
    )
    assert kept.cpu().tolist() == expected


def test_nms_equal_scores_keep_lower_index_first():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0, 0.0]] * 3 + [[10.0, 0.0, 2.0, 2.0, 0.0]])
    kept = nms_rotated_bev(boxes, torch.tensor([0.5, 0.5, 0.5, 0.9]), 0.5)
    assert kept.tolist() == [3, 0]


def test_nms_rotated_1000_boxes_properties():
    # Time is not asserted; the result must be a valid greedy NMS: kept boxes do not overlap above the
    # threshold, and each dropped box overlaps a kept box with a higher score.
    boxes = random_boxes(1000, spread=30.0, seed=9).float()
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(10))
    threshold = 0.2
    kept = nms_rotated_bev(boxes, scores, threshold)
    iou = rotated_iou_bev(boxes, boxes)
    kept_iou = iou[kept][:, kept]
    assert torch.all(kept_iou.triu(1) <= threshold + 1e-6)
    dropped = torch.ones(1000, dtype=torch.bool)
    dropped[kept] = False
    over = (iou[kept][:, dropped] > threshold) & (scores[kept][:, None] >= scores[dropped][None, :])
    assert torch.all(over.any(0))
    assert torch.all(scores[kept][:-1] >= scores[kept][1:])


@pytest.mark.parametrize("threshold, post_max_size", [(1.0, None), (4.0, None), (0.175, 5)])
def test_circle_nms_matches_greedy_oracle(device, threshold, post_max_size):
    gen = torch.Generator().manual_seed(11)
    centers = torch.rand(80, 2, generator=gen) * 10
    scores = torch.rand(80, generator=gen)
    kept = circle_nms(centers.to(device), scores.to(device), threshold, post_max_size)
    dist2 = ((centers[:, None] - centers[None]) ** 2).sum(-1).tolist()
    expected = greedy_nms_oracle(dist2, scores.tolist(), threshold, None, post_max_size, inclusive=True)
    assert kept.cpu().tolist() == expected


def test_circle_nms_threshold_is_on_squared_distance_inclusive():
    centers = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.5]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert circle_nms(centers, scores, 1.0).tolist() == [0, 2]  # d^2 = 1 <= 1: suppressed
    assert circle_nms(centers, scores, 0.99).tolist() == [0, 1, 2]
    assert circle_nms(centers, scores, 2.25).tolist() == [0]  # 1.5^2 = 2.25 (a distance of 1.5 m)
