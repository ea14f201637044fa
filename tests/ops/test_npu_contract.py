"""bevnext's NPU fast paths driven through mx_driving's real Python wrappers, on CPU tensors.

``mx_driving_standin`` executes the installed wheel's wrapper files with the compiled kernels replaced by
checked stand-ins, and routes the dispatch's ``mx_driving`` import to them for CPU tensors. Each public op
(``bev_pool``, ``multi_scale_deformable_attn``, ``deform_conv2d``) then runs its NPU code path: our dispatch
-> the real wrapper (layout permutes, casts, argument order, autograd) -> a stand-in that rejects anything
the kernel is not built for -> bevnext's reference math. Forward and backward are compared with the
public op forced to its reference path (``BEVNEXT_OPS=reference``; for deformable convolution on CPU that
is torchvision's kernel, an independent implementation).

Shapes: the stage 1 and stage 2 model configs with batch 1 (6 cameras), and the edges of each kernel
constraint, on both sides: inside, the kernel runs and matches; outside, the dispatch keeps the call on the
reference and the stand-in rejects the same call made directly through the wrapper. Deformable attention at
the stage shapes samples 2048 of the 16384 BEV queries: no constraint depends on the query count.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from mx_driving_standin import (
    DISTRIBUTION,
    WRAPPER_FILES,
    KernelContractError,
    LoadedMxDriving,
    load_mx_driving,
    pinned_version,
    route_cpu_tensors_to_mx_driving,
    unavailable_reason,
)

from bevnext.config.model import ModelConfig
from bevnext.config.stages import stage1, stage2
from bevnext.models import depth_net
from bevnext.ops import deform_conv2d, multi_scale_deformable_attn
from bevnext.ops.bev_pool import bev_pool, voxelize_points
from bevnext.structures.sensors import CAMERAS

_REASON = unavailable_reason()
if _REASON is not None:
    pytest.skip(_REASON, allow_module_level=True)

STAGES: dict[str, Callable[[], ModelConfig]] = {"stage1": stage1, "stage2": stage2}
# fp32 tolerance: |got - want| <= RTOL * |want| + ATOL_SCALE * max|want|. The absolute part scales with the
# tensor because some results are sums over thousands of products (the convolution's weight gradient sums
# over 6 * 32 * 88 output pixels), whose rounding error grows with their magnitude, not with each element's.
RTOL, ATOL_SCALE = 1e-4, 2e-5
MSDA_QUERIES = 2048


@pytest.fixture
def mx(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoadedMxDriving]:
    """The real wrappers over the kernel stand-ins, with CPU tensors routed to them."""
    with load_mx_driving() as loaded:
        route_cpu_tensors_to_mx_driving(monkeypatch)
        yield loaded


@contextlib.contextmanager
def forced_reference() -> Iterator[None]:
    """``BEVNEXT_OPS=reference`` inside the block."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("BEVNEXT_OPS", "reference")
        yield


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Fresh leaf copies that require grad (one set per path, so the gradients can be compared)."""
    return [t.detach().clone().requires_grad_() for t in tensors]


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.detach().abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL_SCALE * max(scale, 1.0))


def run_both(
    mx: LoadedMxDriving, kernel: str, fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """``fn(*inputs)`` forward and backward once on the dispatched path and once forced to the reference.

    Asserts that the dispatched path called ``kernel`` and its backward exactly once each and that the forced
    reference called no kernel. Returns (out, grads, reference out, reference grads).
    """
    before = sum(mx.kernels.calls.values())
    fast_in = leaves(*inputs)
    out = fn(*fast_in)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    out.backward(grad)
    assert mx.kernels.calls[kernel] == 1 and mx.kernels.calls[f"{kernel}_backward"] == 1
    ref_in = leaves(*inputs)
    with forced_reference():
        ref = fn(*ref_in)
        ref.backward(grad)
    assert sum(mx.kernels.calls.values()) == before + 2
    return out, [t.grad for t in fast_in], ref, [t.grad for t in ref_in]


def assert_matches(
    mx: LoadedMxDriving, kernel: str, fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]
) -> None:
    """:func:`run_both`, then outputs and every input gradient equal within the fp32 tolerance."""
    out, grads, ref, ref_grads = run_both(mx, kernel, fn, inputs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want)


# One small call per op that its kernel takes (problem builders below).
CALLS: dict[str, Callable[[], torch.Tensor]] = {
    "bev_pool": lambda: bev_pool(*bev_problem(channels=8)),
    "msda": lambda: multi_scale_deformable_attn(*msda_problem(2, 8, [(3, 4)], 2, 5)),
    "deform_conv2d": lambda: deform_conv2d(*dcn_problem(64, 8, 1)[:3], padding=1),
}


# -- the loader itself ---------------------------------------------------------------------------------------


def test_loader_runs_the_wheels_wrappers_and_restores_sys_modules(monkeypatch: pytest.MonkeyPatch):
    sentinel = object()
    monkeypatch.setitem(sys.modules, "mx_driving", sentinel)  # a previous entry must come back unchanged
    before = {k: v for k, v in sys.modules.items() if k.startswith(("mx_driving", "torch.npu"))}
    torch_npu_attribute = getattr(torch, "npu", None)  # None unless torch_npu is really installed and imported
    dist = importlib.metadata.distribution(DISTRIBUTION)
    with pytest.raises(RuntimeError, match="inside"), load_mx_driving() as loaded:
        assert loaded.version == dist.version == pinned_version()
        assert sys.modules["mx_driving"] is loaded.package and sys.modules["mx_driving._C"] is loaded.package._C
        for name, relative in WRAPPER_FILES.items():
            module = loaded.wrappers[name]
            assert Path(module.__file__) == Path(str(dist.locate_file(relative)))
            assert getattr(loaded.package, name) is getattr(module, name)
            assert module.torch.npu is sys.modules["torch.npu"]  # the wrapper's own view of torch
        assert getattr(torch, "npu", None) is torch_npu_attribute  # the real torch module is left alone
        raise RuntimeError("a failure inside the block")
    after = {k: v for k, v in sys.modules.items() if k.startswith(("mx_driving", "torch.npu"))}
    assert after == before and sys.modules["mx_driving"] is sentinel


def test_no_compiled_mx_driving_code_is_loaded(mx: LoadedMxDriving):
    # A shared object from the wheel (its _C or the op libraries) would show up in the process's memory map.
    package_dir = str(Path(str(importlib.metadata.distribution(DISTRIBUTION).locate_file("mx_driving"))))
    if package_dir in Path("/proc/self/maps").read_text():
        pytest.skip("the real mx_driving was imported earlier in this process")
    for name in ("bev_pool", "msda", "deform_conv2d"):
        CALLS[name]()
    assert mx.kernels.calls["npu_bev_pool_v3"] == 1
    assert mx.kernels.calls["multi_scale_deformable_attn"] == 1 and mx.kernels.calls["deformable_conv2d"] == 1
    assert package_dir not in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("op", sorted(CALLS))
def test_forced_reference_never_reaches_a_kernel(mx: LoadedMxDriving, monkeypatch: pytest.MonkeyPatch, op: str):
    monkeypatch.setenv("BEVNEXT_OPS", "reference")
    CALLS[op]()
    assert sum(mx.kernels.calls.values()) == 0
    monkeypatch.delenv("BEVNEXT_OPS")
    CALLS[op]()
    assert sum(mx.kernels.calls.values()) == 1


# -- bev_pool -> mx_driving.bev_pool_v3 (mx_driving/ops/bev_pool_v3.py) ------------------------------------


def bev_problem(
    channels: int, batch: int = 1, cams: int = 2, depth_bins: int = 3, size: tuple[int, int] = (2, 3), seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
    """Random depth (B, N, D, h, w), channels-last feat (B, N, h, w, C), rank tables over a (B, 2, 3, 4) grid."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    points = torch.rand(batch, cams, depth_bins, h, w, 3, generator=gen) * torch.tensor([5.0, 4.0, 2.5]) - 0.25
    ranks_bev, ranks_depth, ranks_feat = voxelize_points(points, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (4, 3, 2))
    depth = torch.rand(batch, cams, depth_bins, h, w, generator=gen)
    feat = torch.randn(batch, cams, channels, h, w, generator=gen).permute(0, 1, 3, 4, 2)
    return depth, feat, ranks_depth, ranks_feat, ranks_bev, (batch, 2, 3, 4)


