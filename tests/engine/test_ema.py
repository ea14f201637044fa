"""ModelEMA: the MEGVII/BEVDepth decay schedule, exact update arithmetic, buffers, unwrapping, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from conftest import free_port
from torch import nn

from bevnext.engine.ema import ModelEMA


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_decay_schedule():
    ema = ModelEMA(_net())
    assert ema.updates == 10560
    assert ema.decay_at(10561) == pytest.approx(0.999 * (1 - math.exp(-10561 / 2000)), rel=1e-12)
    assert 0.99391 < ema.decay_at(10561) < 0.99392  # 0.999 * (1 - exp(-5.2805))
    assert ema.decay_at(0) == 0.0
    assert ema.decay_at(10**7) == pytest.approx(0.999)


def test_copy_is_eval_frozen_and_independent():
    net = _net()
    ema = ModelEMA(net)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in net.parameters())
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)  # what an optimizer step does to the live model
    torch.testing.assert_close(ema.module[0].weight, before, rtol=0, atol=0)


def test_one_update_is_exact():
    net = _net()
    ema = ModelEMA(net)
    old_w = ema.module[0].weight.clone()
    old_mean = ema.module[1].running_mean.clone()
    with torch.no_grad():
        net[0].weight.mul_(-2.0).add_(0.5)
    net.train()
    net(torch.randn(8, 3))  # changes BN running stats and num_batches_tracked
    assert int(net[1].num_batches_tracked) == 1

    ema.update(net)

    assert ema.updates == 10561
    d = 0.999 * (1 - math.exp(-10561 / 2000))
    expected_w = old_w * d + net[0].weight.detach() * (1 - d)
    torch.testing.assert_close(ema.module[0].weight, expected_w, rtol=1e-6, atol=1e-7)
    expected_mean = old_mean * d + net[1].running_mean * (1 - d)
    torch.testing.assert_close(ema.module[1].running_mean, expected_mean, rtol=1e-6, atol=1e-7)
    assert int(ema.module[1].num_batches_tracked) == 1  # integer buffers are copied, not averaged
    assert not ema.module[0].weight.requires_grad


def test_matches_by_name_after_syncbn_conversion():
    net = _net()
    ema = ModelEMA(net)
    live = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # module class changes, state-dict names do not
    with torch.no_grad():
        live[1].running_var.fill_(3.0)
    ema.update(live)
    d = ema.decay_at(10561)
    torch.testing.assert_close(ema.module[1].running_var, torch.full((4,), d * 1.0 + (1 - d) * 3.0))
    assert isinstance(ema.module[1], nn.BatchNorm1d) and not isinstance(ema.module[1], nn.SyncBatchNorm)


def test_missing_entry_is_an_error():
    ema = ModelEMA(_net())
    with pytest.raises(KeyError, match="state-dict entries"):
        ema.update(nn.Sequential(nn.Linear(3, 4)))


def test_state_dict_round_trip():
    net = _net()
    ema = ModelEMA(net)
    with torch.no_grad():
        net[2].bias.fill_(7.0)
    for _ in range(3):
        ema.update(net)
    saved = ema.state_dict()
    assert set(saved) == {"state_dict", "updates"} and saved["updates"] == 10563
    saved = {"state_dict": {k: v.clone() for k, v in saved["state_dict"].items()}, "updates": saved["updates"]}

    other = ModelEMA(_net(), updates=0)
    other.load_state_dict(saved)
    assert other.updates == 10563
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(other.module.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_unwraps_ddp():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        net = _net()
        ddp = nn.parallel.DistributedDataParallel(net)
        ema = ModelEMA(ddp)
        assert not isinstance(ema.module, nn.parallel.DistributedDataParallel)
        assert set(ema.module.state_dict()) == set(net.state_dict())  # no "module." prefix
        with torch.no_grad():
            net[0].bias.fill_(1.0)
        ema.update(ddp)
        d = ema.decay_at(10561)
        old = _net()[0].bias.detach()
        torch.testing.assert_close(ema.module[0].bias, old * d + (1 - d))
    finally:
        dist.destroy_process_group()
