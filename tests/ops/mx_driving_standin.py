"""mx_driving's real Python wrappers on a CPU, with the compiled kernels replaced by checked stand-ins.

bevnext's NPU fast paths call ``mx_driving.bev_pool_v3``, ``mx_driving.multi_scale_deformable_attn`` and
``mx_driving.deform_conv2d``. Those are Python wrappers (autograd Functions that permute layouts, cast
dtypes and pick arguments) around the compiled ``mx_driving._C``, which needs CANN and an Ascend NPU. This
module runs the wrapper files shipped in the installed mx-driving wheel unchanged and answers their
``mx_driving._C`` calls with :class:`KernelStandIn`: one Python function per compiled function used, with
the same name and argument list, that checks what the kernel is documented (or, where the wheel's kernel
files say more, built) to receive, and then computes the documented result with bevnext's pure-PyTorch
reference ops. A mismatch between our dispatch and the real wrapper, or between the wrapper's output and
our reading of the kernel, then shows up on any CPU.

How the modules are loaded (:func:`load_mx_driving`):

* The wheel is located through its installed distribution metadata (``importlib.metadata``); nothing is
  imported from it. Its ``mx_driving/__init__.py`` is never executed: it imports ``torch_npu``, patches
  ``torch.cuda`` (``transfer_to_npu``) and loads the compiled ``_C``.
* Stand-in modules are placed in ``sys.modules`` first: ``mx_driving`` (an empty package that later
  re-exports the three wrapper functions, as the real ``__init__`` does), ``mx_driving._C``
  (:class:`KernelStandIn`), ``mx_driving.ops``, and ``torch.npu`` / ``torch.npu.amp`` (``custom_fwd``,
  ``custom_bwd``; the wrapper for deformable attention imports them at module level).
* Each wrapper file (``mx_driving/ops/bev_pool_v3.py``, ``multi_scale_deformable_attn.py``,
  ``deform_conv2d.py``) is executed from its path with ``importlib.util.spec_from_file_location`` under its
  real module name. Its ``import mx_driving._C`` and ``from torch.npu.amp import ...`` find the stand-ins in
  ``sys.modules`` before any finder looks at the disk.
* ``deform_conv2d.py`` reads ``torch.npu.conv.allow_hf32`` when it runs. Instead of adding ``npu`` to the real
  ``torch`` module, that one wrapper module's global ``torch`` is replaced by a view of torch that adds it.
* bevnext's dispatch imports ``mx_driving`` lazily for NPU tensors; :func:`route_cpu_tensors_to_mx_driving`
  makes it do the same for CPU tensors, so the public ops take their NPU code path here.

Why this is safe:

* No compiled code runs. The only compiled dependency of the three wrappers is ``mx_driving._C``, which is
  resolved from ``sys.modules``; the stand-in packages have an empty ``__path__``, so a missing entry would
  fail to import rather than find the ``.so``. ``torch_npu`` is never imported (none of the three imports it),
  and the wheel's own ``__init__`` never runs. A test checks the process's memory map for the ``.so``.
* No global state leaks into other tests. The loader records every ``sys.modules`` key it sets and restores
  each one (or removes it) on exit, also when a test fails; the real ``torch`` module is not modified; the
  dispatch's routing and import cache are changed through pytest's ``monkeypatch``, which undoes them.
* The pinned release is in ``tests/ops/mx-driving.txt``; tests skip with one reason where it is not installed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor

from bevnext.ops import _dispatch
from bevnext.ops.bev_pool import _bev_pool_reference
from bevnext.ops.deform_attn import _msda_reference
from bevnext.ops.deform_conv import _deform_conv2d_grid_sample

__all__ = [
    "DISTRIBUTION",
    "PIN_FILE",
    "KernelContractError",
    "KernelStandIn",
    "LoadedMxDriving",
    "load_mx_driving",
    "pinned_version",
    "route_cpu_tensors_to_mx_driving",
    "unavailable_reason",
]

DISTRIBUTION = "mx-driving"
PIN_FILE = Path(__file__).with_name("mx-driving.txt")
# The wrapper files bevnext's dispatch goes through, by the name the package exports them under.
WRAPPER_FILES = {
    "bev_pool_v3": "mx_driving/ops/bev_pool_v3.py",
    "multi_scale_deformable_attn": "mx_driving/ops/multi_scale_deformable_attn.py",
    "deform_conv2d": "mx_driving/ops/deform_conv2d.py",
}
_INT32_LIMIT = 2**31


def pinned_version() -> str:
    """The mx-driving version pinned in ``tests/ops/mx-driving.txt`` (e.g. ``"26.2.0.post2"``)."""
    for line in PIN_FILE.read_text().splitlines():
        match = re.match(r"\s*mx-driving\s*==\s*([^;\s]+)", line)
        if match:
            return match.group(1)
    raise ValueError(f"{PIN_FILE} pins no mx-driving version")


def unavailable_reason() -> str | None:
    """Why the contract tests cannot run here, or None when the pinned wheel's wrapper files are installed."""
    install = f"`pip install --no-deps -r {PIN_FILE.relative_to(PIN_FILE.parents[2])}`"
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return (
            f"mx-driving {pinned_version()} is not installed (PyPI has its wheel only for CPython 3.11 on "
            f"Linux x86_64); install it with {install}"
        )
    if dist.version != pinned_version():
        return f"mx-driving {dist.version} is installed, the tests check {pinned_version()}; install it with {install}"
    missing = [rel for rel in WRAPPER_FILES.values() if not Path(str(dist.locate_file(rel))).is_file()]
    if missing:
        return f"the installed mx-driving {dist.version} lacks {', '.join(missing)}"
    return None


