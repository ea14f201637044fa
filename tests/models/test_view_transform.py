"""View transformer: frustum, hand-computed lifting, splatting into known BEV cells, the depth loss by hand,
gradients to every parameter, reference state-dict layout, config errors."""

from __future__ import annotations

import math

import pytest
import torch
from reference_layout import reference_rows, state_rows
from torch import nn

from bevnext.errors import ConfigError
from bevnext.models.depth_net import camera_aware_input
from bevnext.models.view_transform import (
    LSSViewTransformer,
    lift_frustum,
    make_frustum,
)
from bevnext.structures.cameras import CameraGeometry

# Optical camera axes (x right, y down, z forward) in an ego frame (x forward, y left, z up) for a camera looking
# along +x: the columns are the camera axes.
FRONT = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)


def yaw(degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def intrinsics_matrix(f: float, cx: float, cy: float) -> torch.Tensor:
    return torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)


def rig(yaws, positions, f, cx, cy, batch=1, dtype=torch.float32):
    """Camera tensors (B, N, ...) without image or BEV augmentation."""
    n = len(yaws)
    rot = torch.stack([yaw(y) @ FRONT for y in yaws]).expand(batch, n, 3, 3)
    trans = torch.tensor(positions, dtype=torch.float64).expand(batch, n, 3)
    intr = intrinsics_matrix(f, cx, cy).expand(batch, n, 3, 3)
    prot = torch.eye(3, dtype=torch.float64).expand(batch, n, 3, 3)
    ptrans = torch.zeros(batch, n, 3, dtype=torch.float64)
    bda = torch.eye(3, dtype=torch.float64).expand(batch, 3, 3)
    return [t.to(dtype).clone() for t in (rot, trans, intr, prot, ptrans, bda)]


# -- frustum and lifting --------------------------------------------------------------------------------------


def test_reference_frustum():
    frustum = make_frustum((256, 704), 8, (1.0, 60.0, 0.5))
    assert frustum.shape == (118, 32, 88, 3)
    assert frustum[0, 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert frustum[-1, -1, -1].tolist() == [703.0, 255.0, 59.5]
    assert frustum[5, 7, 11].tolist() == pytest.approx([11 * 703 / 87, 7 * 255 / 31, 3.5])


def test_lift_one_point_by_hand():
    # 64 x 32 image, stride 8: u = 0, 9, 18, ..., 63; v = 0, 31/3, 62/3, 31; depths 2, 3, 4, 5.
    frustum = make_frustum((32, 64), 8, (2.0, 6.0, 1.0), dtype=torch.float64)
    assert frustum[2, 3, 2].tolist() == [18.0, 31.0, 4.0]
    rot = FRONT.view(1, 1, 3, 3)
    trans = torch.tensor([1.0, 0.5, 1.6], dtype=torch.float64).view(1, 1, 3)
    intr = intrinsics_matrix(100.0, 50.0, 40.0).view(1, 1, 3, 3)
    # Augmented pixel = 0.5 * original pixel + (-10, -5).
    prot = torch.diag(torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64)).view(1, 1, 3, 3)
    ptrans = torch.tensor([-10.0, -5.0, 0.0], dtype=torch.float64).view(1, 1, 3)
    # BEV augmentation: rotate 90 degrees about z, then flip y.
    bda = (torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)) @ yaw(90.0)).view(1, 3, 3)
    points = lift_frustum(frustum, CameraGeometry(rot, trans, intr, prot, ptrans, bda))
    assert points.shape == (1, 1, 4, 4, 8, 3)
    # By hand: original pixel (56, 72); camera point ((56-50)*4/100, (72-40)*4/100, 4) = (0.24, 1.28, 4);
    # ego = (4, -0.24, -1.28) + (1, 0.5, 1.6) = (5, 0.26, 0.32); rotate 90: (-0.26, 5, 0.32); flip y.
    torch.testing.assert_close(points[0, 0, 2, 3, 2], torch.tensor([-0.26, -5.0, 0.32], dtype=torch.float64))


