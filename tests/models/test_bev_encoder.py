"""BEV-side networks: reference state-dict layout, shapes at the real BEV size, and behaviour against oracles.

The state-dict checks compare against the reference name/shape/dtype lists in ``tests/models/reference``
(read through ``reference_layout``). The oracles below are written out with functional ops, independently of the
modules' code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference_layout import reference_rows, state_rows
from torch import Tensor, nn

from bevnext.errors import ConfigError
from bevnext.models.bev_encoder import FPNLSS, BEVResNet
from bevnext.models.res2fusion import Bottle2neck, FusionLayer, Res2Fusion, Res2Layer


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# The reference modules for C = 80 (stage 1) and C = 160 (stage 2).
def _pre_process_net(c: int) -> BEVResNet:
    return BEVResNet(c, num_layers=[2], strides=[1], channels=[c])


def _stage1_backbone() -> BEVResNet:
    return BEVResNet(80, num_layers=[2, 2, 2], strides=[2, 2, 2], channels=[160, 320, 640])


def _bn_random(module: nn.Module, generator: torch.Generator) -> None:
    """Random BN affine parameters and running statistics, so eval-mode oracles test the BN wiring."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)


def _bn(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    shape = (1, -1, 1, 1)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (x - bn.running_mean.view(shape)) * scale.view(shape) + bn.bias.view(shape)


# ---------------------------------------------------------------------------------------------------------------
# Reference layout: names, shapes, dtypes (in state-dict order) and parameter counts


@pytest.mark.parametrize(("stage", "c"), [(1, 80), (2, 160)])
def test_pre_process_net_matches_reference(stage: int, c: int) -> None:
    net = _pre_process_net(c)
    assert state_rows(net) == reference_rows(stage, "pre_process_net.")
    assert _numel(net) == {1: 288_720, 2: 1_153_440}[stage]


def test_stage1_backbone_matches_reference() -> None:
    net = _stage1_backbone()
    assert state_rows(net) == reference_rows(1, "img_bev_encoder_backbone.")
    assert _numel(net) == 19_363_680
    assert [_numel(stage) for stage in net.layers] == [923_040, 3_689_280, 14_751_360]


def test_stage2_backbone_matches_reference() -> None:
    net = Res2Fusion()
    assert state_rows(net) == reference_rows(2, "img_bev_encoder_backbone.")
    assert _numel(net) == 6_855_000
    assert _numel(net.fusion_layer) == 180_920
    assert [_numel(stage) for stage in net.layers] == [319_840, 1_273_280, 5_080_960]
    assert net.fusion_layer.conv1.groups == 3


@pytest.mark.parametrize(("stage", "c"), [(1, 80), (2, 160)])
def test_neck_matches_reference(stage: int, c: int) -> None:
    net = FPNLSS(8 * c + 2 * c)
    assert state_rows(net) == reference_rows(stage, "img_bev_encoder_neck.")
    assert _numel(net) == {1: 7_293_696, 2: 10_980_096}[stage]


# ---------------------------------------------------------------------------------------------------------------
# Shapes at the real BEV size (128 x 128)


@torch.no_grad()
def test_stage1_shapes_at_real_size() -> None:
    x = torch.randn(1, 80, 128, 128)
    pre = _pre_process_net(80).eval()
    out = pre(x)
    assert len(out) == 1 and out[0].shape == (1, 80, 128, 128)
    feats = _stage1_backbone().eval()(out[0])
    assert [tuple(f.shape) for f in feats] == [(1, 160, 64, 64), (1, 320, 32, 32), (1, 640, 16, 16)]
    assert FPNLSS(800).eval()(feats).shape == (1, 256, 128, 128)


@torch.no_grad()
def test_stage2_shapes_at_real_size() -> None:
    x = torch.randn(1, 1440, 128, 128)
    net = Res2Fusion().eval()
    assert net.fusion_layer(x).shape == (1, 160, 128, 128)
    feats = net(x)
    assert [tuple(f.shape) for f in feats] == [(1, 320, 64, 64), (1, 640, 32, 32), (1, 1280, 16, 16)]
    assert FPNLSS(1600).eval()(feats).shape == (1, 256, 128, 128)
    assert _pre_process_net(160).eval()(x[:, :160])[0].shape == (1, 160, 128, 128)


# ---------------------------------------------------------------------------------------------------------------
# FusionLayer behaviour


def _positive_fusion(num_frames: int = 9, c: int = 2) -> FusionLayer:
    """A FusionLayer whose convolutions all have positive weights and whose BNs are the identity (eval,
    default stats): every activation of a positive input is positive, so ReLU never hides a change and the set
    of output pixels changed by an input pixel is exactly that pixel's receptive field."""
    g = torch.Generator().manual_seed(0)
    layer = FusionLayer(c * num_frames, 4, num_frames, scales=3, base_width=64, expansion=1).eval()
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.05)
    return layer


