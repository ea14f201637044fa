"""CenterPoint targets: the vectorised builder against a per-object loop oracle, plus hand-checked cases."""

from __future__ import annotations

import math

import pytest
import torch

from bevnext.errors import ConfigError
from bevnext.models.targets import TASKS, TargetBuilder
from bevnext.ops import heatmap_radius

REAL_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)


def oracle_single(boxes, labels, tasks, pc_range, voxel, factor, overlap, min_radius, max_objs):
    """Reference semantics written object by object (float32 scalars, like the reference).

    Per task: take the task's objects class by class (task order), input order within a class, the first
    ``max_objs``; skip an object with a non-positive size or a centre outside the map; else splat its Gaussian
    (max-composited, values from float64) and fill its slot.
    """
    grid_x = round((pc_range[3] - pc_range[0]) / voxel[0]) // factor
    grid_y = round((pc_range[4] - pc_range[1]) / voxel[1]) // factor
    out = []
    for group in tasks:
        heatmap = torch.zeros(len(group), grid_y, grid_x)
        reg = torch.zeros(max_objs, 10)
        index = torch.zeros(max_objs, dtype=torch.long)
        mask = torch.zeros(max_objs, dtype=torch.bool)
        members = [(j, m) for j, cls in enumerate(group) for m in range(len(labels)) if int(labels[m]) == cls]
        for slot, (channel, m) in enumerate(members[:max_objs]):
            box = boxes[m].float()
            length = box[3] / voxel[0] / factor
            width = box[4] / voxel[1] / factor
            if not (length > 0 and width > 0 and box[5] > 0):
                continue
            radius = int(heatmap_radius(width.reshape(1), length.reshape(1), overlap, min_radius)[0])
            cx = (box[0] - pc_range[0]) / voxel[0] / factor
            cy = (box[1] - pc_range[1]) / voxel[1] / factor
            col, row = math.floor(float(cx)), math.floor(float(cy))
            if not (0 <= col < grid_x and 0 <= row < grid_y):
                continue
            sigma = (2 * radius + 1) / 6
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    r, c = row + dy, col + dx
                    if 0 <= r < grid_y and 0 <= c < grid_x:
                        value = torch.tensor(math.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma)), dtype=torch.float64)
                        heatmap[channel, r, c] = max(heatmap[channel, r, c], value.float())
            index[slot] = row * grid_x + col
            mask[slot] = True
            reg[slot] = torch.stack(
                [
                    cx - col,
                    cy - row,
                    box[2],
                    torch.log(box[3]),
                    torch.log(box[4]),
                    torch.log(box[5]),
                    torch.sin(box[6]),
                    torch.cos(box[6]),
                    box[7],
                    box[8],
                ]
            )
        out.append((heatmap, reg, index, mask))
    return out


def random_scene(generator, num, pc_range, margin=3.0):
    """Boxes spread over (and a little beyond) the range, labels over all classes, some degenerate sizes."""
    lo = torch.tensor(pc_range[:2]) - margin
    hi = torch.tensor(pc_range[3:5]) + margin
    xy = lo + (hi - lo) * torch.rand(num, 2, generator=generator)
    z = -4 + 6 * torch.rand(num, 1, generator=generator)
    size = 0.2 + 5.0 * torch.rand(num, 3, generator=generator)
    size[torch.rand(num, generator=generator) < 0.05, 0] = 0.0  # zero length: skipped
    yaw = (torch.rand(num, 1, generator=generator) * 2 - 1) * math.pi
    vel = torch.randn(num, 2, generator=generator) * 3
    boxes = torch.cat((xy, z, size, yaw, vel), 1)
    labels = torch.randint(0, 10, (num,), generator=generator)
    return boxes, labels


