"""Proposal and regression heads: reference state-dict layout, init, shapes, losses and gradients.

The layout checks compare against ``tests/models/reference/reference-stage{1,2}-state-dict.tsv`` (read through
``reference_layout``).
"""

from __future__ import annotations

import pytest
import torch
from reference_layout import reference_param_count, reference_rows, state_rows
from torch import nn

from bevnext.errors import ConfigError
from bevnext.models.heads import REG_BRANCHES, CenterHeadProposal, CenterHeadReg, SeparateHead, gather_cells
from bevnext.models.targets import TASKS, TargetBuilder

# The regression head takes its L1 weights from the caller (the model config); these are the reference's.
STAGE1_WEIGHTS = (1.0,) * 8 + (0.2, 0.2)
UNIFORM_WEIGHTS = (1.0,) * 10


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("stage", [1, 2])
def test_proposal_head_matches_reference_layout(stage):
    head = CenterHeadProposal(in_channels=256, tasks=TASKS, head_channels=64, final_kernel=3, init_bias=-2.19)
    assert state_rows(head) == reference_rows(stage, "proposal_head.")
    assert _num_params(head) == reference_param_count(stage, "proposal_head.") == 375_306


@pytest.mark.parametrize(("stage", "channels", "expected"), [(1, 80, 1_190_588), (2, 160, 1_236_668)])
def test_reg_head_matches_reference_layout(stage, channels, expected):
    head = CenterHeadReg(
        in_channels=channels, tasks=TASKS, head_channels=64, branches=REG_BRANCHES, code_weights=UNIFORM_WEIGHTS
    )
    assert state_rows(head) == reference_rows(stage, "pts_bbox_head.")
    assert _num_params(head) == reference_param_count(stage, "pts_bbox_head.") == expected


def test_init_heatmap_bias_and_kaiming():
    torch.manual_seed(0)
    head = CenterHeadProposal(in_channels=256)
    for task_head, group in zip(head.task_heads, TASKS):
        last = task_head.heatmap[1]
        assert torch.equal(last.bias, torch.full((len(group),), -2.19))
    reg = CenterHeadReg(in_channels=80, code_weights=UNIFORM_WEIGHTS)
    for module in reg.modules():
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out_channels * k * k)).
    weight = head.task_heads[0].heatmap[0].conv.weight
    expected_std = (2.0 / (64 * 9)) ** 0.5
    assert abs(weight.std().item() / expected_std - 1) < 0.05
    shared = head.shared_conv.conv.weight
    assert abs(shared.std().item() / expected_std - 1) < 0.05


def test_forward_shapes_tiny():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 12, 10)
    proposal = CenterHeadProposal(in_channels=16, head_channels=8)
    out = proposal(x)
    assert [tuple(o["heatmap"].shape) for o in out] == [(2, len(g), 12, 10) for g in TASKS]
    reg = CenterHeadReg(in_channels=16, head_channels=8, code_weights=UNIFORM_WEIGHTS)
    out = reg(x)
    for task_out in out:
        assert list(task_out) == list(REG_BRANCHES)
        assert {k: tuple(v.shape) for k, v in task_out.items()} == {
            k: (2, c, 12, 10) for k, c in REG_BRANCHES.items()
        }


def test_proposal_forward_real_shape():
    head = CenterHeadProposal(in_channels=256).eval()
    with torch.no_grad():
        out = head(torch.randn(1, 256, 128, 128))
    assert [tuple(o["heatmap"].shape) for o in out] == [(1, len(g), 128, 128) for g in TASKS]


@pytest.mark.parametrize("channels", [80, 160])
def test_reg_forward_real_shape(channels):
    head = CenterHeadReg(in_channels=channels, code_weights=UNIFORM_WEIGHTS).eval()
    with torch.no_grad():
        out = head(torch.randn(1, channels, 128, 128))
    assert len(out) == 6
    assert all(tuple(o["dim"].shape) == (1, 3, 128, 128) for o in out)


def test_separate_head_layout_and_bias():
    head = SeparateHead(8, {"heatmap": 2, "reg": 3}, head_channels=4, final_kernel=3, num_convs=3, init_bias=-1.5)
    names = list(head.state_dict())
    assert names[0] == "heatmap.0.conv.weight"
    assert "heatmap.1.conv.weight" in names and "heatmap.2.weight" in names and "reg.2.bias" in names
    assert torch.equal(head.heatmap[2].bias, torch.full((2,), -1.5))
    assert torch.equal(head.reg[2].bias, torch.zeros(3))


def test_gather_cells_matches_indexing():
    torch.manual_seed(0)
    feature = torch.randn(2, 3, 4, 5)
    index = torch.tensor([[0, 7, 19], [5, 5, 12]])
    out = gather_cells(feature, index)
    for b in range(2):
        for m in range(3):
            row, col = divmod(int(index[b, m]), 5)
            assert torch.equal(out[b, m], feature[b, :, row, col])