@torch.no_grad()
def test_fusion_older_frames_get_larger_receptive_field() -> None:
    c, num_frames, size, centre = 2, 9, 11, 5
    layer = _positive_fusion(num_frames, c)
    x = torch.rand(1, c * num_frames, size, size, generator=torch.Generator().manual_seed(1)) + 0.1
    base = layer(x)
    # Frames 0..2 (key, t-1, t-2) pass no 3x3 conv, frames 3..5 one, frames 6..8 (oldest) two.
    expected_radius = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 2, 7: 2, 8: 2}
    for frame, radius in expected_radius.items():
        bumped = x.clone()
        bumped[0, frame * c, centre, centre] += 1.0
        changed = (layer(bumped) - base).abs().amax(dim=(0, 1)) > 1e-6
        want = torch.zeros(size, size, dtype=torch.bool)
        want[centre - radius : centre + radius + 1, centre - radius : centre + radius + 1] = True
        assert torch.equal(changed, want), f"frame {frame}: receptive field radius != {radius}"


@torch.no_grad()
def test_fusion_newest_group_passes_through_to_final_conv() -> None:
    g = torch.Generator().manual_seed(2)
    layer = FusionLayer(2 * 9, 8, 9, scales=3, base_width=64, expansion=2)
    _bn_random(layer, g)
    layer.eval()
    captured: dict[str, Tensor] = {}
    # Clone: the BN output is rectified in place by the following ReLU.
    layer.bn1.register_forward_hook(lambda m, i, o: captured.__setitem__("bn1", o.clone()))
    layer.conv3.register_forward_hook(lambda m, i, o: captured.__setitem__("conv3_in", i[0].clone()))
    layer(torch.randn(2, 18, 6, 7, generator=g))
    w = layer.width
    newest = F.relu(captured["bn1"][:, :w])  # group 0 = frames {key, t-1, t-2}
    assert torch.equal(captured["conv3_in"][:, -w:], newest)


def _fusion_oracle(layer: FusionLayer, x: Tensor) -> Tensor:
    """FusionLayer in eval mode, with the grouped 1x1 conv written as one convolution per frame group."""
    s, w = layer.scales, layer.width
    cin = x.shape[1] // s
    hidden = torch.cat(
        [F.conv2d(x[:, gi * cin : (gi + 1) * cin], layer.conv1.weight[gi * w : (gi + 1) * w]) for gi in range(s)],
        dim=1,
    )
    hidden = F.relu(_bn(hidden, layer.bn1))
    oldest_first = [hidden[:, gi * w : (gi + 1) * w] for gi in reversed(range(s))]
    y = F.relu(_bn(F.conv2d(oldest_first[0], layer.convs[0].weight, padding=1), layer.bns[0]))
    outs = [y]
    for i in range(1, s - 1):
        y = F.relu(_bn(F.conv2d(y + oldest_first[i], layer.convs[i].weight, padding=1), layer.bns[i]))
        outs.append(y)
    outs.append(oldest_first[-1])
    return F.relu(_bn(F.conv2d(torch.cat(outs, 1), layer.conv3.weight), layer.bn3))


