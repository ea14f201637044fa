"""Deformable convolution v1 (no modulation mask), as mmcv's ``DeformConv2d`` / ``DCN``.

Output at position ``p`` (an output pixel, mapped to its input window origin ``p0 = p * stride - padding``)::

    out[b, o, p] = bias[o] + sum_{c in group(o)} sum_{k=(i, j)} W[o, c, i, j] * x_bilinear[b, c, p0 + d*(i, j) + Δ_k(p)]

``Δ_k(p) = (Δy, Δx)`` comes from the ``offset`` tensor, in input pixels. Offset channel layout (mmcv's, and
the one the reference checkpoint's ``conv_offset`` was trained with): for deformable group ``g`` and kernel
tap ``k = i * kw + j`` (row-major over the kernel window), channel ``2 * (g * kh * kw + k)`` holds ``Δy``
(rows) and the next channel holds ``Δx`` (columns). Input channels are split into ``deform_groups``
contiguous blocks, each moved by its own offsets. Bilinear samples read zeros outside the input.

Paths (chosen per call, see ``bevnext.ops._dispatch``):
* NPU: ``mx_driving.deform_conv2d`` when its constraints hold (see
  :func:`deform_conv2d_fast_path_unsupported`): one kernel call with the convolution's ``groups`` (the
  wrapper passes them to the kernel, which loops over them), and a bias added outside the kernel (the
  wrapper accepts ``bias`` but never uses it). Its offset layout is mmcv's (the kernel takes even offset
  channels as Δy and odd ones as Δx, taps row-major).
* CUDA: ``torchvision.ops.deform_conv2d`` (same offset layout; verified against a loop oracle in the tests).
* CPU, anything else, ``BEVNEXT_OPS=reference``, or when torchvision has no kernel for the device/dtype: a
  pure-PyTorch version built on ``F.grid_sample``. On CPU it is the faster one: torchvision's CPU kernel takes
  several times longer forward + backward at the depth net's shapes (``bevnext bench deform-conv``). With
  gradients it keeps only its inputs for the backward and samples the columns again there, as torchvision's
  kernel does, so that it adds nothing to a training step's peak memory.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torch.utils.checkpoint import checkpoint

from bevnext.ops._dispatch import fast_module, reference_forced, warn_once

__all__ = ["DeformConv2dPack", "deform_conv2d", "deform_conv2d_fast_path_unsupported"]

_OP = "deform_conv2d"
# mx_driving.deform_conv2d (mx-driving 26.2.0.post2): the kernel walks the input channels in 64-wide vector
# repeats (documented: Cin a multiple of 64), copies each group's im2col columns in 8-float blocks, and its
# backward reduces the per-channel offset gradients with at most 8 repeats (Cin <= 512).
_MX_CIN_MULTIPLE = 64
_MX_CIN_PER_GROUP_MULTIPLE = 8
_MX_MAX_CIN = 512
# Devices on which torchvision's deform_conv2d kernel runs (its CPU kernel is slower than the grid_sample version).
_TORCHVISION_DEVICES = ("cuda",)

IntPair = int | tuple[int, int]


def deform_conv2d_fast_path_unsupported(
    in_channels: int, groups: int, deform_groups: int, dtype: torch.dtype
) -> str | None:
    """Why ``mx_driving.deform_conv2d`` cannot run this convolution, or None when it can.

    mx-driving 26.2.0.post2's wrapper (``mx_driving/ops/deform_conv2d.py``) hands ``groups`` and
    ``deformable_groups`` to the kernel as they are and computes no bias. The constraints:

    * ``deform_groups == 1`` (documented; the kernel reads one (Δy, Δx) pair per tap and output pixel);
    * fp32 (documented; the op-info lists float32 only);
    * ``Cin`` a multiple of 64 (documented; channels past the last full 64 would be dropped silently);
    * ``Cin / groups`` a multiple of 8 (the kernel copies each group's columns in blocks of 8 floats);
    * ``Cin <= 512`` (the backward's per-tap offset-gradient reduction holds at most 8 partial sums).

    Args:
        in_channels: input channels ``Cin`` of the convolution.
        groups: convolution groups.
        deform_groups: deformable (offset) groups.
        dtype: dtype of the input.

    Returns:
        A human-readable reason, or None when the fast path may be used.
    """
    if deform_groups != 1:
        return f"deform_groups = {deform_groups} != 1"
    if dtype != torch.float32:
        return f"dtype {dtype} is not float32"
    if in_channels % _MX_CIN_MULTIPLE != 0:
        return f"input channels = {in_channels} is not a multiple of {_MX_CIN_MULTIPLE}"
    if in_channels > _MX_MAX_CIN:
        return f"input channels = {in_channels} exceed {_MX_MAX_CIN}"
    per_group = in_channels // groups
    if per_group % _MX_CIN_PER_GROUP_MULTIPLE != 0:
        return f"input channels per group = {per_group} is not a multiple of {_MX_CIN_PER_GROUP_MULTIPLE}"
    return None


def deform_conv2d(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 1,
    dilation: IntPair = 1,
    groups: int = 1,
    deform_groups: int = 1,
) -> Tensor:
    """Deformable convolution v1 (mmcv ``DeformConv2d`` semantics, offsets in input pixels).

    Args:
        x: (B, Cin, H, W) input.
        offset: (B, 2 * deform_groups * kh * kw, Ho, Wo) per-tap ``(Δy, Δx)`` pairs, interleaved as
            described in the module docstring.
        weight: (Cout, Cin / groups, kh, kw).
        bias: optional (Cout,).
        stride: int or (sh, sw).
        padding: int or (ph, pw) zero padding.
        dilation: int or (dh, dw).
        groups: convolution groups (Cin and Cout divisible by it).
        deform_groups: offset groups (Cin divisible by it).

    Returns:
        (B, Cout, Ho, Wo) with ``Ho = (H + 2 ph - dh (kh - 1) - 1) // sh + 1`` (likewise Wo).
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    _check_shapes(x, offset, weight, bias, stride, padding, dilation, groups, deform_groups)
    if x.numel() == 0 or offset.numel() == 0:
        # Nothing to sample (kernels and older torch versions reject empty inputs). The result stays attached
        # to the inputs' graph so that a loss over an empty batch still backpropagates (zero gradients).
        anchor = x.sum() + offset.sum() + weight.sum()
        out = x.new_zeros((x.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])) + 0 * anchor.to(x.dtype)
        # Every tap of an empty input reads zero padding, so a non-empty output (only possible when the input
        # has no channels or no pixels) is just the bias.
        return out if bias is None else out + bias.to(x.dtype).view(1, -1, 1, 1)

    device_type = x.device.type
    fast = fast_module(_OP, device_type)
    if fast is not None:
        reason = deform_conv2d_fast_path_unsupported(x.shape[1], groups, deform_groups, x.dtype)
        if reason is None:
            return _deform_conv2d_mx(fast, x, offset, weight, bias, stride, padding, dilation, groups)
        warn_once(_OP, f"mx_driving kernel not applicable ({reason}); using the PyTorch reference")

    if device_type in _TORCHVISION_DEVICES and not reference_forced():
        try:
            from torchvision.ops import deform_conv2d as tv_deform_conv2d

            # torchvision infers groups from weight.shape[1] and deform groups from offset.shape[1].
            return tv_deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation)
        except (ImportError, NotImplementedError, RuntimeError) as err:
            # Shapes were validated above, so a failure here means "no kernel for this device/dtype".
            warn_once(_OP, f"torchvision deform_conv2d unavailable ({type(err).__name__}: {err}); using grid_sample")
    elif device_type != "cpu" and not reference_forced():
        warn_once(_OP, f"no deformable-conv kernel for device {device_type!r}; using the grid_sample reference")
    return _deform_conv2d_grid_sample(x, offset, weight, bias, stride, padding, dilation, groups, deform_groups)


