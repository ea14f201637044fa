"""DepthNet: the camera-aware input, the forward against a functional oracle, checkpointing, sizes, config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bevnext.errors import ConfigError
from bevnext.models.depth_net import DepthNet, camera_aware_input
from bevnext.ops import deform_conv2d
from bevnext.structures.cameras import CameraGeometry


def test_camera_aware_input_order():
    B, N = 2, 3
    base = torch.arange(B * N, dtype=torch.float64).view(B, N, 1, 1) * 1000
    intr = base + torch.arange(9, dtype=torch.float64).view(3, 3) + 1  # K[i, j] = 1 + 3 i + j (+ camera offset)
    prot = base + torch.arange(9, dtype=torch.float64).view(3, 3) + 11
    ptrans = base[..., 0] + torch.tensor([21.0, 22.0, 23.0], dtype=torch.float64)
    bda = torch.arange(B, dtype=torch.float64).view(B, 1, 1) * 1000 + torch.arange(9, dtype=torch.float64).view(3, 3)
    rot = base + torch.arange(9, dtype=torch.float64).view(3, 3) + 31
    trans = base[..., 0] + torch.tensor([41.0, 42.0, 43.0], dtype=torch.float64)
    out = camera_aware_input(CameraGeometry(rot, trans, intr, prot, ptrans, bda))
    assert out.shape == (B, N, 27)
    for b in range(B):
        for n in range(N):
            K, P, pt, A, R, t = intr[b, n], prot[b, n], ptrans[b, n], bda[b], rot[b, n], trans[b, n]
            expected = [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]
            expected += [P[0, 0], P[0, 1], pt[0], P[1, 0], P[1, 1], pt[1]]
            expected += [A[0, 0], A[0, 1], A[1, 0], A[1, 1], A[2, 2]]
            expected += [R[0, 0], R[0, 1], R[0, 2], t[0], R[1, 0], R[1, 1], R[1, 2], t[1]]
            expected += [R[2, 0], R[2, 1], R[2, 2], t[2]]
            assert out[b, n].tolist() == [float(v) for v in expected]


def test_camera_geometry_checks_shapes_once_and_frames():
    eye = torch.eye(3).expand(1, 2, 3, 3)
    zero = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=r"bda must have shape \(1, 3, 3\)"):
        CameraGeometry(eye, zero, eye, eye, zero, torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="post_trans"):
        CameraGeometry(eye, zero, eye, eye, torch.zeros(1, 2, 2), torch.eye(3)[None])
    frames = CameraGeometry(
        eye[:, None].expand(1, 4, 2, 3, 3), zero[:, None].expand(1, 4, 2, 3), eye[:, None].expand(1, 4, 2, 3, 3),
        eye[:, None].expand(1, 4, 2, 3, 3), zero[:, None].expand(1, 4, 2, 3), torch.eye(3)[None],
    )
    assert frames.num_frames == 4 and frames.frame(3).num_frames is None and frames.frame(3).num_cams == 2
    with pytest.raises(ValueError, match="one frame's"):
        camera_aware_input(frames)


def randomise_(module: nn.Module, seed: int) -> None:
    """Random weights (zero-initialised offset conv included) and random BN running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (0.05 if "conv_offset" in name else 0.3))
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _bn(x, m):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = (m.running_var + m.eps).rsqrt()
    return (x - m.running_mean.view(shape)) * (inv * m.weight).view(shape) + m.bias.view(shape)


def _conv(x, conv, **kw):
    return F.conv2d(x, conv.weight, conv.bias, **kw)


