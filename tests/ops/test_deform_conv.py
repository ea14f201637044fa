"""deform_conv2d / DeformConv2dPack: loop oracle (mmcv offset layout), conv2d equivalence, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from oracles import bilinear_zero_padded

from bevnext.ops import deform_conv
from bevnext.ops.deform_conv import DeformConv2dPack, deform_conv2d, deform_conv2d_fast_path_unsupported


def deform_conv_oracle(x, offset, weight, bias, stride, padding, dilation, groups, deform_groups):
    """Oracle with mmcv's DCN v1 layout: channel 2*(g*kh*kw + i*kw + j) is Δy, the next one Δx."""
    x, offset, weight = x.cpu().double(), offset.cpu().double(), weight.cpu().double()
    batch, in_ch, _, _ = x.shape
    out_ch, in_per_group, kh, kw = weight.shape
    out_h, out_w = offset.shape[2:]
    per_dg = in_ch // deform_groups
    out_per_group = out_ch // groups
    out = torch.zeros(batch, out_ch, out_h, out_w, dtype=torch.float64)
    for b in range(batch):
        for ho in range(out_h):
            for wo in range(out_w):
                columns = torch.zeros(in_ch, kh, kw, dtype=torch.float64)
                for g in range(deform_groups):
                    for i in range(kh):
                        for j in range(kw):
                            channel = 2 * (g * kh * kw + i * kw + j)
                            dy, dx = offset[b, channel, ho, wo].item(), offset[b, channel + 1, ho, wo].item()
                            py = ho * stride[0] - padding[0] + i * dilation[0] + dy
                            px = wo * stride[1] - padding[1] + j * dilation[1] + dx
                            image = x[b, g * per_dg : (g + 1) * per_dg]
                            columns[g * per_dg : (g + 1) * per_dg, i, j] = bilinear_zero_padded(image, px, py)
                for o in range(out_ch):
                    grp = o // out_per_group
                    out[b, o, ho, wo] = (weight[o] * columns[grp * in_per_group : (grp + 1) * in_per_group]).sum()
                    if bias is not None:
                        out[b, o, ho, wo] += bias[o].item()
    return out


# (B, Cin, H, W, Cout, (kh, kw), stride, padding, dilation, groups, deform_groups, bias)
CASES = [
    (2, 4, 5, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, 2, True),
    (1, 3, 7, 6, 2, (2, 3), (2, 1), (1, 2), (2, 1), 1, 1, False),
    (1, 2, 4, 4, 4, (3, 3), (1, 1), (0, 0), (1, 1), 2, 1, False),
]