def _check_shapes(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    deform_groups: int,
) -> None:
    """Raise ValueError for inconsistent shapes (kernels report these far less readably)."""
    if x.dim() != 4 or offset.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"expected 4-D x, offset, weight; got {x.dim()}, {offset.dim()}, {weight.dim()}")
    batch, in_ch, height, width = x.shape
    out_ch, in_per_group, kh, kw = weight.shape
    if groups < 1 or in_ch % groups or out_ch % groups or in_per_group * groups != in_ch:
        raise ValueError(f"weight {tuple(weight.shape)} does not match Cin={in_ch} with groups={groups}")
    if deform_groups < 1 or in_ch % deform_groups:
        raise ValueError(f"Cin={in_ch} is not divisible by deform_groups={deform_groups}")
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    expected = (batch, 2 * deform_groups * kh * kw, out_h, out_w)
    if tuple(offset.shape) != expected:
        raise ValueError(f"offset shape {tuple(offset.shape)} != expected {expected}")
    if bias is not None and tuple(bias.shape) != (out_ch,):
        raise ValueError(f"bias shape {tuple(bias.shape)} != ({out_ch},)")


def _deform_conv2d_mx(
    mx_driving: ModuleType,
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> Tensor:
    """mx_driving kernel: x (B, Cin, H, W), offset (B, 2*kh*kw, Ho, Wo), weight (Cout, Cin/groups, kh, kw).

    Returns (B, Cout, Ho, Wo). The wrapper's signature is ``(x, offset, weight, stride, padding, dilation,
    groups, deformable_groups)``; it permutes all three tensors to channels-last copies itself, so any layout
    may be passed. The bias is added here because the wrapper ignores its ``bias`` argument.
    """
    out = mx_driving.deform_conv2d(x, offset, weight, stride, padding, dilation, groups, 1)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _deform_conv2d_grid_sample(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    deform_groups: int,
    *,
    keep_columns: bool = False,
) -> Tensor:
    """Portable reference: bilinear im2col with ``F.grid_sample`` then a grouped matmul.

    Memory: the (B, Cin, kh*kw, Ho*Wo) column tensor is materialised. With gradients only the inputs are kept
    for the backward, which samples the columns again (as torchvision's kernel does): they are the op's largest
    tensor (156 MB per stage-2 camera set) and would otherwise stay until the backward. ``keep_columns=True``
    (the recomputation's own call) keeps them.
    """
    args = (x, offset, weight, bias, stride, padding, dilation, groups, deform_groups)
    if not keep_columns and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:4]):
        return checkpoint(_deform_conv2d_grid_sample, *args, keep_columns=True, use_reentrant=False)
    batch, in_ch, height, width = x.shape
    out_ch, in_per_group, kh, kw = weight.shape
    _, _, out_h, out_w = offset.shape
    taps = kh * kw
    dtype = torch.promote_types(x.dtype, offset.dtype)

    # Undeformed sampling positions (input pixel coordinates) of every tap at every output pixel.
    rows = torch.arange(out_h, device=x.device, dtype=dtype) * stride[0] - padding[0]
    cols = torch.arange(out_w, device=x.device, dtype=dtype) * stride[1] - padding[1]
    tap_rows = torch.arange(kh, device=x.device, dtype=dtype).repeat_interleave(kw) * dilation[0]
    tap_cols = torch.arange(kw, device=x.device, dtype=dtype).repeat(kh) * dilation[1]
    base_y = tap_rows.view(taps, 1, 1) + rows.view(1, out_h, 1)  # (K, Ho, 1)
    base_x = tap_cols.view(taps, 1, 1) + cols.view(1, 1, out_w)  # (K, 1, Wo)

    # (B, 2*dg*K, Ho, Wo) -> (B, dg, K, 2, Ho, Wo); index 0 of the pair is Δy, index 1 is Δx.
    delta = offset.to(dtype).view(batch, deform_groups, taps, 2, out_h, out_w)
    pos_y = base_y + delta[:, :, :, 0]  # (B, dg, K, Ho, Wo)
    pos_x = base_x + delta[:, :, :, 1]
    # grid_sample's normalised coordinates with align_corners=False: pixel centre c -> (2c + 1) / size - 1.
    grid = torch.stack(((2 * pos_x + 1) / width - 1, (2 * pos_y + 1) / height - 1), dim=-1)
    grid = grid.view(batch * deform_groups, taps, out_h * out_w, 2)

    # Each deformable group moves its own contiguous block of input channels.
    x_groups = x.to(dtype).reshape(batch * deform_groups, in_ch // deform_groups, height, width)
    columns = F.grid_sample(x_groups, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # (B*dg, Cin/dg, K, Ho*Wo) -> (B, groups, Cin/groups * K, Ho*Wo): channel-major then tap, which is
    # the flattening order of weight[o].view(-1).
    columns = columns.reshape(batch, groups, in_per_group * taps, out_h * out_w)
    w = weight.to(dtype).reshape(groups, out_ch // groups, in_per_group * taps)
    out = torch.matmul(w.unsqueeze(0), columns)  # (B, groups, Cout/groups, Ho*Wo)
    out = out.reshape(batch, out_ch, out_h, out_w)
    if bias is not None:
        out = out + bias.to(dtype).view(1, -1, 1, 1)
    return out.to(x.dtype)


class DeformConv2dPack(nn.Module):
    """Deformable conv v1 whose offsets are predicted from its own input (mmcv's ``DCN``).

    State-dict names match the reference checkpoint: ``weight`` (Cout, Cin/groups, k, k), optional
    ``bias`` (Cout,), ``conv_offset.weight`` (2*dg*k*k, Cin, k, k) and ``conv_offset.bias`` (2*dg*k*k,).
    The offset conv uses the same kernel size, stride, padding and dilation as the deformable conv (so its
    output grid is the output grid) and is zero-initialised: at initialisation the layer is an ordinary
    (grouped) convolution.

    Args:
        in_channels: Cin.
        out_channels: Cout.
        kernel_size: square kernel size k.
        stride: convolution stride.
        padding: zero padding.
        groups: convolution groups.
        deform_groups: offset groups.
        bias: whether the deformable conv has a bias (the reference's DCN has none).
        dilation: kernel dilation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
        if in_channels % deform_groups:
            raise ValueError(f"in_channels={in_channels} not divisible by deform_groups={deform_groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.deform_groups = deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.conv_offset = nn.Conv2d(
            in_channels,
            2 * deform_groups * kernel_size * kernel_size,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=True,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference init: weight ~ U(±1/sqrt(Cin * k * k)) (mmcv counts all input channels, not per
        group), bias 0, offset conv all zeros."""
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size * self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, Cin, H, W) -> (B, Cout, Ho, Wo)."""
        offset = self.conv_offset(x)
        return deform_conv2d(
            x,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            deform_groups=self.deform_groups,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"deform_groups={self.deform_groups}, bias={self.bias is not None}"
        )
