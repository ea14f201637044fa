"""multi_scale_deformable_attn: reference vs a loop oracle, gradients, edge cases, fast-path dispatch."""

from __future__ import annotations

import pytest
import torch
from oracles import bilinear_zero_padded

from bevnext.ops import deform_attn
from bevnext.ops.deform_attn import msda_fast_path_unsupported, multi_scale_deformable_attn


def msda_oracle(value, spatial_shapes, level_start_index, locations, weights, pairs=None):
    """Oracle: explicit loops over (batch, query) pairs, heads, levels and points.

    Locations are normalised (x, y) in [0, 1]; pixel coordinates are loc * (W, H) - 0.5.
    Returns {(b, q): (heads * d,) float64}.
    """
    bs, _, heads, dim = value.shape
    num_queries = locations.shape[1]
    value, locations, weights = value.cpu().double(), locations.cpu().double(), weights.cpu().double()
    if pairs is None:
        pairs = [(b, q) for b in range(bs) for q in range(num_queries)]
    result = {}
    for b, q in pairs:
        out = torch.zeros(heads, dim, dtype=torch.float64)
        for h in range(heads):
            for level, ((height, width), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
                image = value[b, start : start + height * width, h].T.reshape(dim, height, width)
                for p in range(locations.shape[4]):
                    x, y = locations[b, q, h, level, p].tolist()
                    sample = bilinear_zero_padded(image, x * width - 0.5, y * height - 0.5)
                    out[h] += weights[b, q, h, level, p].item() * sample
        result[(b, q)] = out.flatten()
    return result


def make_inputs(bs, heads, dim, shapes, points, queries, dtype=torch.float64, device="cpu", spread=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    total = int(sizes.sum())
    value = torch.randn(bs, total, heads, dim, generator=gen, dtype=dtype)
    # Slightly outside [0, 1] too, so that zero padding is exercised.
    locations = torch.rand(bs, queries, heads, len(shapes), points, 2, generator=gen, dtype=dtype)
    locations = locations * (1 + 2 * spread) - spread
    weights = torch.rand(bs, queries, heads, len(shapes), points, generator=gen, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    to = dict(device=device)
    return (
        value.to(**to),
        spatial_shapes.to(**to),
        level_start_index.to(**to),
        locations.to(**to),
        weights.to(**to),
    )


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, strided (every other element of a wider buffer)."""
    return torch.stack((t, torch.zeros_like(t)), dim=-1)[..., 0]


def assert_matches_oracle(out, inputs, pairs=None, atol=1e-10):
    expected = msda_oracle(*inputs, pairs=pairs)
    for (b, q), vec in expected.items():
        torch.testing.assert_close(out[b, q].cpu().double(), vec, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_reference_matches_oracle(device, dtype, atol):
    inputs = make_inputs(2, 3, 4, [(3, 5), (2, 2), (1, 3)], 3, 4, dtype=dtype, device=device)
    out = multi_scale_deformable_attn(*inputs)
    assert out.shape == (2, 4, 12) and out.dtype == dtype and out.device == inputs[0].device
    assert_matches_oracle(out, inputs, atol=atol)


@pytest.mark.parametrize("dim", [8, 3])
def test_fast_path_shapes_match_oracle(device, dim):
    # Shapes the mx_driving kernel accepts (heads <= 8, any head dim up to 256): with TORCH_DEVICE=npu and
    # mx_driving installed this checks the kernel, its aligned and its unaligned (dim % 8 != 0) variant.
    inputs = make_inputs(2, 2, dim, [(4, 6), (2, 3)], 4, 5, dtype=torch.float32, device=device)
    assert msda_fast_path_unsupported(2, dim, 2, 4, torch.float32) is None
    assert_matches_oracle(multi_scale_deformable_attn(*inputs), inputs, atol=1e-5)


def test_locations_on_the_edges_and_pixel_centres():
    # One 2x3 map, one head, one channel with known values; sample exactly at pixel centres and edges.
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)  # row-major [[0, 1, 2], [3, 4, 5]]
    shapes, starts = torch.tensor([[2, 3]]), torch.tensor([0])
    locs = torch.tensor([[0.5 / 3, 0.5 / 2], [2.5 / 3, 1.5 / 2], [0.0, 0.25], [1.5 / 3, 0.5]], dtype=torch.float64)
    locations = locs.view(1, 4, 1, 1, 1, 2)
    weights = torch.ones(1, 4, 1, 1, 1, dtype=torch.float64)
    out = multi_scale_deformable_attn(value, shapes, starts, locations, weights).flatten()
    # centre of (0,0) -> 0; centre of (1,2) -> 5; left edge of row 0 -> half of pixel 0 -> 0;
    # between rows at the centre column -> mean of 1 and 4.
    torch.testing.assert_close(out, torch.tensor([0.0, 5.0, 0.0, 2.5], dtype=torch.float64))


@pytest.mark.parametrize("dim", [10, 20])
def test_bevnext_shapes_subset_against_oracle(device, dim):
    # PerspectiveRefinement: 6 cameras, one 32x88 level, 8 heads, 8 points, head dim 10 (stage 1) / 20
    # (stage 2). With TORCH_DEVICE=npu this is mx_driving's kernel at the model's shapes, forward and backward.
    inputs = make_inputs(6, 8, dim, [(32, 88)], 8, 300, dtype=torch.float32, device=device, spread=0.02, seed=dim)
    value, shapes, starts, locations, weights = (t.clone().requires_grad_(t.is_floating_point()) for t in inputs)
    out = multi_scale_deformable_attn(value, shapes, starts, locations, weights)
    assert out.shape == (6, 300, 8 * dim)
    gen = torch.Generator().manual_seed(1)
    pairs = [
        (int(b), int(q)) for b, q in zip(torch.randint(6, (8,), generator=gen), torch.randint(300, (8,), generator=gen))
    ]
    assert_matches_oracle(out.detach(), inputs, pairs=pairs, atol=1e-4)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad.to(device))
    cpu64 = [t.detach().cpu().double().requires_grad_() if t.is_floating_point() else t.cpu() for t in inputs]
    deform_attn._msda_reference(*cpu64).backward(grad.double())
    for got, want in zip((value.grad, locations.grad, weights.grad), (cpu64[0].grad, cpu64[3].grad, cpu64[4].grad)):
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-4 * max(1.0, float(want.abs().max())), rtol=1e-4)


def test_gradcheck(device):
    value, shapes, starts, locations, weights = make_inputs(1, 2, 2, [(2, 3), (2, 2)], 2, 2, device=device, seed=3)
    value.requires_grad_()
    locations.requires_grad_()
    weights.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, loc, w: multi_scale_deformable_attn(v, shapes, starts, loc, w), (value, locations, weights)
    )


def test_non_contiguous_inputs(device):
    value, shapes, starts, locations, weights = make_inputs(2, 2, 3, [(3, 4)], 2, 3, device=device)
    value_nc = value.transpose(1, 3).contiguous().transpose(1, 3)
    locations_nc = non_contiguous(locations)
    weights_nc = weights.permute(4, 0, 1, 2, 3).contiguous().permute(1, 2, 3, 4, 0)
    assert not (value_nc.is_contiguous() or locations_nc.is_contiguous() or weights_nc.is_contiguous())
    expected = multi_scale_deformable_attn(value, shapes, starts, locations, weights)
    out = multi_scale_deformable_attn(value_nc, shapes, starts, locations_nc, weights_nc)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("bs, queries", [(2, 0), (0, 3)])
def test_empty_inputs(device, bs, queries):
    value, shapes, starts, locations, weights = make_inputs(bs, 2, 4, [(3, 4)], 2, queries, device=device)
    value.requires_grad_()
    locations.requires_grad_()
    out = multi_scale_deformable_attn(value, shapes, starts, locations, weights)
    assert out.shape == (bs, queries, 8)
    out.sum().backward()
    assert value.grad is not None and torch.all(value.grad == 0)


def test_half_inputs_run_in_fp32_and_return_half(device):
    inputs = make_inputs(1, 2, 8, [(4, 5)], 4, 6, dtype=torch.float32, device=device)
    half = [t.half() if t.is_floating_point() else t for t in inputs]
    out = multi_scale_deformable_attn(*half)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), multi_scale_deformable_attn(*inputs), atol=2e-2, rtol=2e-2)


def test_constraint_checker():
    assert msda_fast_path_unsupported(8, 16, 1, 8, torch.float32) is None
    assert msda_fast_path_unsupported(8, 256, 4, 16, torch.float16) is None  # cast to the fp32 kernel
    assert msda_fast_path_unsupported(8, 16, 1, 8, torch.bfloat16) is None
    assert "levels*points" in msda_fast_path_unsupported(8, 16, 5, 13, torch.float32)
    assert "heads" in msda_fast_path_unsupported(9, 16, 1, 8, torch.float32)
    assert "head dim" in msda_fast_path_unsupported(8, 257, 1, 8, torch.float32)
    # BEVNeXt's head dims 10 (stage 1) and 20 (stage 2) take the kernel's unaligned variant.
    assert msda_fast_path_unsupported(8, 10, 1, 8, torch.float32) is None
    assert msda_fast_path_unsupported(8, 20, 1, 8, torch.float32) is None
    assert "dtype" in msda_fast_path_unsupported(8, 16, 1, 8, torch.float64)


class _FakeMx:
    """Stands in for mx_driving: records calls, accepts only fp32 contiguous tensors, answers with the reference."""

    def __init__(self):
        self.calls = 0

    def multi_scale_deformable_attn(self, value, shapes, starts, locations, weights):
        assert all(t.dtype == torch.float32 and t.is_contiguous() for t in (value, locations, weights))
        self.calls += 1
        return deform_attn._msda_reference(value, shapes, starts, locations, weights)


def test_dispatch_uses_fast_path_only_within_constraints(monkeypatch):
    fake = _FakeMx()
    monkeypatch.setattr(deform_attn, "fast_module", lambda op, device_type: fake)
    ok = make_inputs(1, 2, 10, [(3, 4)], 2, 3, dtype=torch.float32)
    multi_scale_deformable_attn(*ok)
    assert fake.calls == 1
    half = [t.half() if t.is_floating_point() else t for t in ok]
    assert multi_scale_deformable_attn(*half).dtype == torch.float16
    assert fake.calls == 2
    not_ok = make_inputs(1, 9, 2, [(3, 4)], 2, 3, dtype=torch.float32)  # 9 heads
    out = multi_scale_deformable_attn(*not_ok)
    assert fake.calls == 2 and out.shape == (1, 3, 18)
