"""Building blocks shared by several model modules (what ``timm.layers`` is to timm's models).

* :class:`ConvBNReLU` — a conv, optionally followed by BatchNorm and ReLU, registered as ``conv``/``bn``/``relu``
  (the reference's ``ConvModule`` key names). Being an ``nn.Sequential`` it can also be unpacked into a larger
  Sequential where the reference numbers the layers instead (``conv.0``, ``conv.1``, ...).
* :class:`BasicBlock` — the ResNet-18/34 residual block, used by the image backbone and the BEV ResNet.
* :func:`maybe_checkpoint` — activation checkpointing of one module, switched by the caller.
* :func:`check_config` — raise :class:`~bevnext.errors.ConfigError` for an invalid constructor argument.

Nothing here initialises weights beyond PyTorch's defaults: each caller applies the reference's init of its own
module, in the same order as before, so seeded construction gives the same weights.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from bevnext.errors import ConfigError

__all__ = ["BasicBlock", "ConvBNReLU", "check_config", "maybe_checkpoint"]


def check_config(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition`` holds.

    Constructors validate their arguments with it so that a bad config fails when the model is built, naming
    the argument, instead of deep inside a forward.
    """
    if not condition:
        raise ConfigError(message)


class ConvBNReLU(nn.Sequential):
    """``kxk`` conv ('same' padding at stride 1) -> BatchNorm -> ReLU; BN and ReLU can be left out.

    State-dict keys: ``conv.weight`` (+ ``conv.bias``), ``bn.*``. To get the reference's flat numbering inside
    a larger ``nn.Sequential``, unpack it: ``nn.Sequential(*ConvBNReLU(a, b), *ConvBNReLU(b, b))`` registers
    ``0`` (conv), ``1`` (bn), ``2`` (relu), ``3``, ... The convolution keeps PyTorch's default init.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size.
        stride: convolution stride.
        dilation: convolution dilation; the padding ``dilation * (kernel_size // 2)`` keeps the size at stride 1.
        bias: give the convolution a bias (useless before BN, hence off by default).
        bn: append ``BatchNorm2d(out_channels)`` as ``bn``.
        relu: append an in-place ``ReLU`` as ``relu``.
    """

    conv: nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = False,
        bn: bool = True,
        relu: bool = True,
    ) -> None:
        check_config(
            in_channels >= 1 and out_channels >= 1,
            f"ConvBNReLU: channels must be >= 1, got {in_channels} -> {out_channels}",
        )
        check_config(
            kernel_size >= 1 and kernel_size % 2 == 1, f"ConvBNReLU: kernel_size must be odd, got {kernel_size}"
        )
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv"] = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            bias=bias,
        )
        if bn:
            layers["bn"] = nn.BatchNorm2d(out_channels)
        if relu:
            layers["relu"] = nn.ReLU(inplace=True)
        super().__init__(layers)


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 conv (strided) -> BN -> ReLU -> 3x3 conv -> BN, + shortcut, ReLU.

    The block of ResNet-18/34 (image backbone, ``expansion`` 1) and of the BEV ResNet. Both convs have no bias;
    weights keep PyTorch's default init (the backbone re-initialises its own).

    Args:
        in_channels: input channels.
        out_channels: channels of both convs and of the output.
        stride: stride of the first 3x3 convolution.
        downsample: shortcut module, or None for the identity (then ``stride`` must be 1 and the channel counts
            equal).
    """

    expansion = 1
    """Output channels per ``out_channels`` (the ResNet builder's name for it; 4 for a bottleneck)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        check_config(
            downsample is not None or (stride == 1 and in_channels == out_channels),
            "BasicBlock: an identity shortcut needs stride 1 and in_channels == out_channels",
        )
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: (B, in_channels, H, W).

        Returns:
            (B, out_channels, ceil(H / stride), ceil(W / stride)).
        """
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def maybe_checkpoint(module: nn.Module, x: Tensor, enabled: bool) -> Tensor:
    """``module(x)``, with activation checkpointing when ``enabled``.

    Checkpointed, only ``x`` is kept and the forward is re-run in the backward (non-reentrant
    ``torch.utils.checkpoint``; the re-run sees the same RNG state, so dropout masks repeat). The caller decides
    when it pays off, typically ``with_cp and x.requires_grad`` or ``with_cp and torch.is_grad_enabled()``.

    The re-run is a second forward in train mode, so a bare checkpoint would update BatchNorm running
    statistics (and ``num_batches_tracked``) twice; here the re-run leaves them untouched, so they end up
    exactly as without checkpointing (the reference's recompute updated them twice).

    Args:
        module: any module taking one tensor.
        x: its input, (B, ...).
        enabled: checkpoint; when False this is just ``module(x)``.

    Returns:
        ``module(x)``.
    """
    if not enabled:
        return module(x)
    calls = 0

    def run(inp: Tensor) -> Tensor:
        # The first call is the forward; any later one is the backward's re-run.
        nonlocal calls
        calls += 1
        if calls == 1:
            return module(inp)
        with _FrozenRunningStats(module):
            return module(inp)

    return checkpoint(run, x, use_reentrant=False)


class _FrozenRunningStats:
    """Context: BatchNorm layers in train mode still normalise with batch statistics, but their running
    statistics and ``num_batches_tracked`` come out unchanged.

    Momentum 0 makes the running-stat update ``r <- 1 * r + 0 * batch`` (exact), and the counter is restored on
    exit. Switching ``track_running_stats`` off instead would change which tensors the BN op saves, which the
    non-reentrant checkpoint rejects.
    """

    def __init__(self, module: nn.Module) -> None:
        self.layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        self.saved: list[tuple[float | None, Tensor | None]] = []

    def __enter__(self) -> None:
        self.saved = []
        for m in self.layers:
            counter = m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
            self.saved.append((m.momentum, counter))
            m.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for m, (momentum, counter) in zip(self.layers, self.saved):
                m.momentum = momentum
                if counter is not None:
                    m.num_batches_tracked.copy_(counter)
