"""Head losses against hand formulas; normalisers, code weights, NaN safety, gradchecks."""

from __future__ import annotations

import math

import torch

from bevnext.models.losses import (
    REG_SLICES,
    clip_sigmoid,
    gaussian_focal_loss,
    regression_losses,
    weighted_l1_loss,
)

F32_EPS = torch.finfo(torch.float32).eps


def test_clip_sigmoid_bounds():
    x = torch.tensor([-100.0, -1.0, 0.0, 2.0, 100.0])
    out = clip_sigmoid(x)
    assert float(out[0]) == float(torch.tensor(1e-4)) and float(out[-1]) == float(torch.tensor(1 - 1e-4))
    torch.testing.assert_close(out[1:4], torch.sigmoid(x[1:4]))
    assert torch.equal(x, torch.tensor([-100.0, -1.0, 0.0, 2.0, 100.0]))  # input untouched


def test_gaussian_focal_loss_hand_formula():
    pred = torch.tensor([[0.9, 0.2, 0.05], [0.6, 0.3, 0.99]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.8, 0.1]], dtype=torch.float64)
    total = 0.0
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if t == 1.0:
            total += -math.log(p + 1e-12) * (1 - p) ** 2
        total += -math.log(1 - p + 1e-12) * p**2 * (1 - t) ** 4
    expected = total / (2 + F32_EPS)  # two positives
    out = gaussian_focal_loss(pred, target)
    assert abs(float(out) - expected) < 1e-12
    # alpha / gamma are honoured
    out = gaussian_focal_loss(pred, target, alpha=1.0, gamma=2.0)
    total = 0.0
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if t == 1.0:
            total += -math.log(p + 1e-12) * (1 - p)
        total += -math.log(1 - p + 1e-12) * p * (1 - t) ** 2
    assert abs(float(out) - total / (2 + F32_EPS)) < 1e-12


def test_gaussian_focal_loss_normaliser():
    pred = torch.full((1, 4, 4), 0.2)
    target = torch.zeros(1, 4, 4)
    no_pos = gaussian_focal_loss(pred, target)
    # no positives: normaliser clamps to 1
    expected = 16 * (-math.log(0.8) * 0.04)
    assert abs(float(no_pos) - expected / (1 + F32_EPS)) < 1e-5
    # reduce_fn gives the cross-process mean count; it is clamped to >= 1 after reduction
    target[0, 1, 1] = 1.0
    target[0, 2, 2] = 1.0
    local = gaussian_focal_loss(pred, target)
    quartered = gaussian_focal_loss(pred, target, reduce_fn=lambda c: c / 4)  # mean 0.5 -> clamped to 1
    doubled = gaussian_focal_loss(pred, target, reduce_fn=lambda c: c * 2)
    torch.testing.assert_close(quartered, local * 2)
    torch.testing.assert_close(doubled, local / 2)


def test_weighted_l1_loss_and_nan_safety():
    pred = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    target = torch.tensor([0.5, float("nan"), 4.0])
    weight = torch.tensor([1.0, 0.0, 0.5])
    loss = weighted_l1_loss(pred, target, weight, 2.0)
    assert abs(loss.item() - (0.5 + 0.5) / (2.0 + F32_EPS)) < 1e-7
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert float(pred.grad[1]) == 0.0


def _hand_regression(pred, target, mask, code_weights, loss_weight):
    num = max(float(mask.sum()), 1e-4) + 1e-4
    out = {}
    for name, start, stop in REG_SLICES:
        total = 0.0
        for b in range(pred.shape[0]):
            for m in range(pred.shape[1]):
                if not mask[b, m]:
                    continue
                for c in range(start, stop):
                    total += abs(float(pred[b, m, c]) - float(target[b, m, c])) * code_weights[c]
        out[name] = loss_weight * total / (num + F32_EPS)
    return out


def test_regression_losses_slices_and_code_weights():
    torch.manual_seed(0)
    pred = torch.randn(2, 4, 10, dtype=torch.float64)
    target = torch.randn(2, 4, 10, dtype=torch.float64)
    target[0, 3] = float("nan")  # an empty slot may hold anything
    mask = torch.tensor([[True, False, True, False], [True, True, False, False]])
    weights = (1.0,) * 8 + (0.2, 0.2)
    out = regression_losses(pred, target, mask, weights, loss_weight=0.25, prefix="task3.")
    assert list(out) == ["task3.loss_xy", "task3.loss_z", "task3.loss_whl", "task3.loss_yaw", "task3.loss_vel"]
    expected = _hand_regression(pred, target, mask, weights, 0.25)
    for name, value in expected.items():
        assert abs(float(out[f"task3.loss_{name}"]) - value) < 1e-12, name
    # velocity weight 0.2 scales only the velocity loss, exactly
    full = regression_losses(pred, target, mask, (1.0,) * 10)
    torch.testing.assert_close(out["task3.loss_vel"], 0.2 * full["loss_vel"])
    torch.testing.assert_close(out["task3.loss_xy"], full["loss_xy"])


def test_regression_losses_empty_and_reduce():
    pred = torch.randn(1, 3, 10)
    target = torch.randn(1, 3, 10)
    mask = torch.zeros(1, 3, dtype=torch.bool)
    out = regression_losses(pred, target, mask, (1.0,) * 10)
    assert all(float(v) == 0.0 for v in out.values())
    mask[0, 0] = True
    local = regression_losses(pred, target, mask, (1.0,) * 10)
    reduced = regression_losses(pred, target, mask, (1.0,) * 10, reduce_fn=lambda c: c * 3)
    for key in local:
        torch.testing.assert_close(reduced[key], local[key] * (1 + 1e-4) / (3 + 1e-4))


def test_gradcheck_float64():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 3, 3, dtype=torch.float64) * 0.9
    target[0, 1, 1] = 1.0
    assert torch.autograd.gradcheck(lambda x: gaussian_focal_loss(clip_sigmoid(x), target), (logits,))
    pred = torch.randn(1, 3, 10, dtype=torch.float64, requires_grad=True)
    # keep |pred - target| away from 0 where the L1 kink is
    reg_target = pred.detach() + torch.where(torch.rand(1, 3, 10) > 0.5, 0.5, -0.5).double()
    mask = torch.tensor([[True, False, True]])
    assert torch.autograd.gradcheck(
        lambda p: sum(regression_losses(p, reg_target, mask, (1.0,) * 8 + (0.2, 0.2)).values()), (pred,)
    )
