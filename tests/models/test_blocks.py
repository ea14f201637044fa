"""Shared building blocks: key names, forward against functional oracles, checkpointing semantics, config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevnext.errors import ConfigError
from bevnext.models.blocks import BasicBlock, ConvBNReLU, check_config, maybe_checkpoint


def _randomise(module: nn.Module, seed: int) -> None:
    """Random weights, biases and BN statistics, so an eval-mode oracle tests every term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)


def _bn(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)


# -- check_config ----------------------------------------------------------------------------------------------


def test_check_config_raises_config_error_with_the_message():
    check_config(True, "never raised")
    with pytest.raises(ConfigError, match="^width must be >= 1$"):
        check_config(False, "width must be >= 1")


# -- ConvBNReLU ------------------------------------------------------------------------------------------------


def test_conv_bn_relu_keys_and_unpacking():
    unit = ConvBNReLU(3, 4, 3)
    assert list(unit.state_dict()) == [
        "conv.weight",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    ]
    assert unit.conv.bias is None and isinstance(unit.relu, nn.ReLU)
    # Unpacked into a larger Sequential, the layers are numbered flat (the reference's FPN_LSS keys).
    seq = nn.Sequential(*ConvBNReLU(3, 4), *ConvBNReLU(4, 4))
    assert [k for k in seq.state_dict() if k.endswith("weight")] == ["0.weight", "1.weight", "3.weight", "4.weight"]
    plain = ConvBNReLU(3, 4, 1, bias=True, bn=False, relu=False)
    assert list(plain.state_dict()) == ["conv.weight", "conv.bias"] and len(plain) == 1


@pytest.mark.parametrize(("kernel", "stride", "dilation"), [(3, 1, 1), (1, 1, 1), (3, 2, 1), (3, 1, 6), (5, 1, 2)])
def test_conv_bn_relu_matches_oracle(kernel, stride, dilation):
    unit = ConvBNReLU(3, 4, kernel, stride=stride, dilation=dilation, bias=True)
    _randomise(unit, 0)
    unit.eval()
    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(1))
    pad = dilation * (kernel // 2)
    expected = F.relu(_bn(F.conv2d(x, unit.conv.weight, unit.conv.bias, stride, pad, dilation), unit.bn))
    out = unit(x)
    torch.testing.assert_close(out, expected)
    if stride == 1:
        assert out.shape[-2:] == x.shape[-2:]  # 'same' padding


@pytest.mark.parametrize(("args", "match"), [((0, 4, 3), "channels"), ((3, 4, 2), "kernel_size must be odd")])
def test_conv_bn_relu_config_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        ConvBNReLU(*args)


# -- BasicBlock ------------------------------------------------------------------------------------------------


def _basic_block_oracle(block: BasicBlock, x: Tensor, stride: int, shortcut: Tensor) -> Tensor:
    out = F.relu(_bn(F.conv2d(x, block.conv1.weight, stride=stride, padding=1), block.bn1))
    out = _bn(F.conv2d(out, block.conv2.weight, padding=1), block.bn2)
    return F.relu(out + shortcut)


def test_basic_block_identity_matches_oracle():
    block = BasicBlock(4, 4)
    _randomise(block, 2)
    block.eval()
    x = torch.randn(2, 4, 6, 7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(block(x), _basic_block_oracle(block, x, 1, x))
    assert list(block.state_dict())[0] == "conv1.weight" and "downsample" not in str(list(block.state_dict()))


def test_basic_block_strided_shortcut_matches_oracle():
    shortcut = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    block = BasicBlock(4, 8, 2, shortcut)
    _randomise(block, 4)
    block.eval()
    x = torch.randn(2, 4, 7, 9, generator=torch.Generator().manual_seed(5))
    expected = _basic_block_oracle(block, x, 2, F.conv2d(x, shortcut.weight, shortcut.bias, stride=2, padding=1))
    out = block(x)
    assert out.shape == (2, 8, 4, 5)  # ceil(7 / 2), ceil(9 / 2)
    torch.testing.assert_close(out, expected)
    assert [k for k in block.state_dict() if k.startswith("downsample")] == ["downsample.weight", "downsample.bias"]


def test_basic_block_identity_shortcut_needs_matching_shapes():
    with pytest.raises(ConfigError, match="identity shortcut"):
        BasicBlock(4, 8)
    with pytest.raises(ConfigError, match="identity shortcut"):
        BasicBlock(4, 4, stride=2)


# -- maybe_checkpoint ------------------------------------------------------------------------------------------


def _twins(seed: int) -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(seed)
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU())
    twin = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU())
    twin.load_state_dict(block.state_dict())
    return block, twin


def _step(module: nn.Module, x: Tensor, enabled: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Output, input gradient and a weight gradient of one train-mode step, with a fixed dropout seed."""
    torch.manual_seed(3)
    out = maybe_checkpoint(module, x, enabled)
    gx, gw = torch.autograd.grad(out.square().sum(), (x, module[0].weight))
    return out, gx, gw


def test_checkpoint_gives_the_plain_outputs_gradients_and_dropout_masks():
    block, twin = _twins(2)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    out_a, gx_a, gw_a = _step(block, x, False)
    out_b, gx_b, gw_b = _step(twin, x, True)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    torch.testing.assert_close(gx_a, gx_b)
    torch.testing.assert_close(gw_a, gw_b)


def test_checkpoint_rerun_leaves_bn_statistics_alone():
    block, twin = _twins(4)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    _step(block, x, False)
    _step(twin, x, True)
    for (k, a), b in zip(block.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert int(twin[1].num_batches_tracked) == 1
    assert twin[1].momentum == block[1].momentum  # restored after the recomputation


def test_disabled_checkpoint_is_the_plain_call():
    calls = []
    module = nn.Identity()
    module.register_forward_hook(lambda m, i, o: calls.append(1))
    x = torch.randn(3, requires_grad=True)
    out = maybe_checkpoint(module, x, False)
    out.sum().backward()
    assert out is x and len(calls) == 1  # no re-run in the backward