# A tiny target grid: 16 x 16 cells of 0.8 m.
TINY_RANGE = (-6.4, -6.4, -5.0, 6.4, 6.4, 3.0)


def _tiny_builder() -> TargetBuilder:
    return TargetBuilder(point_cloud_range=TINY_RANGE, voxel_size=(0.1, 0.1, 0.2), out_size_factor=8, max_objs=8)


def _boxes_for_every_task() -> tuple[torch.Tensor, torch.Tensor]:
    """One box of every class plus a second box of the second class of each two-class task.

    Every task then has an odd number of objects, so the L1 gradient (a sum of +-code_weight per object and
    component) can never cancel to exactly zero.
    """
    boxes, labels = [], []
    for i, cls in enumerate((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 2, 4, 7, 9)):
        x = -5.5 + 1.2 * (i % 10)
        y = (3.0 if cls % 2 else -3.0) + (1.6 if i >= 10 else 0.0)
        boxes.append([x, y, 0.5, 2.0, 1.0, 1.5, 0.3 * cls, 1.0, -0.5])
        labels.append(cls)
    return torch.tensor(boxes), torch.tensor(labels)


def test_losses_reach_every_parameter():
    torch.manual_seed(0)
    builder = _tiny_builder()
    boxes, labels = _boxes_for_every_task()
    targets = builder([boxes, boxes[:0]], [labels, labels[:0]])
    proposal = CenterHeadProposal(in_channels=8, head_channels=8)
    reg = CenterHeadReg(in_channels=6, head_channels=8, code_weights=STAGE1_WEIGHTS)
    x = torch.randn(2, 8, 16, 16)
    refined = torch.randn(2, 6, 16, 16)
    losses = proposal.loss(proposal(x), targets)
    losses.update(reg.loss(reg(refined), targets))
    expected = {f"task{t}.loss_heatmap" for t in range(6)}
    expected |= {f"task{t}.loss_{s}" for t in range(6) for s in ("xy", "z", "whl", "yaw", "vel")}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for module in (proposal, reg):
        for name, param in module.named_parameters():
            assert param.grad is not None, name
            assert torch.count_nonzero(param.grad) > 0, name


def test_losses_finite_without_boxes():
    torch.manual_seed(0)
    builder = _tiny_builder()
    empty = torch.zeros(0, 9)
    targets = builder([empty, empty], [torch.zeros(0, dtype=torch.long)] * 2)
    proposal = CenterHeadProposal(in_channels=4, head_channels=4)
    reg = CenterHeadReg(in_channels=4, head_channels=4, code_weights=UNIFORM_WEIGHTS)
    x = torch.randn(2, 4, 16, 16)
    heat = proposal.loss(proposal(x), targets)
    box = reg.loss(reg(x), targets)
    assert all(torch.isfinite(v) for v in heat.values())
    assert all(v.item() == 0.0 for v in box.values())
    (sum(heat.values()) + sum(box.values())).backward()
    assert all(torch.isfinite(p.grad).all() for p in proposal.parameters())


def test_loss_uses_reduce_fn():
    torch.manual_seed(0)
    builder = _tiny_builder()
    boxes, labels = _boxes_for_every_task()
    targets = builder([boxes], [labels])
    proposal = CenterHeadProposal(in_channels=4, head_channels=4)
    reg = CenterHeadReg(in_channels=4, head_channels=4, code_weights=UNIFORM_WEIGHTS)
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        heat_preds, reg_preds = proposal(x), reg(x)
    calls = []

    def doubled(count):
        calls.append(count)
        return count * 2

    plain = proposal.loss(heat_preds, targets)
    reduced = proposal.loss(heat_preds, targets, reduce_fn=doubled)
    assert len(calls) == 6
    for key in plain:
        torch.testing.assert_close(reduced[key], plain[key] / 2, rtol=1e-6, atol=0)
    plain = reg.loss(reg_preds, targets)
    reduced = reg.loss(reg_preds, targets, reduce_fn=doubled)
    # task 0 (car) has one object: n = 1 -> 1e-4-regularised normaliser 1 + 1e-4 vs 2 + 1e-4.
    torch.testing.assert_close(reduced["task0.loss_xy"], plain["task0.loss_xy"] * (1 + 1e-4) / (2 + 1e-4))


def test_config_errors():
    with pytest.raises(ConfigError, match="branches"):
        CenterHeadReg(in_channels=8, branches={"reg": 2, "height": 1}, code_weights=UNIFORM_WEIGHTS)
    with pytest.raises(ConfigError, match="code_weights"):
        CenterHeadReg(in_channels=8, code_weights=(1.0,) * 8)
    with pytest.raises(ConfigError, match="tasks"):
        CenterHeadProposal(tasks=((0,), (0, 1)))
    with pytest.raises(ConfigError, match="tasks"):
        CenterHeadProposal(tasks=((0,), (10,)))
    with pytest.raises(ConfigError, match="in_channels"):
        CenterHeadProposal(in_channels=0)
    with pytest.raises(ConfigError, match="final_kernel"):
        CenterHeadProposal(final_kernel=2)