@pytest.mark.parametrize(("num_frames", "scales"), [(9, 3), (4, 4), (2, 2)])
@torch.no_grad()
def test_fusion_matches_oracle(num_frames: int, scales: int) -> None:
    g = torch.Generator().manual_seed(3)
    layer = FusionLayer(3 * num_frames, 6, num_frames, scales=scales, base_width=48, expansion=2)
    _bn_random(layer, g)
    layer.eval()
    x = torch.randn(2, 3 * num_frames, 5, 6, generator=g)
    torch.testing.assert_close(layer(x), _fusion_oracle(layer, x))


# ---------------------------------------------------------------------------------------------------------------
# Res2Net blocks and BEVResNet against oracles


def _bottle2neck_oracle(block: Bottle2neck, x: Tensor, stride: int) -> Tensor:
    s, w = block.scales, block.width
    hidden = F.relu(_bn(F.conv2d(x, block.conv1.weight), block.bn1))
    chunks = [hidden[:, i * w : (i + 1) * w] for i in range(s)]
    outs = []
    for i in range(s - 1):
        inp = chunks[i] if (i == 0 or block.stage_block) else outs[-1] + chunks[i]
        outs.append(F.relu(_bn(F.conv2d(inp, block.convs[i].weight, stride=stride, padding=1), block.bns[i])))
    last = chunks[-1]
    if block.stage_block:
        last = F.avg_pool2d(last, 3, stride=stride, padding=1)
    outs.append(last)
    out = _bn(F.conv2d(torch.cat(outs, 1), block.conv3.weight), block.bn3)
    if block.downsample is None:
        identity = x
    else:
        _pool, conv, bn = block.downsample
        pooled = F.avg_pool2d(x, stride, stride=stride, ceil_mode=True, count_include_pad=False)
        identity = _bn(F.conv2d(pooled, conv.weight), bn)
    return F.relu(out + identity)


