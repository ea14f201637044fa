"""Image neck: a feature pyramid reduced to its finest level (the reference's ``CustomFPN`` with one output).

Every backbone level gets a 1x1 lateral conv; coarser levels are added top-down into finer ones after
nearest-neighbour resizing; only the finest level is kept and passed through one 3x3 conv. No normalisation and no
activation anywhere (all convs have a bias), Xavier-uniform init. State-dict names follow the reference
(``lateral_convs.{i}.conv.*``, ``fpn_convs.0.conv.*``): each conv is a ``ConvBNReLU`` with BN and ReLU left out,
which holds it under the name ``conv``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from bevnext.errors import ConfigError
from bevnext.models.blocks import ConvBNReLU

__all__ = ["CustomFPN"]


def _plain_conv(in_channels: int, out_channels: int, kernel_size: int) -> ConvBNReLU:
    """A 'same'-padded conv with bias and nothing after it, under the name ``conv`` (the reference's keys)."""
    return ConvBNReLU(in_channels, out_channels, kernel_size, bias=True, bn=False, relu=False)


class CustomFPN(nn.Module):
    """Top-down pyramid fusion that outputs the finest level only.

    Args:
        in_channels: channels of the input levels, finest first (ResNet-50 stages 1..3: 512, 1024, 2048).
        out_channels: channels of the laterals and of the output.
    """

    def __init__(self, in_channels: Sequence[int] = (512, 1024, 2048), out_channels: int = 512) -> None:
        super().__init__()
        in_channels = tuple(int(c) for c in in_channels)
        if not in_channels or min(in_channels) < 1:
            raise ConfigError(f"in_channels must be a non-empty list of positive channel counts, got {in_channels}")
        if out_channels < 1:
            raise ConfigError(f"out_channels must be positive, got {out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(_plain_conv(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList([_plain_conv(out_channels, out_channels, 3)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Fuse the pyramid.

        Args:
            feats: ``len(in_channels)`` tensors (B, in_channels[i], H_i, W_i), finest first.

        Returns:
            (B, out_channels, H_0, W_0).
        """
        if len(feats) != len(self.lateral_convs):
            raise ValueError(f"expected {len(self.lateral_convs)} feature levels, got {len(feats)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            # Resize to the finer level's exact size (not a fixed x2) so odd sizes work.
            coarse = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + coarse
        return self.fpn_convs[0](laterals[0])