def stage_bev_problem(cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """bev_pool's inputs at a stage's shape, batch 1: frustum points over and a little beyond the BEV grid."""
    grid_x, grid_y, grid_z = cfg.grid_size
    h, w = (s // cfg.downsample for s in cfg.input_size)
    gen = torch.Generator().manual_seed(1)
    lower = torch.tensor(cfg.point_cloud_range[:3])
    extent = torch.tensor(cfg.point_cloud_range[3:]) - lower
    frustum = (1, len(CAMERAS), cfg.num_depth_bins, h, w)
    points = lower + (torch.rand(*frustum, 3, generator=gen) * 1.2 - 0.1) * extent
    ranks_bev, ranks_depth, ranks_feat = voxelize_points(
        points, cfg.point_cloud_range[:3], cfg.bev_cell, cfg.grid_size, truncate=cfg.truncate_voxel_index
    )
    depth = torch.rand(*frustum, generator=gen).softmax(2)
    # The view transform passes the context (B*N, C, h, w) as a channels-last view.
    feat = torch.randn(1, len(CAMERAS), cfg.context_channels, h, w, generator=gen).permute(0, 1, 3, 4, 2)
    return depth, feat, ranks_depth, ranks_feat, ranks_bev, (1, grid_z, grid_y, grid_x)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_bev_pool_v3_at_stage_shapes(mx: LoadedMxDriving, stage: str):
    depth, feat, rd, rf, rb, shape = stage_bev_problem(STAGES[stage]())
    assert rb.dtype == torch.int32 and 0 < rb.numel() < depth.numel()
    assert_matches(mx, "npu_bev_pool_v3", lambda d, f: bev_pool(d, f, rd, rf, rb, shape), [depth, feat])


@pytest.mark.parametrize("channels, takes_kernel", [(8, True), (360, True), (12, False), (368, False)])
def test_bev_pool_v3_channel_limits(mx: LoadedMxDriving, channels: int, takes_kernel: bool):
    depth, feat, rd, rf, rb, shape = bev_problem(channels)
    if takes_kernel:
        assert_matches(mx, "npu_bev_pool_v3", lambda d, f: bev_pool(d, f, rd, rf, rb, shape), [depth, feat])
        return
    out = bev_pool(depth, feat, rd, rf, rb, shape)
    assert sum(mx.kernels.calls.values()) == 0
    with forced_reference():
        assert_close(out, bev_pool(depth, feat, rd, rf, rb, shape))
    # The same call made directly is one the kernel is not built for.
    with pytest.raises(KernelContractError, match="C="):
        mx.package.bev_pool_v3(depth, feat.contiguous(), rd, rf, rb, [*shape, channels])


def test_bev_pool_v3_gets_fp32_int32_contiguous_inputs(mx: LoadedMxDriving):
    # fp16 features, int64 ranks, strided views: the dispatch hands the kernel what it is built for.
    depth, feat, rd, rf, rb, shape = bev_problem(16)
    half = [depth.half(), feat.half()]
    ranks = [torch.stack((r.long(), r.long()), 1)[:, 0] for r in (rd, rf, rb)]
    assert not (half[1].is_contiguous() or ranks[0].is_contiguous())
    out = bev_pool(*half, *ranks, shape)
    assert mx.kernels.calls["npu_bev_pool_v3"] == 1 and out.dtype == torch.float16
    with forced_reference():
        torch.testing.assert_close(out, bev_pool(*half, *ranks, shape))


def test_bev_pool_v3_not_called_without_points(mx: LoadedMxDriving):
    depth, feat, *_ = bev_problem(8)
    empty = torch.zeros(0, dtype=torch.int32)
    out = bev_pool(depth, feat, empty, empty, empty, (1, 2, 3, 4))
    assert sum(mx.kernels.calls.values()) == 0 and out.shape == (1, 8, 2, 3, 4) and not out.any()


# -- multi_scale_deformable_attn -> mx_driving.multi_scale_deformable_attn ----------------------------------


def msda_problem(
    heads: int, dims: int, shapes: list[tuple[int, int]], points: int, queries: int, bs: int = 1, seed: int = 0
) -> list[torch.Tensor]:
    """value (bs, S, heads, dims), int64 shapes / starts as the model builds them, locations slightly
    outside [0, 1] too, softmax-normalised weights."""
    gen = torch.Generator().manual_seed(seed)
    spatial = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    value = torch.randn(bs, int(sizes.sum()), heads, dims, generator=gen)
    locations = torch.rand(bs, queries, heads, len(shapes), points, 2, generator=gen) * 1.1 - 0.05
    weights = torch.rand(bs, queries, heads, len(shapes) * points, generator=gen).softmax(-1)
    return [value, spatial, starts, locations, weights.view(bs, queries, heads, len(shapes), points)]


def msda(spatial: torch.Tensor, starts: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``(value, locations, weights) -> multi_scale_deformable_attn(...)`` over fixed level shapes / starts."""
    return lambda v, loc, w: multi_scale_deformable_attn(v, spatial, starts, loc, w)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_msda_at_stage_shapes(mx: LoadedMxDriving, stage: str):
    cfg = STAGES[stage]()
    heads, dims = cfg.refine_heads, cfg.context_channels // cfg.refine_heads
    assert dims == {"stage1": 10, "stage2": 20}[stage]  # channels per head: not a multiple of 8
    level = tuple(s // cfg.downsample for s in cfg.input_size)
    value, spatial, starts, locations, weights = msda_problem(
        heads, dims, [level], cfg.refine_points, MSDA_QUERIES, bs=len(CAMERAS), seed=dims
    )
    assert_matches(mx, "multi_scale_deformable_attn", msda(spatial, starts), [value, locations, weights])


# (heads, dims, levels, points, the kernel takes it)
MSDA_LIMITS = [
    (1, 1, 1, 1, True),  # smallest; dims not a multiple of 8
    (8, 256, 1, 2, True),  # dims at the limit
    (2, 257, 1, 2, False),
    (8, 10, 4, 16, True),  # levels * points = 64
    (2, 10, 5, 13, False),  # 65
    (9, 8, 1, 2, False),  # heads
]


@pytest.mark.parametrize("heads, dims, levels, points, takes_kernel", MSDA_LIMITS)
def test_msda_limits(mx: LoadedMxDriving, heads: int, dims: int, levels: int, points: int, takes_kernel: bool):
    shapes = [(3 + level, 4 + 2 * level) for level in range(levels)]
    value, spatial, starts, locations, weights = msda_problem(heads, dims, shapes, points, 6, bs=2)
    fn = msda(spatial, starts)
    if takes_kernel:
        assert_matches(mx, "multi_scale_deformable_attn", fn, [value, locations, weights])
        return
    out = fn(value, locations, weights)
    assert sum(mx.kernels.calls.values()) == 0
    with forced_reference():
        assert_close(out, fn(value, locations, weights))
    with pytest.raises(KernelContractError):
        mx.package.multi_scale_deformable_attn(value, spatial, starts, locations, weights)


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a wider buffer); differentiable."""
    return torch.stack((t, torch.zeros_like(t)), -1)[..., 0]


def test_msda_kernel_gets_contiguous_inputs(mx: LoadedMxDriving):
    # The wrapper hands value, locations and weights to the kernel as they are; the kernel reads raw memory.
    value, spatial, starts, locations, weights = msda_problem(2, 8, [(4, 5)], 4, 6, bs=2)
    assert not strided(value).is_contiguous()
    fn = msda(spatial, starts)
    assert_matches(mx, "multi_scale_deformable_attn", lambda *t: fn(*map(strided, t)), [value, locations, weights])
    with pytest.raises(KernelContractError, match="contiguous"):
        mx.package.multi_scale_deformable_attn(value, spatial, starts, strided(locations), weights)


def test_msda_kernel_gets_fp32(mx: LoadedMxDriving):
    # fp16 in, fp16 out; the kernel is fp32-only, and the wrapper casts only inside an NPU autocast region.
    problem = msda_problem(2, 8, [(4, 5)], 4, 6, bs=2)
    value, spatial, starts, locations, weights = (t.half() if t.is_floating_point() else t for t in problem)
    out = multi_scale_deformable_attn(value, spatial, starts, locations, weights)
    assert mx.kernels.calls["multi_scale_deformable_attn"] == 1 and out.dtype == torch.float16
    with forced_reference():
        torch.testing.assert_close(out, multi_scale_deformable_attn(value, spatial, starts, locations, weights))
    with pytest.raises(KernelContractError, match="float32"):
        mx.package.multi_scale_deformable_attn(value, spatial, starts, locations, weights)


# -- deform_conv2d -> mx_driving.deform_conv2d (mx_driving/ops/deform_conv2d.py) ----------------------------


def dcn_problem(
    in_ch: int, out_ch: int, groups: int, size: tuple[int, int] = (5, 6), batch: int = 1, seed: int = 0, **conv
) -> list[torch.Tensor]:
    """x (B, Cin, H, W), offsets of up to ±2 pixels (B, 2*9, Ho, Wo), weight (Cout, Cin/groups, 3, 3), bias."""
    stride, padding, dilation = conv.get("stride", 1), conv.get("padding", 1), conv.get("dilation", 1)
    gen = torch.Generator().manual_seed(seed)
    height, width = size
    out_h = (height + 2 * padding - dilation * 2 - 1) // stride + 1
    out_w = (width + 2 * padding - dilation * 2 - 1) // stride + 1
    x = torch.randn(batch, in_ch, height, width, generator=gen)
    offset = (torch.rand(batch, 18, out_h, out_w, generator=gen) * 2 - 1) * 2.0
    weight = torch.randn(out_ch, in_ch // groups, 3, 3, generator=gen) / (in_ch * 9) ** 0.5
    return [x, offset, weight, torch.randn(out_ch, generator=gen)]


def dcn_stage_shape(cfg: ModelConfig) -> tuple[int, int, tuple[int, int]]:
    """The depth net's deformable 3x3: (channels, groups, feature size) of a stage."""
    return cfg.depth_mid_channels, depth_net._CONTEXT_GROUPS, tuple(s // cfg.downsample for s in cfg.input_size)


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted({dcn_stage_shape(make()) for make in STAGES.values()}))
def test_deform_conv2d_at_stage_shapes(mx: LoadedMxDriving, shape: tuple[int, int, tuple[int, int]]):
    # Both stages use the same deformable 3x3 (256 channels in 4 groups at 32 x 88), so this runs once.
    channels, groups, size = shape
    x, offset, weight, _ = dcn_problem(channels, channels, groups, size=size, batch=len(CAMERAS))
    fn = lambda x_, o, w: deform_conv2d(x_, o, w, padding=1, groups=groups)  # noqa: E731
    assert_matches(mx, "deformable_conv2d", fn, [x, offset, weight])


# (Cin, Cout, groups, stride, padding, dilation, the kernel takes it)
DCN_LIMITS = [
    (64, 8, 1, 1, 1, 1, True),
    (64, 16, 8, 2, 1, 1, True),  # 8 channels per group; stride 2
    (512, 8, 4, 1, 2, 2, True),  # Cin at the limit; dilation 2
    (64, 16, 16, 1, 1, 1, False),  # 4 channels per group
    (96, 8, 1, 1, 1, 1, False),  # not a multiple of 64
    (576, 8, 1, 1, 1, 1, False),  # above 512 (the backward's limit)
]


@pytest.mark.parametrize("in_ch, out_ch, groups, stride, padding, dilation, takes_kernel", DCN_LIMITS)
def test_deform_conv2d_limits(
    mx: LoadedMxDriving,
    in_ch: int,
    out_ch: int,
    groups: int,
    stride: int,
    padding: int,
    dilation: int,
    takes_kernel: bool,
):
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    x, offset, weight, bias = dcn_problem(in_ch, out_ch, groups, **conv)
    fn = lambda x_, o, w, b: deform_conv2d(x_, o, w, b, groups=groups, **conv)  # noqa: E731
    if takes_kernel:
        assert_matches(mx, "deformable_conv2d", fn, [x, offset, weight, bias])
        return
    out = fn(x, offset, weight, bias)
    assert sum(mx.kernels.calls.values()) == 0
    with forced_reference():
        assert_close(out, fn(x, offset, weight, bias))
    # Made directly through the wrapper, the call fails in the kernel's forward or, above 512 channels, backward.
    x_, offset_, weight_ = leaves(x, offset, weight)
    with pytest.raises(KernelContractError):
        mx.package.deform_conv2d(x_, offset_, weight_, stride, padding, dilation, groups, 1).sum().backward()


def test_deform_conv2d_refuses_offset_groups_and_half(mx: LoadedMxDriving):
    x, offset, weight, _ = dcn_problem(128, 8, 1)
    offset2 = torch.cat((offset, offset.flip(1)), 1)  # two offset groups
    for args in ((x, offset2, weight), (x.half(), offset.half(), weight.half())):
        deform_groups = args[1].shape[1] // 18
        out = deform_conv2d(*args, padding=1, deform_groups=deform_groups)
        assert sum(mx.kernels.calls.values()) == 0
        with forced_reference():
            torch.testing.assert_close(out, deform_conv2d(*args, padding=1, deform_groups=deform_groups))
    with pytest.raises(KernelContractError, match="deformable_groups"):
        mx.package.deform_conv2d(x, offset2, weight, 1, 1, 1, 1, 2)
    with pytest.raises(KernelContractError, match="float32"):
        mx.package.deform_conv2d(x.half(), offset.half(), weight.half(), 1, 1, 1, 1, 1)