@pytest.mark.parametrize(("in_c", "out_c", "stride", "size"), [(8, 16, 2, 7), (16, 16, 1, 6), (8, 16, 1, 5)])
@torch.no_grad()
def test_res2layer_matches_oracle(in_c: int, out_c: int, stride: int, size: int) -> None:
    g = torch.Generator().manual_seed(4)
    layer = Res2Layer(in_c, out_c, num_blocks=2, scales=4, base_width=32, expansion=2, stride=stride)
    _bn_random(layer, g)
    layer.eval()
    assert layer[0].stage_block and not layer[1].stage_block
    assert (layer[0].downsample is None) == (stride == 1 and in_c == out_c)
    x = torch.randn(2, in_c, size, size, generator=g)
    want = _bottle2neck_oracle(layer[1], _bottle2neck_oracle(layer[0], x, stride), 1)
    got = layer(x)
    assert got.shape[-1] == -(-size // stride)  # ceil: odd sizes keep their border (shortcut pools in ceil mode)
    torch.testing.assert_close(got, want)


def _basic_block_oracle(block: nn.Module, x: Tensor, stride: int) -> Tensor:
    out = F.relu(_bn(F.conv2d(x, block.conv1.weight, stride=stride, padding=1), block.bn1))
    out = _bn(F.conv2d(out, block.conv2.weight, padding=1), block.bn2)
    if block.downsample is None:
        identity = x
    else:  # a plain 3x3 conv with bias, no BN
        identity = F.conv2d(x, block.downsample.weight, block.downsample.bias, stride=stride, padding=1)
    return F.relu(out + identity)


@torch.no_grad()
def test_bev_resnet_matches_oracle() -> None:
    g = torch.Generator().manual_seed(5)
    net = BEVResNet(3, num_layers=[2, 1], strides=[1, 2], channels=[3, 5])
    _bn_random(net, g)
    net.eval()
    x = torch.randn(2, 3, 9, 8, generator=g)
    feats = net(x)
    s0 = _basic_block_oracle(net.layers[0][1], _basic_block_oracle(net.layers[0][0], x, 1), 1)
    s1 = _basic_block_oracle(net.layers[1][0], s0, 2)
    assert len(feats) == 2
    torch.testing.assert_close(feats[0], s0)
    torch.testing.assert_close(feats[1], s1)
    assert feats[1].shape == (2, 5, 5, 4)


@torch.no_grad()
def test_fpn_lss_matches_oracle_and_puts_fine_level_first() -> None:
    g = torch.Generator().manual_seed(6)
    neck = FPNLSS(2 + 6, out_channels=4, scale_factor=4, input_feature_index=(0, 2), extra_upsample=2)
    _bn_random(neck, g)
    neck.eval()
    fine, mid, coarse = torch.randn(1, 2, 8, 12, generator=g), torch.randn(1, 3, 4, 6), torch.randn(1, 6, 2, 3)
    # Coarse level = a ramp along x: align_corners=True bilinear upsampling keeps it an exact ramp over the
    # whole output row (end pixels included), which align_corners=False would clamp.
    coarse[:, :, :, :] = torch.arange(3.0).view(1, 1, 1, 3)
    captured: dict[str, Tensor] = {}
    neck.conv[0].register_forward_hook(lambda m, i, o: captured.__setitem__("in", i[0].clone()))
    out = neck([fine, mid, coarse])
    assert out.shape == (1, 4, 16, 24)
    cat = captured["in"]
    torch.testing.assert_close(cat[:, :2], fine)
    torch.testing.assert_close(cat[:, 2:], torch.linspace(0.0, 2.0, 12).expand(1, 6, 8, 12))

    def cbr(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
        return F.relu(_bn(F.conv2d(x, conv.weight, padding=conv.padding), bn))

    x = cbr(cbr(cat, neck.conv[0], neck.conv[1]), neck.conv[3], neck.conv[4])
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    x = cbr(x, neck.up2[1], neck.up2[2])
    x = F.conv2d(x, neck.up2[4].weight, neck.up2[4].bias)
    torch.testing.assert_close(out, x)


@torch.no_grad()
def test_fpn_lss_without_extra_upsample() -> None:
    neck = FPNLSS(5, out_channels=4, scale_factor=2, input_feature_index=(0, 1), extra_upsample=None).eval()
    assert neck.up2 is None and neck.conv[0].out_channels == 4
    out = neck([torch.randn(1, 2, 6, 6), torch.randn(1, 3, 3, 3)])
    assert out.shape == (1, 4, 6, 6)
    with pytest.raises(ValueError, match="channels"):
        neck([torch.randn(1, 3, 6, 6), torch.randn(1, 3, 3, 3)])
    with pytest.raises(ValueError, match="upsampled"):
        neck([torch.randn(1, 2, 7, 6), torch.randn(1, 3, 3, 3)])


# ---------------------------------------------------------------------------------------------------------------
# Gradients, checkpointing


def _tiny_res2fusion(with_cp: bool = False) -> Res2Fusion:
    return Res2Fusion(
        in_channels=4,
        num_frames=3,
        channels=(16, 32),
        scales=(4, 3),
        num_blocks=(2, 1),
        base_width=(64, 32),
        expansion=(4, 4),
        strides=(2, 1),
        fusion_scales=3,
        fusion_base_width=64,
        fusion_expansion=1,
        with_cp=with_cp,
    )


def _weighted_loss(outputs: list[Tensor], generator: torch.Generator) -> Tensor:
    # Random weights: a plain sum after a train-mode BN would give some parameters an exactly zero gradient.
    return sum((o * torch.randn(o.shape, generator=generator)).sum() for o in outputs)


@pytest.mark.parametrize("which", ["pre_process", "bev_resnet", "res2fusion", "fpn_lss"])
def test_every_parameter_gets_a_gradient(which: str) -> None:
    g = torch.Generator().manual_seed(7)
    if which == "pre_process":
        net, inputs = BEVResNet(4, [2], [1], [4]), torch.randn(2, 4, 8, 8, generator=g)
    elif which == "bev_resnet":
        net, inputs = BEVResNet(4, [2, 2, 2], [2, 2, 2], [8, 16, 32]), torch.randn(2, 4, 16, 16, generator=g)
    elif which == "res2fusion":
        net, inputs = _tiny_res2fusion(), torch.randn(2, 12, 8, 8, generator=g)
    else:
        net = FPNLSS(8 + 32, out_channels=8)
        inputs = [torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 16, 4, 4), torch.randn(2, 32, 2, 2)]
    out = net.train()(inputs)
    _weighted_loss(out if isinstance(out, list) else [out], g).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("which", ["bev_resnet", "res2fusion"])
def test_checkpointing_is_numerically_identical(which: str) -> None:
    g = torch.Generator().manual_seed(8)
    if which == "bev_resnet":
        plain, ckpt = BEVResNet(4, [2, 1], [2, 2], [8, 8]), BEVResNet(4, [2, 1], [2, 2], [8, 8], with_cp=True)
        x = torch.randn(2, 4, 8, 8, generator=g)
    else:
        plain, ckpt = _tiny_res2fusion(), _tiny_res2fusion(with_cp=True)
        x = torch.randn(2, 12, 8, 8, generator=g)
    ckpt.load_state_dict(plain.state_dict())
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = plain(x1), ckpt(x2)
    for a, b in zip(out1, out2, strict=True):
        torch.testing.assert_close(a, b)
    weights = [torch.randn(o.shape, generator=g) for o in out1]
    sum((o * w).sum() for o, w in zip(out1, weights, strict=True)).backward()
    sum((o * w).sum() for o, w in zip(out2, weights, strict=True)).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for (name, p1), p2 in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)


