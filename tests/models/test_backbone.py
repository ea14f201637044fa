"""Image backbone (ResNet) and image neck (CustomFPN): reference state-dict layout, shapes, checkpointing,
pretrained-weight loading, and the FPN against a functional oracle.

The state-dict checks compare against ``tests/models/reference/reference-stage{1,2}-state-dict.tsv``
(read through ``reference_layout``).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from reference_layout import reference_rows, state_rows
from torch import nn

from bevnext.errors import ConfigError
from bevnext.models.backbone import ResNetBackbone, pretrained_weights_path
from bevnext.models.image_neck import CustomFPN


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def resnet50() -> ResNetBackbone:
    torch.manual_seed(0)
    return ResNetBackbone(depth=50, out_indices=(1, 2, 3), pretrained=None)


# -- ResNet ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2])
def test_resnet50_matches_reference_state_dict(resnet50, stage):
    assert state_rows(resnet50) == reference_rows(stage, "img_backbone.")
    assert num_params(resnet50) == 23_508_032


def test_resnet50_output_shapes_at_256x704(resnet50):
    resnet50.eval()
    with torch.no_grad():
        outs = resnet50(torch.randn(1, 3, 256, 704))
    assert [tuple(o.shape) for o in outs] == [(1, 512, 32, 88), (1, 1024, 16, 44), (1, 2048, 8, 22)]
    assert resnet50.out_channels == [512, 1024, 2048]


def test_resnet18_strides_and_channels():
    net = ResNetBackbone(depth=18, out_indices=(0, 1, 2, 3), pretrained=None).eval()
    with torch.no_grad():
        outs = net(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]
    assert net.out_channels == [64, 128, 256, 512]
    # Early stop: only the stages up to the last requested one run, but all four are built.
    partial = ResNetBackbone(depth=18, out_indices=(1,), pretrained=None)
    assert set(dict(partial.named_children())) >= {"layer1", "layer2", "layer3", "layer4"}
    assert [tuple(o.shape) for o in partial(torch.randn(2, 3, 64, 96))] == [(2, 128, 8, 12)]


def test_narrow_resnet_scales_every_stage_width():
    net = ResNetBackbone(depth=18, out_indices=(1, 2, 3), pretrained=None, base_channels=32).eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 8, 12), (1, 128, 4, 6), (1, 256, 2, 3)]
    assert net.out_channels == [64, 128, 256]
    full = ResNetBackbone(depth=18, pretrained=None)
    assert sum(p.numel() for p in net.parameters()) < 0.3 * sum(p.numel() for p in full.parameters())


def _train_step(net: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    outs = net(x)
    loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], {k: p.grad.clone() for k, p in net.named_parameters()}


@pytest.mark.parametrize("depth", [18, 50])
def test_checkpointing_gives_identical_outputs_gradients_and_bn_statistics(depth):
    torch.manual_seed(1)
    plain = ResNetBackbone(depth=depth, out_indices=(1, 2, 3), pretrained=None)
    ckpt = ResNetBackbone(depth=depth, out_indices=(1, 2, 3), with_cp=True, pretrained=None)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    outs_a, grads_a = _train_step(plain, x)
    outs_b, grads_b = _train_step(ckpt, x)
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-5, atol=1e-6, msg=k)
    # The recomputation in the backward must not update BN running statistics a second time.
    for (k, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert int(ckpt.bn1.num_batches_tracked) == 1


@pytest.fixture
def hub_dir(tmp_path):
    """An empty, private torch hub directory (restored afterwards)."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def test_pretrained_auto_loads_torchvision_file_from_hub_cache(hub_dir):
    torch.manual_seed(4)
    source = ResNetBackbone(depth=18, pretrained=None)
    state = dict(source.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # torchvision's classifier
    path = pretrained_weights_path(18)
    assert path == hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    loaded = ResNetBackbone(depth=18, pretrained="auto", require_pretrained=True)
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_pretrained_path_accepts_detector_checkpoint_with_backbone_prefix(tmp_path):
    torch.manual_seed(5)
    source = ResNetBackbone(depth=18, pretrained=None)
    nested = {"state_dict": {f"backbone.{k}": v for k, v in source.state_dict().items()}, "meta": {"epoch": 20}}
    nested["state_dict"]["neck.conv.weight"] = torch.zeros(1)
    path = tmp_path / "detector.pth"
    torch.save(nested, path)
    loaded = ResNetBackbone(depth=18, pretrained=str(path))
    torch.testing.assert_close(loaded.conv1.weight, source.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(loaded.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var, rtol=0, atol=0)


def test_pretrained_mismatching_file_is_a_config_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(ResNetBackbone(depth=18, pretrained=None).state_dict(), path)
    with pytest.raises(ConfigError, match="r18.pth"):
        ResNetBackbone(depth=34, pretrained=str(path))
    with pytest.raises(ConfigError, match="not found"):
        ResNetBackbone(depth=18, pretrained=str(tmp_path / "missing.pth"))


def test_missing_pretrained_weights_warn_once_or_raise(hub_dir, caplog):
    expected = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    with caplog.at_level(logging.WARNING, logger="bevnext.models.backbone"):
        ResNetBackbone(depth=18, pretrained="auto")
        ResNetBackbone(depth=18, pretrained="auto")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "bevnext.models.backbone"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert str(expected) in message
    assert "not found in the torch hub cache; training from random initialisation" in message
    with pytest.raises(ConfigError, match="resnet18-f37072fd.pth"):
        ResNetBackbone(depth=18, pretrained="auto", require_pretrained=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"depth": 42}, "depth"), ({"out_indices": (3, 1)}, "out_indices"), ({"out_indices": (4,)}, "out_indices"),
     ({"base_channels": 12}, "multiple of 8"), ({"base_channels": 32, "pretrained": "auto"}, "ImageNet weights")],
)
def test_backbone_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ResNetBackbone(**{"depth": 18, "pretrained": None, **kwargs})


