"""The reference LR schedule: linear warm-up over 200 iterations from 0.001, step decay at epoch 20."""

from __future__ import annotations

import pytest
import torch

from bevnext.engine.schedule import lr_factor, set_lr


@pytest.mark.parametrize(
    ("iteration", "expected"),
    [
        (0, 0.001),
        (100, 1 - 0.5 * 0.999),  # 0.5005
        (199, 1 - (1 / 200) * 0.999),  # 0.995005
        (200, 1.0),
        (5000, 1.0),
    ],
)
def test_warmup(iteration, expected):
    assert lr_factor(iteration, epoch=0) == pytest.approx(expected, rel=1e-12)


def test_step_decay():
    assert lr_factor(10_000, epoch=11) == 1.0  # stage 2's last epoch: step 20 never reached
    assert lr_factor(10_000, epoch=19) == 1.0
    assert lr_factor(10_000, epoch=20) == pytest.approx(0.1)
    assert lr_factor(10_000, epoch=30, step_epochs=(20, 25)) == pytest.approx(0.01)
    # warm-up scales the decayed rate
    assert lr_factor(100, epoch=20) == pytest.approx(0.1 * 0.5005)


def test_no_warmup_and_bad_arguments():
    assert lr_factor(0, 0, warmup_iters=0) == 1.0
    with pytest.raises(ValueError):
        lr_factor(-1, 0)
    with pytest.raises(ValueError):
        lr_factor(0, 0, warmup_ratio=2.0)


def test_set_lr():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 2e-4}, {"params": [b], "lr": 1.5e-4}])
    base = [g["lr"] for g in opt.param_groups]
    set_lr(opt, base, lr_factor(0, 0))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-7, 1.5e-7])
    set_lr(opt, base, lr_factor(200, 0))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-4, 1.5e-4])
    with pytest.raises(ValueError):
        set_lr(opt, [1e-4], 1.0)