def make_case(case, dtype=torch.float64, device="cpu", offset_scale=2.0, seed=0):
    batch, in_ch, height, width, out_ch, (kh, kw), stride, padding, dilation, groups, dgroups, with_bias = case
    gen = torch.Generator().manual_seed(seed)
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = torch.randn(batch, in_ch, height, width, generator=gen, dtype=dtype)
    # Offsets of up to ±2 pixels: many taps land between pixels, some outside the image.
    offset = (torch.rand(batch, 2 * dgroups * kh * kw, out_h, out_w, generator=gen, dtype=dtype) * 2 - 1) * offset_scale
    weight = torch.randn(out_ch, in_ch // groups, kh, kw, generator=gen, dtype=dtype)
    bias = torch.randn(out_ch, generator=gen, dtype=dtype) if with_bias else None
    tensors = [t.to(device) if t is not None else None for t in (x, offset, weight, bias)]
    return tensors, dict(stride=stride, padding=padding, dilation=dilation, groups=groups, deform_groups=dgroups)


def run_oracle(tensors, kwargs):
    return deform_conv_oracle(*tensors, **kwargs)


@pytest.mark.parametrize("case", CASES)
def test_public_op_matches_oracle(device, case):
    # torchvision's kernel on CUDA, the grid_sample version on CPU.
    tensors, kwargs = make_case(case, device=device)
    out = deform_conv2d(*tensors, **kwargs)
    torch.testing.assert_close(out.cpu(), run_oracle(tensors, kwargs), atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_torchvision_kernel_matches_oracle(device, case):
    # Agreement with the mmcv-layout oracle proves that torchvision's offset layout is mmcv's interleaved
    # (Δy, Δx) per tap, which the CUDA path relies on; its CPU kernel computes the same.
    from torchvision.ops import deform_conv2d as tv_deform_conv2d

    tensors, kwargs = make_case(case, device=device)
    x, offset, weight, bias = tensors
    out = tv_deform_conv2d(x, offset, weight, bias, stride=kwargs["stride"], padding=kwargs["padding"],
                           dilation=kwargs["dilation"])
    torch.testing.assert_close(out.cpu(), run_oracle(tensors, kwargs), atol=1e-10, rtol=0)


def test_cpu_runs_the_grid_sample_version_quietly(monkeypatch, caplog):
    calls = []
    real = deform_conv._deform_conv2d_grid_sample
    monkeypatch.setattr(deform_conv, "_deform_conv2d_grid_sample", lambda *a: calls.append(1) or real(*a))
    tensors, kwargs = make_case(CASES[0])
    with caplog.at_level("WARNING"):
        out = deform_conv2d(*tensors, **kwargs)
    assert calls == [1]
    assert not caplog.records
    torch.testing.assert_close(out, run_oracle(tensors, kwargs), atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_grid_sample_reference_matches_oracle(device, case):
    tensors, kwargs = make_case(case, device=device)
    stride, padding, dilation = kwargs["stride"], kwargs["padding"], kwargs["dilation"]
    out = deform_conv._deform_conv2d_grid_sample(
        *tensors, stride, padding, dilation, kwargs["groups"], kwargs["deform_groups"]
    )
    torch.testing.assert_close(out.cpu(), run_oracle(tensors, kwargs), atol=1e-10, rtol=0)


def test_offset_layout_is_y_then_x():
    # A single tap (1x1 kernel) shifted by Δy = +1 must read the row below; Δx = +1 the column to the right.
    x = torch.arange(12, dtype=torch.float64).view(1, 1, 3, 4)
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    offset = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    offset[:, 0] = 1.0  # Δy
    down = deform_conv2d(x, offset, weight, padding=0)
    torch.testing.assert_close(down[0, 0, :2], x[0, 0, 1:])
    assert torch.all(down[0, 0, 2] == 0)
    offset = offset.flip(1)  # now Δx = 1
    right = deform_conv2d(x, offset, weight, padding=0)
    torch.testing.assert_close(right[0, 0, :, :3], x[0, 0, :, 1:])


@pytest.mark.parametrize("case", CASES)
def test_zero_offsets_equal_conv2d(device, case):
    tensors, kwargs = make_case(case, dtype=torch.float32, device=device, offset_scale=0.0)
    expected = F.conv2d(
        tensors[0], tensors[2], tensors[3], kwargs["stride"], kwargs["padding"], kwargs["dilation"], kwargs["groups"]
    )
    torch.testing.assert_close(deform_conv2d(*tensors, **kwargs), expected, atol=1e-5, rtol=1e-5)
    grid_out = deform_conv._deform_conv2d_grid_sample(
        *tensors, kwargs["stride"], kwargs["padding"], kwargs["dilation"], kwargs["groups"], kwargs["deform_groups"]
    )
    torch.testing.assert_close(grid_out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["public", "grid_sample"])
def test_gradcheck(device, path):
    case = (1, 2, 3, 3, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True)
    (x, offset, weight, bias), kwargs = make_case(case, device=device, offset_scale=0.7, seed=5)
    for t in (x, offset, weight, bias):
        t.requires_grad_()
    if path == "public":
        fn = lambda *t: deform_conv2d(*t, **kwargs)  # noqa: E731
    else:
        args = (kwargs["stride"], kwargs["padding"], kwargs["dilation"], kwargs["groups"], kwargs["deform_groups"])
        fn = lambda *t: deform_conv._deform_conv2d_grid_sample(*t, *args)  # noqa: E731
    # CUDA backward kernels (torchvision's, grid_sample's) accumulate with atomic adds in no fixed order, so two
    # backward passes differ by float64 rounding: allow that much non-determinism there, none on CPU.
    nondet_tol = 0.0 if device.type == "cpu" else 1e-10
    assert torch.autograd.gradcheck(fn, (x, offset, weight, bias), nondet_tol=nondet_tol)


def test_non_contiguous_inputs(device):
    (x, offset, weight, bias), kwargs = make_case(CASES[0], device=device)
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)
    offset_nc = torch.stack((offset, torch.zeros_like(offset)), dim=-1)[..., 0]
    weight_nc = weight.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    assert not (x_nc.is_contiguous() or offset_nc.is_contiguous() or weight_nc.is_contiguous())
    torch.testing.assert_close(
        deform_conv2d(x_nc, offset_nc, weight_nc, bias, **kwargs), deform_conv2d(x, offset, weight, bias, **kwargs)
    )


def test_empty_batch(device):
    x = torch.zeros(0, 4, 5, 6, device=device, requires_grad=True)
    offset = torch.zeros(0, 18, 5, 6, device=device)
    weight = torch.randn(8, 4, 3, 3, device=device, requires_grad=True)
    out = deform_conv2d(x, offset, weight)
    assert out.shape == (0, 8, 5, 6)
    out.sum().backward()
    assert weight.grad is not None and torch.all(weight.grad == 0)


def test_shape_errors():
    x = torch.zeros(1, 4, 5, 5)
    with pytest.raises(ValueError, match="offset shape"):
        deform_conv2d(x, torch.zeros(1, 17, 5, 5), torch.zeros(4, 4, 3, 3))
    with pytest.raises(ValueError, match="groups"):
        deform_conv2d(x, torch.zeros(1, 18, 5, 5), torch.zeros(4, 3, 3, 3))


def test_pack_state_dict_matches_reference_dcn():
    # Reference DepthNet context branch: DCN(256 -> 256, k=3, pad=1, groups=4), no bias.
    dcn = DeformConv2dPack(256, 256, kernel_size=3, padding=1, groups=4)
    shapes = {name: tuple(t.shape) for name, t in dcn.state_dict().items()}
    assert shapes == {
        "weight": (256, 64, 3, 3),
        "conv_offset.weight": (18, 256, 3, 3),
        "conv_offset.bias": (18,),
    }
    assert torch.all(dcn.conv_offset.weight == 0) and torch.all(dcn.conv_offset.bias == 0)
    bound = 1 / math.sqrt(256 * 9)
    assert dcn.weight.abs().max() <= bound


def test_pack_forward_backward(device):
    torch.manual_seed(0)
    dcn = DeformConv2dPack(4, 6, kernel_size=3, padding=1, groups=2, deform_groups=2, bias=True).to(device)
    x = torch.randn(2, 4, 5, 7, device=device)
    out = dcn(x)
    # Zero-initialised offsets: an ordinary grouped convolution.
    torch.testing.assert_close(out, F.conv2d(x, dcn.weight, dcn.bias, padding=1, groups=2), atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert dcn.conv_offset.weight.grad is not None and dcn.conv_offset.weight.grad.abs().sum() > 0
    assert dcn.weight.grad is not None and dcn.bias.grad is not None


def test_constraint_checker():
    assert deform_conv2d_fast_path_unsupported(256, 4, 1, torch.float32) is None  # BEVNeXt DCN, 64 per group
    assert deform_conv2d_fast_path_unsupported(64, 1, 1, torch.float32) is None
    assert deform_conv2d_fast_path_unsupported(256, 32, 1, torch.float32) is None  # 8 per group
    assert deform_conv2d_fast_path_unsupported(512, 1, 1, torch.float32) is None
    assert "deform_groups" in deform_conv2d_fast_path_unsupported(256, 1, 2, torch.float32)
    assert "multiple of 64" in deform_conv2d_fast_path_unsupported(96, 1, 1, torch.float32)
    assert "per group" in deform_conv2d_fast_path_unsupported(256, 64, 1, torch.float32)  # 4 per group
    assert "512" in deform_conv2d_fast_path_unsupported(576, 1, 1, torch.float32)
    assert "dtype" in deform_conv2d_fast_path_unsupported(256, 1, 1, torch.float16)


class _FakeMx:
    """Stands in for mx_driving: accepts only what the real kernel accepts, answers with the grid_sample reference."""

    def __init__(self):
        self.calls = 0

    def deform_conv2d(self, x, offset, weight, stride, padding, dilation, groups, deformable_groups):
        in_ch = x.shape[1]
        assert deformable_groups == 1 and in_ch % 64 == 0 and in_ch <= 512 and (in_ch // groups) % 8 == 0
        self.calls += 1
        return deform_conv._deform_conv2d_grid_sample(x, offset, weight, None, stride, padding, dilation, groups, 1)


def test_dispatch_passes_groups_and_adds_bias(monkeypatch):
    fake = _FakeMx()
    monkeypatch.setattr(deform_conv, "fast_module", lambda op, device_type: fake)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 128, 4, 5, generator=gen)
    offset = torch.randn(1, 18, 4, 5, generator=gen)
    weight = torch.randn(6, 64, 3, 3, generator=gen)
    bias = torch.randn(6, generator=gen)
    out = deform_conv2d(x, offset, weight, bias, groups=2)
    assert fake.calls == 1  # one kernel call with groups=2 (the wrapper hands groups to the kernel)
    expected = deform_conv._deform_conv2d_grid_sample(x, offset, weight, bias, (1, 1), (1, 1), (1, 1), 2, 1)
    torch.testing.assert_close(out, expected)
    # Not applicable (Cin per group 4): reference, no kernel call.
    deform_conv2d(x, offset, torch.randn(32, 4, 3, 3), groups=32)
    assert fake.calls == 1


@pytest.mark.parametrize("in_ch, groups", [(64, 1), (256, 4)])
def test_fast_path_shapes_match_float64_reference(device, in_ch, groups):
    # Shapes mx_driving's kernel takes (Cin a multiple of 64, 256 in 4 groups as in BEVNeXt's depth net): with
    # TORCH_DEVICE=npu and mx_driving installed, its forward and backward against the CPU float64 reference.
    assert deform_conv2d_fast_path_unsupported(in_ch, groups, 1, torch.float32) is None
    case = (2, in_ch, 6, 7, 16, (3, 3), (1, 1), (1, 1), (1, 1), groups, 1, True)
    tensors, kwargs = make_case(case, dtype=torch.float32, device=device, seed=in_ch)
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = deform_conv2d(*leaves, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(grad.to(device))
    cpu64 = [t.detach().cpu().double().requires_grad_() for t in tensors]
    args = (kwargs["stride"], kwargs["padding"], kwargs["dilation"], groups, 1)
    want = deform_conv._deform_conv2d_grid_sample(*cpu64, *args)
    want.backward(grad.double())
    for got, ref in zip([out] + [t.grad for t in leaves], [want] + [t.grad for t in cpu64]):
        scale = max(1.0, float(ref.detach().abs().max()))
        torch.testing.assert_close(got.detach().cpu().double(), ref.detach(), atol=2e-5 * scale, rtol=1e-4)