@pytest.mark.parametrize(
    ("pc_range", "voxel", "factor", "max_objs", "num"),
    [
        (REAL_RANGE, (0.1, 0.1, 0.2), 8, 500, 60),
        ((-6.4, -3.2, -5.0, 6.4, 3.2, 3.0), (0.2, 0.1), 4, 5, 40),  # 16 x 16, slots overflow
    ],
)
def test_targets_match_loop_oracle(pc_range, voxel, factor, max_objs, num):
    generator = torch.Generator().manual_seed(1)
    builder = TargetBuilder(TASKS, pc_range, voxel, factor, gaussian_overlap=0.1, min_radius=2, max_objs=max_objs)
    samples = [random_scene(generator, num, pc_range), random_scene(generator, num // 2, pc_range)]
    samples.append((torch.zeros(0, 9), torch.zeros(0, dtype=torch.long)))
    targets = builder([s[0] for s in samples], [s[1] for s in samples])
    assert len(targets) == len(TASKS)
    for b, (boxes, labels) in enumerate(samples):
        expected = oracle_single(boxes, labels, TASKS, pc_range, voxel, factor, 0.1, 2, max_objs)
        for t, (heatmap, reg, index, mask) in enumerate(expected):
            assert torch.equal(targets[t].heatmap[b], heatmap), (b, t)
            assert torch.equal(targets[t].index[b], index), (b, t)
            assert torch.equal(targets[t].mask[b], mask), (b, t)
            torch.testing.assert_close(targets[t].reg_target[b], reg, rtol=0, atol=1e-6)
            # the sub-cell offsets are computed with the same float32 operations: bit-identical
            assert torch.equal(targets[t].reg_target[b, :, :3], reg[:, :3]), (b, t)
    # the scenes must exercise the interesting paths
    total = sum(int(t.mask.sum()) for t in targets)
    assert 0 < total < sum(len(s[1]) for s in samples)


def test_hand_computed_car():
    builder = TargetBuilder()  # reference grid: 128 x 128 cells of 0.8 m
    assert builder.grid_shape == (128, 128)
    box = torch.tensor([[1.0, -2.0, 0.7, 4.0, 2.0, 1.5, 0.5, 3.0, -1.0]])
    targets = builder([box], [torch.tensor([0])])
    car = targets[0]
    # x: (1.0 + 51.2) / 0.8 = 65.25 -> column 65, frac 0.25; y: (-2 + 51.2) / 0.8 = 61.5 -> row 61, frac 0.5
    assert int(car.index[0, 0]) == 61 * 128 + 65
    assert bool(car.mask[0, 0]) and int(car.mask.sum()) == 1
    expected = torch.tensor([0.25, 0.5, 0.7, math.log(4.0), math.log(2.0), math.log(1.5), math.sin(0.5),
                             math.cos(0.5), 3.0, -1.0])
    torch.testing.assert_close(car.reg_target[0, 0], expected, rtol=0, atol=1e-5)
    assert float(car.heatmap[0, 0, 61, 65]) == 1.0
    assert int((car.heatmap == 1).sum()) == 1
    # l = 5 cells, w = 2.5 cells -> radius max(2, int(r)) ; the splat reaches exactly that far
    radius = int(heatmap_radius(torch.tensor([2.5]), torch.tensor([5.0]), 0.1, 2)[0])
    row = car.heatmap[0, 0, 61]
    assert float(row[65 + radius]) > 0 and float(row[65 + radius + 1]) == 0
    # other tasks are empty
    assert all(float(t.heatmap.sum()) == 0 and int(t.mask.sum()) == 0 for t in targets[1:])


def test_edges_of_the_map():
    builder = TargetBuilder()
    boxes = torch.tensor(
        [
            [-51.2, -51.2, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],  # first cell
            [51.1, 51.1, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],  # last cell
            [51.2, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],  # on the upper bound: outside
            [-51.25, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],  # just below: outside (the reference would truncate)
            [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # zero height: skipped (log would be -inf)
        ]
    )
    targets = builder([boxes], [torch.zeros(5, dtype=torch.long)])
    car = targets[0]
    assert car.mask[0, :5].tolist() == [True, True, False, False, False]
    assert car.index[0, :2].tolist() == [0, 127 * 128 + 127]
    assert torch.isfinite(car.reg_target).all()


def test_slot_order_and_overflow():
    builder = TargetBuilder(max_objs=3)
    # task 1 = [truck (1), construction_vehicle (2)]: slots take trucks first, in input order
    xs = [-20.3, -10.3, 0.3, 10.3, 20.3]  # away from cell borders
    labels = torch.tensor([2, 1, 2, 1, 1])
    boxes = torch.tensor([[x, 0.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0] for x in xs])
    truck = builder([boxes], [labels])[1]
    columns = (truck.index[0] % 128).tolist()
    expected = [int((x + 51.2) / 0.8) for x in (-10.3, 10.3, 20.3)]
    assert columns == expected
    # overflowing objects are dropped from the heatmap too
    assert int((truck.heatmap[0, 1] == 1).sum()) == 0
    assert int((truck.heatmap[0, 0] == 1).sum()) == 3


def test_device_and_dtype(device):
    builder = TargetBuilder(point_cloud_range=(-6.4, -6.4, -5.0, 6.4, 6.4, 3.0))
    box = torch.tensor([[0.3, 0.2, 0.0, 2.0, 1.0, 1.0, 0.1, 0.0, 0.0]], dtype=torch.float64, device=device)
    targets = builder([box], [torch.tensor([8], device=device)])
    ped = targets[5]
    assert ped.heatmap.device == box.device and ped.heatmap.dtype == torch.float32
    assert ped.reg_target.dtype == torch.float32 and ped.index.dtype == torch.long and ped.mask.dtype == torch.bool
    assert int(ped.mask.sum()) == 1


def test_config_errors():
    with pytest.raises(ConfigError, match="out_size_factor"):
        TargetBuilder(out_size_factor=3)  # 1024 voxels are not divisible by 3
    with pytest.raises(ConfigError, match="voxel"):
        TargetBuilder(voxel_size=(0.3, 0.1, 0.2))  # 102.4 m is not a whole number of 0.3 m voxels
    with pytest.raises(ConfigError, match="gaussian_overlap"):
        TargetBuilder(gaussian_overlap=1.5)
    with pytest.raises(ConfigError, match="max_objs"):
        TargetBuilder(max_objs=0)
    with pytest.raises(ConfigError, match="point_cloud_range"):
        TargetBuilder(point_cloud_range=(0.0, 0.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="tasks"):
        TargetBuilder(tasks=((0, 1), (1,)))