class KernelContractError(AssertionError):
    """A stand-in kernel received something the real kernel is not built for."""


def _require(condition: bool, function: str, message: str) -> None:
    if not condition:
        raise KernelContractError(f"mx_driving._C.{function}: {message}")


def _require_tensor(t: Any, function: str, name: str, dtype: torch.dtype, dim: int) -> None:
    """Dtype, rank and contiguity of one kernel input (every kernel here reads raw memory by flat offsets)."""
    _require(isinstance(t, Tensor), function, f"{name} must be a tensor, got {type(t).__name__}")
    _require(t.dtype == dtype, function, f"{name} must be {dtype}, got {t.dtype}")
    _require(t.dim() == dim, function, f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    _require(t.is_contiguous(), function, f"{name} must be contiguous (the kernel reads it by flat offsets)")


def _require_range(t: Tensor, upper: int, function: str, name: str) -> None:
    """All values of an index tensor in [0, upper): out-of-range indices are out-of-bounds device accesses."""
    if t.numel():
        low, high = int(t.min()), int(t.max())
        _require(0 <= low and high < upper, function, f"{name} values must lie in [0, {upper}), got [{low}, {high}]")


def _int_pair(value: Any, function: str, name: str) -> tuple[int, int]:
    """An ``IntArrayRef`` of length 2, as the compiled layer takes stride / padding / dilation / kernel size."""
    _require(
        isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value),
        function,
        f"{name} must be a sequence of 2 ints, got {value!r}",
    )
    return int(value[0]), int(value[1])


