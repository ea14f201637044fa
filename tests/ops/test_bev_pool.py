"""bev_pool / voxelize_points: reference vs slow loop oracles, gradients, edge cases, dispatch."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from mx_driving_standin import route_cpu_tensors_to_mx_driving

from bevnext.ops import _dispatch
from bevnext.ops.bev_pool import bev_pool, bev_pool_v3_unsupported_reason, voxelize_points

# -- slow oracles (python loops over points) ---------------------------------------------------------------


def voxelize_oracle(points, lower, interval, size, truncate):
    """Per-point python loop: the voxel of each point, or skip it."""
    B, N, D, H, W, _ = points.shape
    ranks_bev, ranks_depth, ranks_feat = [], [], []
    flat = points.reshape(-1, 3).tolist()
    for i, p in enumerate(flat):
        coords = []
        for axis in range(3):
            c = (p[axis] - lower[axis]) / interval[axis]
            coords.append(int(c) if truncate else math.floor(c))  # int() truncates toward zero
        if not all(0 <= coords[a] < size[a] for a in range(3)):
            continue
        b = i // (N * D * H * W)
        n = (i // (D * H * W)) % N
        h, w = (i // W) % H, i % W
        x, y, z = coords
        ranks_bev.append(((b * size[2] + z) * size[1] + y) * size[0] + x)
        ranks_depth.append(i)
        ranks_feat.append(((b * N + n) * H + h) * W + w)
    return ranks_bev, ranks_depth, ranks_feat


def bev_pool_oracle(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_shape):
    """Per-point python loop in float64: out[bev] += depth[point] * feat[pixel]."""
    B, Z, Y, X = bev_shape
    C = feat.shape[-1]
    out = torch.zeros(B * Z * Y * X, C, dtype=torch.float64)
    depth_flat = depth.detach().reshape(-1).double().cpu()
    feat_flat = feat.detach().reshape(-1, C).double().cpu()
    for j in range(ranks_bev.numel()):
        out[int(ranks_bev[j])] += depth_flat[int(ranks_depth[j])] * feat_flat[int(ranks_feat[j])]
    return out.view(B, Z, Y, X, C).permute(0, 4, 1, 2, 3)


# -- helpers -------------------------------------------------------------------------------------------------


def random_problem(B=2, N=2, D=3, H=2, W=3, C=5, Z=2, Y=3, X=4, keep=0.7, seed=0, dtype=torch.float32, device="cpu"):
    """Random inputs and rank tables; several points share voxels and every pixel has D points."""
    g = torch.Generator().manual_seed(seed)
    depth = torch.rand(B, N, D, H, W, generator=g, dtype=torch.float64)
    feat = torch.randn(B, N, H, W, C, generator=g, dtype=torch.float64)
    idx = torch.arange(B * N * D * H * W)
    idx = idx[torch.rand(idx.numel(), generator=g) < keep]
    idx = idx[torch.randperm(idx.numel(), generator=g)]  # any order is allowed
    b = idx // (N * D * H * W)
    n = (idx // (D * H * W)) % N
    pix = (idx // W) % H * W + idx % W
    ranks_feat = (b * N + n) * H * W + pix
    ranks_bev = b * Z * Y * X + torch.randint(0, Z * Y * X, (idx.numel(),), generator=g)
    ranks = [r.to(torch.int32).to(device) for r in (idx, ranks_feat, ranks_bev)]
    return depth.to(device, dtype), feat.to(device, dtype), *ranks, (B, Z, Y, X)


def tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]


# -- voxelize_points -----------------------------------------------------------------------------------------

LOWER, INTERVAL, SIZE = (-2.0, -1.5, -1.0), (0.5, 0.5, 1.0), (8, 6, 2)


def test_voxelize_matches_oracle_and_drops_out_of_range():
    g = torch.Generator().manual_seed(1)
    # Spread well beyond the grid (x in [-2, 2), y in [-1.5, 1.5), z in [-1, 1)) on every side.
    points = (torch.rand(2, 2, 3, 2, 3, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([8.0, 6.0, 4.0])
    for truncate in (True, False):
        got = voxelize_points(points, LOWER, INTERVAL, SIZE, truncate=truncate)
        want = voxelize_oracle(points, LOWER, INTERVAL, SIZE, truncate)
        for g_r, w_r in zip(got, want):
            assert g_r.dtype == torch.int32
            assert g_r.tolist() == w_r
        assert 0 < got[0].numel() < points[..., 0].numel()  # some kept, some dropped


def test_voxelize_truncation_quirk():
    # Point 0: half a cell below the lower x bound; point 1: 1.5 cells below; point 2: last cell; point 3: just
    # past the upper bound; point 4: NaN.
    xs = [LOWER[0] - 0.5 * INTERVAL[0], LOWER[0] - 1.5 * INTERVAL[0], LOWER[0] + (SIZE[0] - 0.5) * INTERVAL[0],
          LOWER[0] + SIZE[0] * INTERVAL[0], float("nan")]
    points = torch.zeros(1, 1, len(xs), 1, 1, 3, dtype=torch.float64)
    points[..., 0] = torch.tensor(xs).view(1, 1, -1, 1, 1)
    points[..., 1] = 0.1
    points[..., 2] = 0.1
    rb, rd, rf = voxelize_points(points, LOWER, INTERVAL, SIZE, truncate=True)
    y, z = int((0.1 - LOWER[1]) / INTERVAL[1]), int((0.1 - LOWER[2]) / INTERVAL[2])
    base = (z * SIZE[1] + y) * SIZE[0]
    assert rd.tolist() == [0, 2]
    assert rb.tolist() == [base + 0, base + SIZE[0] - 1]  # the -0.5-cell point goes to cell 0
    assert rf.tolist() == [0, 0]
    rb, rd, _ = voxelize_points(points, LOWER, INTERVAL, SIZE, truncate=False)
    assert rd.tolist() == [2]  # floor drops it
    assert rb.tolist() == [base + SIZE[0] - 1]


def test_voxelize_empty_and_shape_errors():
    points = torch.full((1, 2, 3, 2, 2, 3), 100.0)
    rb, rd, rf = voxelize_points(points, LOWER, INTERVAL, SIZE)
    assert rb.numel() == rd.numel() == rf.numel() == 0
    with pytest.raises(ValueError):
        voxelize_points(points[..., :2], LOWER, INTERVAL, SIZE)


# -- bev_pool reference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_reference_matches_oracle(device, dtype):
    depth, feat, rd, rf, rb, shape = random_problem(dtype=dtype, device=device)
    out = bev_pool(depth, feat, rd, rf, rb, shape, chunk_size=7)
    assert out.shape == (2, 5, 2, 3, 4) and out.dtype == dtype and out.is_contiguous()
    want = bev_pool_oracle(depth, feat, rd.cpu(), rf.cpu(), rb.cpu(), shape)
    torch.testing.assert_close(out.cpu().double(), want, atol=tol(dtype), rtol=tol(dtype))


def test_reference_with_voxelized_points_and_int64_ranks(device):
    g = torch.Generator().manual_seed(3)
    points = (torch.rand(1, 2, 4, 2, 3, 3, generator=g) - 0.5) * torch.tensor([6.0, 5.0, 3.0])
    rb, rd, rf = (r.long().to(device) for r in voxelize_points(points, LOWER, INTERVAL, SIZE))
    depth = torch.rand(1, 2, 4, 2, 3, generator=g).to(device)
    feat = torch.randn(1, 2, 2, 3, 8, generator=g).to(device)
    shape = (1, SIZE[2], SIZE[1], SIZE[0])
    out = bev_pool(depth, feat, rd, rf, rb, shape)
    want = bev_pool_oracle(depth, feat, rd.cpu(), rf.cpu(), rb.cpu(), shape)
    torch.testing.assert_close(out.cpu().double(), want, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64_several_chunks():
    depth, feat, rd, rf, rb, shape = random_problem(B=1, N=2, D=3, H=2, W=2, C=3, Z=1, Y=2, X=3, dtype=torch.float64)
    assert rd.numel() > 3 * 3  # chunk_size=3 below -> several chunks (and a partial last one)
    depth.requires_grad_()
    feat.requires_grad_()
    assert torch.autograd.gradcheck(lambda d, f: bev_pool(d, f, rd, rf, rb, shape, chunk_size=3), (depth, feat))


def test_gradients_match_autograd_of_naive_splat(device):
    depth, feat, rd, rf, rb, shape = random_problem(device=device, dtype=torch.float64)
    grad = torch.randn(2, 5, 2, 3, 4, dtype=torch.float64, device=device)

    def naive(d, f):
        rows = f.reshape(-1, 5)[rf.long()] * d.reshape(-1)[rd.long()].unsqueeze(1)
        out = torch.zeros(2 * 2 * 3 * 4, 5, dtype=d.dtype, device=d.device).index_add(0, rb.long(), rows)
        return out.view(2, 2, 3, 4, 5).permute(0, 4, 1, 2, 3)

    for need in ((True, True), (True, False), (False, True)):
        results = []
        for fn in (naive, lambda d, f: bev_pool(d, f, rd, rf, rb, shape, chunk_size=5)):
            d = depth.clone().requires_grad_(need[0])
            f = feat.clone().requires_grad_(need[1])
            fn(d, f).backward(grad)
            results.append((d.grad, f.grad))
        for want, got in zip(*results):
            if want is None:
                assert got is None
            else:
                torch.testing.assert_close(got, want)


def test_empty_ranks_give_zeros_and_zero_grads(device):
    depth = torch.rand(1, 2, 3, 2, 2, device=device, requires_grad=True)
    feat = torch.randn(1, 2, 2, 2, 8, device=device, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    out = bev_pool(depth, feat, empty, empty, empty, (1, 1, 3, 3))
    assert out.shape == (1, 8, 1, 3, 3)
    assert not out.any()
    out.sum().backward()
    assert not depth.grad.any() and not feat.grad.any()


def test_non_contiguous_inputs(device):
    depth, feat, rd, rf, rb, shape = random_problem(device=device)
    want = bev_pool(depth, feat, rd, rf, rb, shape)
    # feat as the depth net produces it: (B, N, C, H, W) permuted to channels-last; depth transposed twice;
    # rank vectors as strided views.
    feat_nc = feat.permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2)
    depth_nc = depth.transpose(2, 4).contiguous().transpose(2, 4)
    ranks = [torch.stack([r, r], dim=1)[:, 0] for r in (rd, rf, rb)]
    assert not feat_nc.is_contiguous() and not depth_nc.is_contiguous() and not ranks[0].is_contiguous()
    got = bev_pool(depth_nc, feat_nc, *ranks, shape)
    torch.testing.assert_close(got, want)


def test_chunk_size_invariance():
    depth, feat, rd, rf, rb, shape = random_problem(B=2, N=3, D=8, H=4, W=5, C=16)
    one = bev_pool(depth, feat, rd, rf, rb, shape, chunk_size=10**9)
    for chunk in (1, 13, 100):
        torch.testing.assert_close(bev_pool(depth, feat, rd, rf, rb, shape, chunk_size=chunk), one, atol=1e-6, rtol=0)


def test_forced_reference_skips_an_available_fast_path(monkeypatch):
    # An importable, applicable fast path: a module registered as ``mx_driving`` and the dispatch routing CPU
    # tensors to it as it routes NPU tensors. It runs by default and never with BEVNEXT_OPS=reference.
    calls = []

    def bev_pool_v3(depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_feat_shape):
        calls.append(bev_feat_shape)
        B, Z, Y, X, _ = bev_feat_shape
        return bev_pool_oracle(depth, feat, ranks_depth, ranks_feat, ranks_bev, (B, Z, Y, X)).float()

    fast = types.ModuleType("mx_driving")
    fast.bev_pool_v3 = bev_pool_v3
    monkeypatch.setitem(sys.modules, "mx_driving", fast)
    route_cpu_tensors_to_mx_driving(monkeypatch)
    depth, feat, rd, rf, rb, shape = random_problem(C=16)
    want = bev_pool_oracle(depth, feat, rd, rf, rb, shape)
    torch.testing.assert_close(bev_pool(depth, feat, rd, rf, rb, shape).double(), want, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1
    monkeypatch.setenv("BEVNEXT_OPS", "reference")
    torch.testing.assert_close(bev_pool(depth, feat, rd, rf, rb, shape).double(), want, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1


def test_fast_path_shape_matches_oracle_and_float64_gradients(device):
    # C a multiple of 8 in fp32: with TORCH_DEVICE=npu and mx_driving installed, bev_pool_v3's forward and
    # backward against the float64 reference on the CPU.
    depth, feat, rd, rf, rb, shape = random_problem(C=16, D=5, H=3, W=4, device=device)
    d, f = depth.clone().requires_grad_(), feat.clone().requires_grad_()
    out = bev_pool(d, f, rd, rf, rb, shape)
    torch.testing.assert_close(out.cpu().double(), bev_pool_oracle(depth, feat, rd.cpu(), rf.cpu(), rb.cpu(), shape),
                               atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out.backward(grad.to(device, out.dtype))
    d64, f64 = (t.detach().cpu().double().requires_grad_() for t in (depth, feat))
    bev_pool(d64, f64, rd.cpu(), rf.cpu(), rb.cpu(), shape).backward(grad)
    torch.testing.assert_close(d.grad.cpu().double(), d64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f.grad.cpu().double(), f64.grad, atol=1e-5, rtol=1e-5)


def test_input_validation():
    depth, feat, rd, rf, rb, shape = random_problem()
    with pytest.raises(ValueError):
        bev_pool(depth, feat, rd, rf[:-1], rb, shape)
    with pytest.raises(ValueError):
        bev_pool(depth[:, :1], feat, rd, rf, rb, shape)
    with pytest.raises(ValueError):
        bev_pool(depth, feat, rd.float(), rf, rb, shape)
    with pytest.raises(ValueError):
        bev_pool(depth, feat, rd, rf, rb, shape, chunk_size=0)


# -- NPU fast-path constraints (no NPU here: the checker is tested directly) ---------------------------------


def test_bev_pool_v3_constraint_checker():
    bev = (1, 1, 128, 128)
    assert bev_pool_v3_unsupported_reason(80, bev, torch.float32) is None
    assert bev_pool_v3_unsupported_reason(160, bev, torch.float32, num_points=1_500_000) is None
    assert bev_pool_v3_unsupported_reason(160, bev, torch.float16) is None  # upcast to the fp32 kernel
    assert "multiple of 8" in bev_pool_v3_unsupported_reason(12, bev, torch.float32)
    assert "360" in bev_pool_v3_unsupported_reason(368, bev, torch.float32)
    assert "2**31" in bev_pool_v3_unsupported_reason(256, (64, 1, 512, 512), torch.float32)
    assert bev_pool_v3_unsupported_reason(80, bev, torch.float64) is not None
    # The kernel's int32 indices: depth elements (ranks_depth) and feat elements (ranks_feat * C).
    assert bev_pool_v3_unsupported_reason(80, bev, torch.float32, depth_numel=2**31, feat_numel=2**31) is None
    assert "ranks_depth" in bev_pool_v3_unsupported_reason(80, bev, torch.float32, depth_numel=2**31 + 1)
    assert "ranks_feat" in bev_pool_v3_unsupported_reason(80, bev, torch.float32, feat_numel=2**31 + 80)


class _FakeMx:
    """Stands in for mx_driving: records the bev_pool_v3 call and answers with the reference result."""

    def __init__(self):
        self.calls = []

    def bev_pool_v3(self, depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_feat_shape):
        self.calls.append((depth, feat, ranks_depth, ranks_feat, ranks_bev, bev_feat_shape))
        B, Z, Y, X, _ = bev_feat_shape
        out = bev_pool_oracle(depth, feat, ranks_depth, ranks_feat, ranks_bev, (B, Z, Y, X))
        return out.to(depth.dtype).contiguous()


def test_npu_dispatch_calls_bev_pool_v3_or_falls_back(monkeypatch, caplog):
    import bevnext.ops.bev_pool as bev_pool_module

    fake = _FakeMx()
    monkeypatch.setattr(bev_pool_module, "fast_module", lambda op, device_type: fake)
    monkeypatch.setattr(_dispatch, "_warned", set())

    depth, feat, rd, rf, rb, shape = random_problem(C=16)
    out = bev_pool(depth, feat, rd.long(), rf, rb, shape)
    assert len(fake.calls) == 1
    d, f, r_d, r_f, r_b, bev_feat_shape = fake.calls[0]
    assert bev_feat_shape == [2, 2, 3, 4, 16]
    assert all(r.dtype == torch.int32 and r.is_contiguous() for r in (r_d, r_f, r_b))
    assert d.dtype == f.dtype == torch.float32 and f.shape == (2, 2, 2, 3, 16)
    torch.testing.assert_close(out, bev_pool_oracle(depth, feat, rd, rf, rb, shape).float())

    depth, feat, rd, rf, rb, shape = random_problem(C=12)  # not a multiple of 8: the reference runs
    with caplog.at_level("WARNING", logger="bevnext.ops._dispatch"):
        out = bev_pool(depth, feat, rd, rf, rb, shape)
    assert len(fake.calls) == 1
    assert "multiple of 8" in caplog.text
    torch.testing.assert_close(out.double(), bev_pool_oracle(depth, feat, rd, rf, rb, shape), atol=1e-5, rtol=1e-5)