def test_gradcheck_fusion_layer_float64() -> None:
    layer = FusionLayer(2 * 3, 4, 3, scales=3, base_width=64, expansion=2).double().eval()
    _bn_random(layer, torch.Generator().manual_seed(9))
    x = torch.randn(1, 6, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10)).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,))


# ---------------------------------------------------------------------------------------------------------------
# Invalid configurations fail at construction, naming the argument


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: FusionLayer(100, 16, 9), "in_channels .*num_frames"),
        (lambda: FusionLayer(80, 16, 8, scales=3), "num_frames .*scales"),
        (lambda: FusionLayer(18, 16, 9, scales=1), "scales"),
        (lambda: FusionLayer(18, 2, 9, scales=3, base_width=16, expansion=2), "width"),
        (lambda: FusionLayer(18, 15, 9, scales=3, expansion=2), "expansion"),
        (lambda: Res2Fusion(in_channels=160, num_frames=8), "num_frames .*scales"),
        (lambda: Res2Fusion(channels=(320, 640)), "has 3 entries"),
        (lambda: Res2Fusion(strides=(2, 0, 2)), r"strides\[1\]"),
        (lambda: Res2Fusion(num_blocks=(2, 0, 2)), "num_blocks"),
        (lambda: Res2Fusion(scales=(4, 1, 4)), "scales"),
        (lambda: Res2Fusion(in_channels=0), "in_channels"),
        (lambda: Bottle2neck(8, 16, stride=2, stage_block=False), "stage block"),
        (lambda: BEVResNet(80, [2, 2], [2, 2, 2], [160, 320, 640]), "same length"),
        (lambda: BEVResNet(80, [2, 0, 2], [2, 2, 2], [160, 320, 640]), r"num_layers\[1\]"),
        (lambda: BEVResNet(80, [2], [0], [80]), r"strides\[0\]"),
        (lambda: BEVResNet(0, [2], [1], [80]), "in_channels"),
        (lambda: FPNLSS(800, extra_upsample=0), "extra_upsample"),
        (lambda: FPNLSS(800, scale_factor=0), "scale_factor"),
        (lambda: FPNLSS(800, input_feature_index=(0, 1, 2)), "input_feature_index"),
    ],
)
def test_invalid_configs_raise_config_error(build, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build()


def test_wrong_input_channels_raise() -> None:
    with pytest.raises(ValueError, match="1440"):
        Res2Fusion().fusion_layer(torch.zeros(1, 160, 4, 4))
    with pytest.raises(ValueError, match="80"):
        _pre_process_net(80)(torch.zeros(1, 160, 4, 4))