def depth_net_oracle(net: DepthNet, x: torch.Tensor, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode DepthNet written out with functional ops (deformable conv from bevnext.ops)."""
    cam = _bn(mlp, net.bn)
    feat = F.relu(_bn(_conv(x, net.reduce_conv[0], padding=1), net.reduce_conv[1]))

    def gate(mlp_mod, se):
        hidden = F.linear(
            F.relu(F.linear(cam, mlp_mod.fc1.weight, mlp_mod.fc1.bias)), mlp_mod.fc2.weight, mlp_mod.fc2.bias
        )
        g = _conv(F.relu(_conv(hidden[:, :, None, None], se.conv_reduce)), se.conv_expand)
        return feat * torch.sigmoid(g)

    ctx = gate(net.context_mlp, net.context_se)
    dcn = net.context_conv[0]
    offset = _conv(ctx, dcn.conv_offset, padding=1)
    ctx = deform_conv2d(ctx, offset, dcn.weight, None, padding=1, groups=4)
    ctx = F.relu(_bn(ctx, net.context_conv[1]))
    ctx = _conv(ctx, net.context_conv[3])

    depth = gate(net.depth_mlp, net.depth_se)
    for block in net.depth_conv[:3]:
        out = F.relu(_bn(_conv(depth, block.conv1, padding=1), block.bn1))
        depth = F.relu(_bn(_conv(out, block.conv2, padding=1), block.bn2) + depth)
    aspp = net.depth_conv[3]
    branches = [F.relu(_bn(_conv(depth, aspp.aspp1.atrous_conv), aspp.aspp1.bn))]
    for branch, d in ((aspp.aspp2, 6), (aspp.aspp3, 12), (aspp.aspp4, 18)):
        branches.append(F.relu(_bn(_conv(depth, branch.atrous_conv, padding=d, dilation=d), branch.bn)))
    pooled = depth.mean(dim=(2, 3), keepdim=True)
    pooled = F.relu(_bn(_conv(pooled, aspp.global_avg_pool[1]), aspp.global_avg_pool[2]))
    branches.append(pooled.expand_as(branches[0]))
    depth = F.relu(_bn(_conv(torch.cat(branches, dim=1), aspp.conv1), aspp.bn1))  # dropout: identity in eval
    depth = _conv(depth, net.depth_conv[4])
    return depth, ctx


def tiny_net(**kw) -> DepthNet:
    return DepthNet(in_channels=6, mid_channels=8, context_channels=5, depth_channels=7, **kw)


def test_forward_matches_functional_oracle():
    torch.manual_seed(0)
    net = tiny_net()
    randomise_(net, seed=1)
    net.eval()
    x, mlp = torch.randn(3, 6, 5, 6), torch.randn(3, 27)
    with torch.no_grad():
        depth, ctx = net(x, mlp)
        exp_depth, exp_ctx = depth_net_oracle(net, x, mlp)
    assert depth.shape == (3, 7, 5, 6) and ctx.shape == (3, 5, 5, 6)
    torch.testing.assert_close(depth, exp_depth, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ctx, exp_ctx, rtol=1e-4, atol=1e-4)
    # (B, N, 27) camera input is accepted as well.
    with torch.no_grad():
        torch.testing.assert_close(net(x, mlp.view(1, 3, 27))[0], depth)


def _step(net: DepthNet, x, mlp, seed):
    torch.manual_seed(seed)  # the same ASPP dropout mask for both runs
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    depth, ctx = net(x, mlp)
    (depth.square().sum() + ctx.sin().sum()).backward()
    return depth.detach(), ctx.detach(), x.grad, {k: p.grad.clone() for k, p in net.named_parameters()}


def test_checkpointing_matches_plain_training_step():
    torch.manual_seed(2)
    plain, ckpt = tiny_net(), tiny_net(with_cp=True)
    randomise_(plain, seed=3)
    ckpt.load_state_dict(plain.state_dict())
    x, mlp = torch.randn(4, 6, 5, 6), torch.randn(4, 27)
    da, ca, gxa, ga = _step(plain, x, mlp, seed=7)
    db, cb, gxb, gb = _step(ckpt, x, mlp, seed=7)
    torch.testing.assert_close(da, db, rtol=0, atol=0)
    torch.testing.assert_close(ca, cb, rtol=0, atol=0)
    torch.testing.assert_close(gxa, gxb)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-6, msg=k)
    for (k, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)  # BN statistics updated once, not twice


@pytest.mark.parametrize("context, params", [(80, 7_603_214), (160, 7_623_774)])
def test_reference_parameter_count(context, params):
    net = DepthNet(512, 256, context, 118)
    assert sum(p.numel() for p in net.parameters()) == params


def test_full_size_forward_shapes():
    net = DepthNet(512, 256, 80, 118).eval()
    with torch.no_grad():
        depth, ctx = net(torch.randn(2, 512, 32, 88), torch.randn(2, 27))
    assert depth.shape == (2, 118, 32, 88) and ctx.shape == (2, 80, 32, 88)


def test_without_dcn_same_names_except_offset_conv():
    with_dcn, without = tiny_net(), tiny_net(use_dcn=False)
    expected = {k: v.shape for k, v in with_dcn.state_dict().items() if "conv_offset" not in k}
    assert {k: v.shape for k, v in without.state_dict().items()} == expected
    depth, ctx = without.eval()(torch.randn(2, 6, 5, 6), torch.randn(2, 27))
    assert depth.shape == (2, 7, 5, 6) and ctx.shape == (2, 5, 5, 6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mid_channels": 10}, "mid_channels"),
        ({"context_channels": 0}, "context_channels"),
        ({"depth_channels": 0}, "depth_channels"),
        ({"in_channels": -1}, "in_channels"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DepthNet(**{"in_channels": 6, "mid_channels": 8, "context_channels": 5, "depth_channels": 7, **kwargs})