def test_lift_matches_batch_formula_with_rotated_augmentations():
    gen = torch.Generator().manual_seed(0)
    B, N = 2, 3
    frustum = make_frustum((32, 48), 8, (1.0, 4.0, 1.0), dtype=torch.float64)

    def rotation(angle):
        c, s = math.cos(angle), math.sin(angle)
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)

    rot = torch.stack(
        [torch.stack([yaw(float(a)) @ FRONT for a in torch.rand(N, generator=gen) * 360]) for _ in range(B)]
    )
    trans = torch.randn(B, N, 3, generator=gen, dtype=torch.float64)
    intr = intrinsics_matrix(80.0, 20.0, 15.0).expand(B, N, 3, 3).clone()
    intr[..., 0, 0] += torch.rand(B, N, generator=gen, dtype=torch.float64) * 10
    prot = torch.eye(3, dtype=torch.float64).repeat(B, N, 1, 1)
    ptrans = torch.zeros(B, N, 3, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            prot[b, n, :2, :2] = 0.7 * rotation(0.2 * (b * N + n) - 0.3)
            ptrans[b, n, :2] = torch.randn(2, generator=gen, dtype=torch.float64) * 5
    bda = torch.stack([yaw(30.0 * b + 10) * 1.1 for b in range(B)])
    bda[1, 1] *= -1
    points = lift_frustum(frustum, CameraGeometry(rot, trans, intr, prot, ptrans, bda))
    for b in range(B):
        for n in range(N):
            for d, i, j in ((0, 0, 0), (2, 3, 5), (1, 2, 1)):
                u, v, depth = frustum[d, i, j].tolist()
                pix = torch.tensor([u, v, 1.0], dtype=torch.float64)
                cam = depth * torch.linalg.inv(prot[b, n]) @ (pix - ptrans[b, n])
                expected = bda[b] @ (rot[b, n] @ torch.linalg.inv(intr[b, n]) @ cam + trans[b, n])
                torch.testing.assert_close(points[b, n, d, i, j], expected, rtol=1e-12, atol=1e-12)


# -- splatting --------------------------------------------------------------------------------------------


def tiny_vt(**kw) -> LSSViewTransformer:
    args = dict(
        in_channels=8,
        context_channels=3,
        input_size=(32, 64),
        downsample=8,
        grid_lower=(-8.0, -8.0, -2.0),
        grid_interval=(1.0, 1.0, 2.0),
        grid_size=(16, 16, 2),
        depth_range=(2.0, 6.0, 1.0),
        crf_iters=3,
        mid_channels=8,
    )
    args.update(kw)
    return LSSViewTransformer(**args)


def test_one_hot_depth_splats_into_the_expected_cell():
    vt = tiny_vt()
    cams = rig([0.0], [(1.3, 0.5, 1.6)], 100.0, 50.0, 40.0, batch=2)
    cams[5][1] = yaw(90.0).float()  # sample 1: BEV rotated by 90 degrees
    depth = torch.zeros(2, 4, 4, 8)
    depth[:, 2, 3, 2] = 1.0  # d = 4 m at pixel (u, v) = (18, 31)
    context = torch.randn(2, 3, 4, 8)
    bev = vt.splat(depth, context, CameraGeometry(*cams))
    assert bev.shape == (2, 2 * 3, 16, 16)
    # Camera point ((18-50)*4/100, (31-40)*4/100, 4) = (-1.28, -0.36, 4) -> ego (4, 1.28, 0.36) + t = (5.3, 1.78, 1.96)
    # -> voxel x = floor(13.3) = 13, y = floor(9.78) = 9, z = floor(1.98) = 1 -> channels 3..5 (z-major folding).
    # Sample 1: rotated to (-1.78, 5.3, 1.96) -> x = 6, y = 13, z = 1.
    expected = torch.zeros_like(bev)
    expected[0, 3:6, 9, 13] = context[0, :, 3, 2]
    expected[1, 3:6, 13, 6] = context[1, :, 3, 2]
    torch.testing.assert_close(bev, expected)


def test_points_below_the_grid_follow_the_truncation_flag():
    cams = rig([0.0], [(1.3, 0.5, -2.5)], 100.0, 50.0, 40.0)  # z = 0.36 - 2.5 = -2.14: half a voxel below -2
    depth = torch.zeros(1, 4, 4, 8)
    depth[0, 2, 3, 2] = 1.0
    context = torch.ones(1, 3, 4, 8)
    truncated = tiny_vt().splat(depth, context, CameraGeometry(*cams))
    floored = tiny_vt(truncate_voxel_index=False).splat(depth, context, CameraGeometry(*cams))
    assert float(truncated[0, 0:3, 9, 13].sum()) == 3.0  # the reference quirk: lands in z = 0
    assert float(floored.abs().sum()) == 0.0


# -- depth loss -------------------------------------------------------------------------------------------


def test_depth_loss_by_hand():
    vt = tiny_vt(input_size=(4, 6), downsample=2, depth_range=(1.0, 3.0, 0.5))  # D = 4: [1, 1.5), ..., [2.5, 3)
    gt = torch.tensor(
        [
            [0.0, 2.2, 0.0, 0.0, 0.9, 0.0],
            [1.7, 0.0, 0.0, 0.0, 0.0, 0.0],
            [2.9, 5.0, 3.2, 0.0, 1.0, 1.2],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    ).view(1, 1, 4, 6)
    # Blocks (2x2) -> nearest non-zero depth -> bin: (0,0) 1.7 -> bin 1; (0,1) empty; (0,2) 0.9 -> below range;
    # (1,0) 2.9 -> bin 3; (1,1) 3.2 -> beyond range; (1,2) 1.0 -> bin 0.
    gen = torch.Generator().manual_seed(0)
    prob = (torch.rand(1, 4, 2, 3, generator=gen) * 0.9 + 0.05).requires_grad_(True)
    total = 0.0
    for (i, j), k in (((0, 0), 1), ((1, 0), 3), ((1, 2), 0)):
        for d in range(4):
            p = float(prob.detach()[0, d, i, j])
            total += -math.log(p) if d == k else -math.log(1.0 - p)
    loss = vt.depth_loss(gt, prob)
    assert float(loss.detach()) == pytest.approx(3.0 * total / 3, rel=1e-6)
    loss.backward()
    assert float(prob.grad[0, :, 0, 1].abs().sum()) == 0.0  # excluded pixels get no gradient
    assert float(prob.grad[0, :, 1, 2].abs().sum()) > 0.0
    # No LiDAR point at all: zero loss, still differentiable.
    empty = vt.depth_loss(torch.zeros(1, 1, 4, 6), prob)
    assert float(empty.detach()) == 0.0 and empty.requires_grad
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert vt.depth_loss(gt, prob.bfloat16()).dtype == torch.float32


# -- the whole module -------------------------------------------------------------------------------------


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    vt = tiny_vt(grid_lower=(-10.0, -10.0, -3.0), grid_interval=(1.0, 1.0, 6.0), grid_size=(20, 20, 1))
    vt.train()
    B, N = 2, 2
    cams = rig([0.0, 180.0], [(1.0, 0.0, 1.6), (-1.0, 0.0, 1.6)], 40.0, 32.0, 16.0, batch=B)
    feat = torch.randn(B * N, 8, 4, 8)
    canvas = torch.randint(0, 256, (B, N, 32, 64, 3), dtype=torch.uint8)
    bev, depth_prob, context = vt(feat, CameraGeometry(*cams), canvas)
    assert bev.shape == (B, 3, 20, 20) and depth_prob.shape == (B * N, 4, 4, 8) and context.shape == (B * N, 3, 4, 8)
    torch.testing.assert_close(depth_prob.sum(dim=1), torch.ones(B * N, 4, 8))
    gt = torch.where(torch.rand(B, N, 32, 64) < 0.2, torch.rand(B, N, 32, 64) * 4 + 2, torch.zeros(B, N, 32, 64))
    loss = (bev * torch.randn_like(bev)).sum() + vt.depth_loss(gt, depth_prob)
    loss.backward()
    for name, p in vt.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_mlp_extrinsics_override_feeds_only_the_depth_net():
    torch.manual_seed(1)
    vt = tiny_vt().eval()
    cams = rig([0.0, 90.0], [(1.0, 0.0, 1.6), (0.0, 1.0, 1.6)], 100.0, 32.0, 16.0)
    key_rot = torch.stack([yaw(5.0).float() @ r for r in cams[0][0]]).unsqueeze(0)
    key_trans = cams[1] + 0.7
    feat = torch.randn(2, 8, 4, 8)
    canvas = torch.randint(0, 256, (1, 2, 32, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        bev, prob, ctx = vt(feat, CameraGeometry(*cams), canvas, mlp_cams=CameraGeometry(key_rot, key_trans, *cams[2:]))
        mlp = camera_aware_input(CameraGeometry(key_rot, key_trans, *cams[2:])).view(2, 27)
        logits, exp_ctx = vt.depth_net(feat, mlp)
        exp_prob = vt.crf(logits, canvas.view(2, 32, 64, 3))
        exp_bev = vt.splat(exp_prob, exp_ctx, CameraGeometry(*cams))
        own_prob = vt(feat, CameraGeometry(*cams), canvas)[1]
    torch.testing.assert_close(prob, exp_prob, rtol=0, atol=0)
    torch.testing.assert_close(ctx, exp_ctx, rtol=0, atol=0)
    torch.testing.assert_close(bev, exp_bev, rtol=0, atol=0)
    assert not torch.allclose(prob, own_prob)  # the override is actually used


@pytest.mark.parametrize("stage, context, params", [(1, 80, 7_603_215), (2, 160, 7_623_775)])
def test_matches_reference_state_dict(stage, context, params):
    vt = LSSViewTransformer(in_channels=512, context_channels=context)
    assert state_rows(vt) == reference_rows(stage, "img_view_transformer.")
    assert sum(p.numel() for p in vt.parameters()) == params


def test_full_size_forward():
    vt = LSSViewTransformer(in_channels=512, context_channels=80).eval()
    B, N = 1, 2
    cams = rig([0.0, 55.0], [(1.5, 0.0, 1.6), (1.3, 0.5, 1.6)], 1266.0, 800.0, 450.0)
    cams[3][..., 0, 0] = cams[3][..., 1, 1] = 0.44  # resize 0.44, crop 140 rows at the top
    cams[4][..., 1] = -140.0
    with torch.no_grad():
        canvas = torch.randint(0, 256, (B, N, 256, 704, 3))
        bev, prob, ctx = vt(torch.randn(B * N, 512, 32, 88), CameraGeometry(*cams), canvas)
    assert bev.shape == (1, 80, 128, 128) and prob.shape == (2, 118, 32, 88) and ctx.shape == (2, 80, 32, 88)
    torch.testing.assert_close(prob.sum(dim=1), torch.ones(2, 32, 88))
    assert float(bev.abs().sum()) > 0


# -- configuration ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"grid_interval": (1.0, 0.0, 2.0)}, "grid_interval"),
        ({"grid_size": (16, 16.5, 2)}, "grid_size"),
        ({"grid_size": (16, 0, 2)}, "grid_size"),
        ({"depth_range": (6.0, 6.0, 1.0)}, "depth_range"),
        ({"depth_range": (1.0, 6.0, 0.0)}, "depth_range"),
        ({"input_size": (30, 64)}, "input_size"),
        ({"downsample": 0}, "downsample"),
        ({"context_channels": 0}, "context_channels"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny_vt(**kwargs)


def test_no_state_for_frustum():
    vt = tiny_vt()
    assert not any("frustum" in k for k in vt.state_dict())
    assert isinstance(vt.frustum, torch.Tensor) and vt.frustum.shape == (4, 4, 8, 3)
    assert isinstance(vt.depth_net, nn.Module)


def test_lift_ignores_autocast():
    # Under bf16 autocast the combined camera matrix would be rounded: decimetres at 50 m.
    frustum = make_frustum((64, 176), 8, (1.0, 60.0, 5.0))
    cams = CameraGeometry(*rig([0.0, 120.0], [(1.5, 0.0, 1.6), (0.0, 1.0, 1.6)], 300.0, 88.0, 32.0))
    points = lift_frustum(frustum, cams)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        points_bf16 = lift_frustum(frustum, cams)
    assert points_bf16.dtype == torch.float32 and torch.equal(points, points_bf16)