@dataclass
class KernelStandIn:
    """``mx_driving._C`` in Python: the six compiled functions the three wrappers call.

    Each function checks its inputs against the kernel's contract, then computes the documented result with
    bevnext's reference op and returns it in the layout the compiled function returns. Sources of each
    check (mx-driving 26.2.0.post2): the op documentation, the op-info json shipped in the wheel
    (``packages/vendors/customize/op_impl/ai_core/tbe/config/ascend910b``: dtypes), the compiled layer's
    error messages, and the AscendC kernel sources shipped next to it (layouts and index arithmetic).
    ``calls`` counts the calls per function name, so tests can tell which implementation ran.
    """

    calls: Counter[str] = field(default_factory=Counter)
    # data_ptr of each deformable-conv im2col buffer handed out by the forward -> the input shapes it belongs to
    _columns: dict[int, tuple[tuple[int, ...], ...]] = field(default_factory=dict)

    def module(self) -> ModuleType:
        """A module named ``mx_driving._C`` whose attributes are this stand-in's kernel functions."""
        module = ModuleType("mx_driving._C", "Stand-in for mx_driving's compiled extension (tests only).")
        for name in (
            "npu_bev_pool_v3",
            "npu_bev_pool_v3_backward",
            "multi_scale_deformable_attn",
            "multi_scale_deformable_attn_backward",
            "deformable_conv2d",
            "deformable_conv2d_backward",
        ):
            setattr(module, name, self._counted(name, getattr(self, name)))
        return module

    def _counted(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            self.calls[name] += 1
            return fn(*args)

        return call

    # -- bev_pool_v3 ---------------------------------------------------------------------------------------

    def _check_bev_pool(
        self, fn: str, depth: Tensor | None, feat: Tensor, ranks: Sequence[Tensor | None], grid: int
    ) -> int:
        """Checks shared by the forward and backward; returns C."""
        # Only the BEVDet-v2 form (with depth) is modelled; bevnext never calls the depth-free form.
        _require(depth is not None and all(r is not None for r in ranks), fn, "depth and all ranks are required")
        assert depth is not None
        ranks_depth, ranks_feat, ranks_bev = ranks
        # op-info: depth, feat fp32; ranks int32. Documented shapes: depth (B, N, D, H, W), feat (B, N, H, W, C).
        _require_tensor(depth, fn, "depth", torch.float32, 5)
        _require_tensor(feat, fn, "feat", torch.float32, 5)
        _require(depth.shape[:2] == feat.shape[:2], fn, f"depth {tuple(depth.shape)} / feat {tuple(feat.shape)}")
        channels = feat.shape[-1]
        # The compiled layer: "The channel of feature must be multiple of 8."; documented: C <= 360.
        _require(channels % 8 == 0, fn, f"C={channels} must be a multiple of 8")
        _require(channels <= 360, fn, f"C={channels} must be at most 360")
        # Documented: B*D*H*W*C <= 2**31. The kernel scales ranks_bev and ranks_feat by C in int32.
        _require(grid * channels <= _INT32_LIMIT, fn, f"B*D*H*W*C={grid * channels} exceeds 2**31")
        _require(feat.numel() <= _INT32_LIMIT, fn, f"feat has {feat.numel()} elements: int32 offsets overflow")
        lengths = set()
        for name, r in zip(("ranks_depth", "ranks_feat", "ranks_bev"), ranks):
            assert r is not None
            _require_tensor(r, fn, name, torch.int32, 1)
            lengths.add(r.numel())
        _require(len(lengths) == 1, fn, f"rank vectors differ in length: {sorted(lengths)}")
        assert ranks_depth is not None and ranks_feat is not None and ranks_bev is not None
        _require_range(ranks_depth, depth.numel(), fn, "ranks_depth")
        _require_range(ranks_feat, feat.numel() // max(channels, 1), fn, "ranks_feat")
        _require_range(ranks_bev, grid, fn, "ranks_bev")
        return channels

    def npu_bev_pool_v3(
        self,
        depth: Tensor | None,
        feat: Tensor,
        ranks_depth: Tensor | None,
        ranks_feat: Tensor | None,
        ranks_bev: Tensor,
        B: int,
        D: int,
        H: int,
        W: int,
    ) -> Tensor:
        """Splat: depth (B, N, Dd, Hf, Wf), feat (B, N, Hf, Wf, C) -> (B, D, H, W, C), the kernel's channels-last
        grid (``out[ranks_bev[j]] += depth[ranks_depth[j]] * feat[ranks_feat[j]]``, atomically)."""
        fn = "npu_bev_pool_v3"
        _require(all(isinstance(v, int) and v > 0 for v in (B, D, H, W)), fn, f"B, D, H, W = {(B, D, H, W)}")
        self._check_bev_pool(fn, depth, feat, (ranks_depth, ranks_feat, ranks_bev), B * D * H * W)
        assert depth is not None and ranks_depth is not None and ranks_feat is not None
        out = _bev_pool_reference(depth, feat, ranks_depth, ranks_feat, ranks_bev, (B, D, H, W))
        return out.permute(0, 2, 3, 4, 1).contiguous()

    def npu_bev_pool_v3_backward(
        self,
        grad_out: Tensor,
        depth: Tensor | None,
        feat: Tensor,
        ranks_depth: Tensor | None,
        ranks_feat: Tensor | None,
        ranks_bev: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """grad_out (B, D, H, W, C) channels-last -> (grad_depth like depth, grad_feat like feat)."""
        fn = "npu_bev_pool_v3_backward"
        # The compiled layer: "grad_out must be 5D tensor(b, d, h, w, c)"; op-info: fp32.
        _require_tensor(grad_out, fn, "grad_out", torch.float32, 5)
        B, D, H, W, C = grad_out.shape
        channels = self._check_bev_pool(fn, depth, feat, (ranks_depth, ranks_feat, ranks_bev), B * D * H * W)
        _require(C == channels, fn, f"grad_out has C={C}, feat C={channels}")
        assert depth is not None and ranks_depth is not None and ranks_feat is not None
        with torch.enable_grad():
            d, f = depth.detach().requires_grad_(), feat.detach().requires_grad_()
            out = _bev_pool_reference(d, f, ranks_depth, ranks_feat, ranks_bev, (B, D, H, W))
            grad_depth, grad_feat = torch.autograd.grad(out, (d, f), grad_out.permute(0, 4, 1, 2, 3))
        return grad_depth, grad_feat

    # -- multi_scale_deformable_attn -----------------------------------------------------------------------

    def _check_msda(
        self, fn: str, value: Tensor, shapes: Tensor, starts: Tensor, locations: Tensor, weights: Tensor
    ) -> None:
        # op-info: value, locations, weights fp32 (no fp16 binary ships); the compiled layer: shapes and
        # starts int32. Documented shapes below.
        _require_tensor(value, fn, "value (bs, keys, heads, dims)", torch.float32, 4)
        _require_tensor(shapes, fn, "value_spatial_shapes (L, 2)", torch.int32, 2)
        _require_tensor(starts, fn, "value_level_start_index (L,)", torch.int32, 1)
        _require_tensor(locations, fn, "sampling_locations (bs, q, heads, L, P, 2)", torch.float32, 6)
        _require_tensor(weights, fn, "attention_weights (bs, q, heads, L, P)", torch.float32, 5)
        bs, keys, heads, dims = value.shape
        levels, points = locations.shape[3], locations.shape[4]
        _require(value.numel() > 0 and locations.numel() > 0, fn, "empty inputs")
        _require(
            locations.shape[0] == bs and locations.shape[2] == heads and locations.shape[5] == 2,
            fn,
            f"sampling_locations {tuple(locations.shape)} does not match value {tuple(value.shape)}",
        )
        _require(weights.shape == locations.shape[:5], fn, f"attention_weights {tuple(weights.shape)}")
        _require(shapes.shape == (levels, 2) and starts.shape == (levels,), fn, f"{levels} levels expected")
        # The compiled layer: dims <= 256 and L*P <= 64; documented: heads <= 8. No rule on dims % 8 (the
        # kernel has an unaligned variant); see bevnext.ops.deform_attn.
        _require(dims <= 256, fn, f"embedding dims {dims} > 256")
        _require(levels * points <= 64, fn, f"levels*points = {levels * points} > 64")
        _require(heads <= 8, fn, f"heads = {heads} > 8")
        # The kernel reads level l's row y, column x at key starts[l] + y * W_l + x.
        sizes = shapes.long().prod(1)
        _require(int(sizes.sum()) == keys, fn, f"sum of H_l*W_l = {int(sizes.sum())} != keys = {keys}")
        expected_starts = torch.cumsum(sizes, 0) - sizes
        _require(torch.equal(starts.long(), expected_starts), fn, f"level_start_index {starts.tolist()}")

    def multi_scale_deformable_attn(
        self, value: Tensor, shapes: Tensor, starts: Tensor, locations: Tensor, weights: Tensor
    ) -> Tensor:
        """value (bs, keys, heads, dims), locations (bs, q, heads, L, P, 2) -> (bs, q, heads * dims)."""
        self._check_msda("multi_scale_deformable_attn", value, shapes, starts, locations, weights)
        return _msda_reference(value, shapes, starts, locations, weights)

    def multi_scale_deformable_attn_backward(
        self, value: Tensor, shapes: Tensor, starts: Tensor, locations: Tensor, weights: Tensor, grad_output: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """grad_output (bs, q, heads * dims) -> grads of value, sampling_locations, attention_weights."""
        fn = "multi_scale_deformable_attn_backward"
        self._check_msda(fn, value, shapes, starts, locations, weights)
        bs, _, heads, dims = value.shape
        # op-info: fp32. Its layout is autograd's: the wrapper passes it on unchanged and the docs are silent.
        _require(grad_output.dtype == torch.float32, fn, f"grad_output must be fp32, got {grad_output.dtype}")
        expected = (bs, locations.shape[1], heads * dims)
        _require(tuple(grad_output.shape) == expected, fn, f"grad_output {tuple(grad_output.shape)} != {expected}")
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
            out = _msda_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
            grad_value, grad_locations, grad_weights = torch.autograd.grad(out, leaves, grad_output)
        return grad_value, grad_locations, grad_weights

    # -- deformable_conv2d ---------------------------------------------------------------------------------

    def _check_deform_conv(
        self,
        fn: str,
        x: Tensor,
        offset: Tensor,
        weight: Tensor,
        kernel_size: Any,
        stride: Any,
        padding: Any,
        dilation: Any,
        groups: Any,
        deformable_groups: Any,
        allow_hf32: Any,
    ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
        """Checks shared by forward and backward on the channels-last inputs; returns (Ho, Wo) and the pairs.

        x (N, H, W, Cin), offset (N, Ho, Wo, 2*kh*kw), weight (Cout, kh, kw, Cin/groups), all fp32 contiguous.
        """
        # op-info: fp32; the compiled layer: 4-D tensors; the wrapper makes channels-last contiguous copies.
        _require_tensor(x, fn, "x (N, H, W, Cin)", torch.float32, 4)
        _require_tensor(offset, fn, "offset (N, Ho, Wo, 2*kh*kw)", torch.float32, 4)
        _require_tensor(weight, fn, "weight (Cout, kh, kw, Cin/groups)", torch.float32, 4)
        kh, kw = _int_pair(kernel_size, fn, "kernel_size")
        stride_p = _int_pair(stride, fn, "stride")
        padding_p = _int_pair(padding, fn, "padding")
        dilation_p = _int_pair(dilation, fn, "dilation")
        _require(isinstance(allow_hf32, bool), fn, f"allow_hf32 must be a bool, got {allow_hf32!r}")
        # The compiled layer: kernel size and dilation > 0, channels divisible by groups.
        _require(kh > 0 and kw > 0 and min(dilation_p) > 0 and min(stride_p) > 0, fn, "sizes must be positive")
        _require((kh, kw) == tuple(weight.shape[1:3]), fn, f"kernel_size {(kh, kw)} != weight {tuple(weight.shape)}")
        batch, height, width, in_ch = x.shape
        out_ch = weight.shape[0]
        _require(isinstance(groups, int) and groups >= 1, fn, f"groups = {groups!r}")
        _require(in_ch % groups == 0, fn, "input's channel should be divided by groups")
        _require(out_ch % groups == 0, fn, "weight's out channel should be divided by groups")
        _require(weight.shape[3] * groups == in_ch, fn, f"weight {tuple(weight.shape)} vs Cin={in_ch}")
        # Documented: deformable_groups == 1 and Cin a multiple of 64 (the kernel walks Cin in 64-wide repeats
        # and reads one (dy, dx) pair per tap). The kernel copies each group's columns in 8-float blocks.
        _require(deformable_groups == 1, fn, f"deformable_groups = {deformable_groups!r} != 1")
        _require(in_ch % 64 == 0, fn, f"Cin = {in_ch} is not a multiple of 64")
        _require((in_ch // groups) % 8 == 0, fn, f"Cin / groups = {in_ch // groups} is not a multiple of 8")
        out_h = (height + 2 * padding_p[0] - dilation_p[0] * (kh - 1) - 1) // stride_p[0] + 1
        out_w = (width + 2 * padding_p[1] - dilation_p[1] * (kw - 1) - 1) // stride_p[1] + 1
        expected = (batch, out_h, out_w, 2 * kh * kw)
        _require(tuple(offset.shape) == expected, fn, f"offset {tuple(offset.shape)} != {expected}")
        return (out_h, out_w), stride_p, padding_p, dilation_p

    def deformable_conv2d(
        self,
        x: Tensor,
        offset: Tensor,
        weight: Tensor,
        kernel_size: Any,
        stride: Any,
        padding: Any,
        dilation: Any,
        groups: Any,
        deformable_groups: Any,
        allow_hf32: Any,
    ) -> tuple[Tensor, Tensor]:
        """Channels-last x, offset, weight -> (out (N, Cout, Ho, Wo), im2col buffer).

        The kernel writes out as (N, Ho, Cout, Wo) and the compiled layer returns ``permute(0, 2, 1, 3)`` of it,
        so ``out`` is a non-contiguous view here too. The im2col buffer is opaque to the wrapper, which only
        hands it back to the backward.
        """
        fn = "deformable_conv2d"
        args = (x, offset, weight, kernel_size, stride, padding, dilation, groups, deformable_groups, allow_hf32)
        _, stride_p, padding_p, dilation_p = self._check_deform_conv(fn, *args)
        out = _deform_conv2d_grid_sample(
            x.permute(0, 3, 1, 2),
            offset.permute(0, 3, 1, 2),
            weight.permute(0, 3, 1, 2),
            None,
            stride_p,
            padding_p,
            dilation_p,
            groups,
            1,
        )
        rows = out.permute(0, 2, 1, 3).contiguous()  # (N, Ho, Cout, Wo): the kernel's output buffer
        columns = x.new_empty(offset.shape[:3] + (weight.shape[1] * weight.shape[2], x.shape[3]))
        self._columns[columns.data_ptr()] = (tuple(x.shape), tuple(offset.shape), tuple(weight.shape))
        return rows.permute(0, 2, 1, 3), columns

    def deformable_conv2d_backward(
        self,
        x: Tensor,
        weight: Tensor,
        offset: Tensor,
        columns: Tensor,
        grad_out: Tensor,
        kernel_size: Any,
        stride: Any,
        padding: Any,
        dilation: Any,
        groups: Any,
        deformable_groups: Any,
        allow_hf32: Any,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """grad_out (N, Ho, Cout, Wo) -> (grad_x, grad_weight, grad_offset) in NCHW shapes.

        Note the argument order (x, weight, offset), unlike the forward's. The compiled layer returns each
        gradient as ``permute(0, 3, 1, 2)`` of a channels-last buffer; so does this stand-in.
        """
        fn = "deformable_conv2d_backward"
        args = (x, offset, weight, kernel_size, stride, padding, dilation, groups, deformable_groups, allow_hf32)
        (out_h, out_w), stride_p, padding_p, dilation_p = self._check_deform_conv(fn, *args)
        # The backward sums each tap's per-channel offset gradients in at most 8 vector repeats of 64.
        _require(x.shape[3] <= 512, fn, f"Cin = {x.shape[3]} > 512")
        shapes = (tuple(x.shape), tuple(offset.shape), tuple(weight.shape))
        _require(self._columns.get(columns.data_ptr()) == shapes, fn, "im2col buffer is not this forward's")
        expected = (x.shape[0], out_h, weight.shape[0], out_w)
        _require_tensor(grad_out, fn, "grad_out (N, Ho, Cout, Wo)", torch.float32, 4)
        _require(tuple(grad_out.shape) == expected, fn, f"grad_out {tuple(grad_out.shape)} != {expected}")
        with torch.enable_grad():
            leaves = [t.permute(0, 3, 1, 2).detach().requires_grad_() for t in (x, offset, weight)]
            out = _deform_conv2d_grid_sample(*leaves[:3], None, stride_p, padding_p, dilation_p, groups, 1)
            grads = torch.autograd.grad(out, leaves, grad_out.permute(0, 2, 1, 3))
        grad_x, grad_offset, grad_weight = (g.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for g in grads)
        return grad_x, grad_weight, grad_offset


def _custom_fwd(fwd: Callable[..., Any] | None = None, *, cast_inputs: torch.dtype | None = None) -> Any:
    """``torch.npu.amp.custom_fwd``: inside an NPU autocast region torch_npu casts the floating-point tensor
    arguments to ``cast_inputs`` and runs the forward with autocast off. No NPU autocast region exists on a
    CPU, so the forward runs on its arguments as given (torch_npu's behaviour outside autocast)."""
    if fwd is None:
        return functools.partial(_custom_fwd, cast_inputs=cast_inputs)
    return fwd


def _custom_bwd(bwd: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.npu.amp.custom_bwd``: runs the backward in the forward's autocast state (here: none)."""
    return bwd


def _npu_standin() -> ModuleType:
    """``torch.npu`` as far as the three wrappers use it: ``amp.custom_fwd/custom_bwd`` and
    ``conv.allow_hf32`` (True: torch_npu's default)."""
    npu = ModuleType("torch.npu", "Stand-in for torch_npu's torch.npu (tests only).")
    npu.__path__ = []  # a package with nothing on disk: submodules come from sys.modules or not at all
    amp = ModuleType("torch.npu.amp")
    amp.custom_fwd = _custom_fwd
    amp.custom_bwd = _custom_bwd
    npu.amp = amp
    npu.conv = SimpleNamespace(allow_hf32=True)
    return npu


class _TorchWithNpu(ModuleType):
    """The real ``torch`` module as one wrapper module sees it, plus ``npu``; the real module is untouched."""

    def __init__(self, npu: ModuleType) -> None:
        super().__init__("torch")
        self.npu = npu

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@dataclass
class LoadedMxDriving:
    """The result of :func:`load_mx_driving`.

    Attributes:
        package: what ``import mx_driving`` returns while loaded: the three wrapper functions under the names
            the real package exports (``bev_pool_v3``, ``multi_scale_deformable_attn``, ``deform_conv2d``).
        wrappers: the executed wrapper modules by those names.
        kernels: the ``mx_driving._C`` stand-in; ``kernels.calls`` counts kernel calls.
        version: the installed mx-driving version.
    """

    package: ModuleType
    wrappers: dict[str, ModuleType]
    kernels: KernelStandIn
    version: str


_ABSENT = object()


@contextlib.contextmanager
def load_mx_driving() -> Iterator[LoadedMxDriving]:
    """Execute the installed wheel's wrapper files against :class:`KernelStandIn` (see the module docstring).

    Every ``sys.modules`` entry it sets is restored to its previous state on exit.
    """
    dist = importlib.metadata.distribution(DISTRIBUTION)
    kernels = KernelStandIn()
    npu = _npu_standin()
    package = ModuleType("mx_driving", "Stand-in package around mx_driving's real wrapper files (tests only).")
    package.__path__ = []
    ops = ModuleType("mx_driving.ops")
    ops.__path__ = []
    package._C = kernels.module()
    package.ops = ops
    entries: dict[str, ModuleType] = {
        "mx_driving": package,
        "mx_driving._C": package._C,
        "mx_driving.ops": ops,
        "torch.npu": npu,
        "torch.npu.amp": npu.amp,
    }
    names = list(entries) + [f"mx_driving.ops.{name}" for name in WRAPPER_FILES]
    saved = {name: sys.modules.get(name, _ABSENT) for name in names}
    try:
        sys.modules.update(entries)
        wrappers = {}
        for name, relative in WRAPPER_FILES.items():
            full_name = f"mx_driving.ops.{name}"
            spec = importlib.util.spec_from_file_location(full_name, str(dist.locate_file(relative)))
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[full_name] = module
            spec.loader.exec_module(module)
            module.torch = _TorchWithNpu(npu)
            setattr(ops, name, module)
            setattr(package, name, getattr(module, name))
            wrappers[name] = module
        yield LoadedMxDriving(package=package, wrappers=wrappers, kernels=kernels, version=dist.version)
    finally:
        for name, previous in saved.items():
            if previous is _ABSENT:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def route_cpu_tensors_to_mx_driving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make bevnext's dispatch treat CPU tensors as it treats NPU tensors: import ``mx_driving`` (whatever
    ``sys.modules`` holds under that name) and take its fast paths. Undone by ``monkeypatch``."""
    monkeypatch.setattr(_dispatch, "_MODULE_FOR_DEVICE", {"cpu": "mx_driving"})
    monkeypatch.setattr(_dispatch, "_import_cache", {})
    monkeypatch.setattr(_dispatch, "_warned", set())
    monkeypatch.delenv("BEVNEXT_OPS", raising=False)