# -- CustomFPN ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2])
def test_fpn_matches_reference_state_dict(stage):
    neck = CustomFPN((512, 1024, 2048), 512)
    assert state_rows(neck) == reference_rows(stage, "img_neck.")
    assert num_params(neck) == 4_196_352


def _nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize by explicit index arithmetic: source index = floor(dst * in / out)."""
    rows = [(i * x.shape[2]) // size[0] for i in range(size[0])]
    cols = [(j * x.shape[3]) // size[1] for j in range(size[1])]
    return x[:, :, rows][:, :, :, cols]


@pytest.mark.parametrize("sizes", [[(8, 12), (4, 6), (2, 3)], [(7, 11), (4, 6), (2, 3)]])
def test_fpn_forward_matches_functional_oracle(sizes):
    torch.manual_seed(6)
    neck = CustomFPN((4, 6, 8), 5)
    with torch.no_grad():
        for p in neck.parameters():
            p.copy_(torch.randn_like(p))  # non-zero biases too
    feats = [torch.randn(2, c, *s) for c, s in zip((4, 6, 8), sizes)]
    lat = [F.conv2d(x, neck.lateral_convs[i].conv.weight, neck.lateral_convs[i].conv.bias) for i, x in enumerate(feats)]
    top1 = lat[1] + _nearest(lat[2], sizes[1])
    top0 = lat[0] + _nearest(top1, sizes[0])
    expected = F.conv2d(top0, neck.fpn_convs[0].conv.weight, neck.fpn_convs[0].conv.bias, padding=1)
    out = neck(feats)
    assert out.shape == (2, 5, *sizes[0])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_fpn_init_is_xavier_uniform_with_zero_bias():
    neck = CustomFPN((512, 1024, 2048), 512)
    for m in neck.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            bound = (6.0 / (fan_in + fan_out)) ** 0.5
            assert float(m.weight.detach().abs().max()) <= bound
            # Spread over the whole range (not a smaller init); 0.9 holds with overwhelming probability.
            assert float(m.weight.detach().abs().max()) > 0.9 * bound
            assert float(m.bias.detach().abs().max()) == 0.0


def test_fpn_config_errors():
    with pytest.raises(ConfigError, match="in_channels"):
        CustomFPN((), 8)
    with pytest.raises(ConfigError, match="out_channels"):
        CustomFPN((4,), 0)
