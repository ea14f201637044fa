"""BEV-side networks between the view transformer and the heads (reference §2.4–§2.6).

All maps here are BEV feature maps ``(B, C, H, W)`` on the key-ego BEV grid as produced by the view transformer
(reference: 128 x 128 cells of 0.8 m); strides below are relative to that grid.

* ``BEVResNet`` — a ResNet of BasicBlocks (the reference's ``CustomResNet``). Used as ``pre_process_net`` (one
  stride-1 stage, applied to every frame's BEV) and as the stage-1 BEV encoder backbone (three stride-2 stages).
* ``FPNLSS`` — the BEV neck: fuses the stride-2 and stride-8 backbone outputs and upsamples back to the full grid.

The stage-2 BEV encoder backbone, ``Res2Fusion``, is in ``bevnext.models.res2fusion``.

State-dict names and shapes equal the reference checkpoint's, so reference weights load without a key map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevnext.models.blocks import BasicBlock, ConvBNReLU, check_config, maybe_checkpoint

__all__ = ["BEVResNet", "FPNLSS"]


class BEVResNet(nn.Module):
    """ResNet of BasicBlocks over a BEV map, returning every stage's output (the reference's ``CustomResNet``).

    The first block of every stage has a shortcut that is a plain 3x3 convolution (with bias, no BN) with the
    stage's stride — even when stride is 1 and the channel count does not change (``pre_process_net``), as in the
    reference.

    Args:
        in_channels: input channels.
        num_layers: BasicBlocks per stage.
        strides: stride of each stage (applied by its first block).
        channels: output channels of each stage.
        with_cp: activation checkpointing of each stage while gradients are enabled (saves memory, costs one extra
            forward). Outputs, gradients and BatchNorm running statistics are those of the plain forward (see
            ``bevnext.models.blocks.maybe_checkpoint``).
    """

    def __init__(
        self,
        in_channels: int,
        num_layers: Sequence[int],
        strides: Sequence[int],
        channels: Sequence[int],
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        check_config(in_channels >= 1, f"BEVResNet: in_channels must be >= 1, got {in_channels}")
        check_config(len(num_layers) >= 1, "BEVResNet: num_layers must name at least one stage")
        check_config(
            len(strides) == len(num_layers) and len(channels) == len(num_layers),
            f"BEVResNet: num_layers ({len(num_layers)}), strides ({len(strides)}) and channels ({len(channels)}) "
            "must have the same length",
        )
        for i, (blocks, stride, out) in enumerate(zip(num_layers, strides, channels, strict=True)):
            check_config(blocks >= 1, f"BEVResNet: num_layers[{i}] must be >= 1, got {blocks}")
            check_config(stride >= 1, f"BEVResNet: strides[{i}] must be >= 1, got {stride}")
            check_config(out >= 1, f"BEVResNet: channels[{i}] must be >= 1, got {out}")
        self.in_channels = in_channels
        self.with_cp = with_cp

        stages = []
        prev = in_channels
        for blocks, stride, out in zip(num_layers, strides, channels, strict=True):
            shortcut = nn.Conv2d(prev, out, 3, stride=stride, padding=1)
            stage = [BasicBlock(prev, out, stride, shortcut)]
            stage += [BasicBlock(out, out) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            prev = out
        self.layers = nn.Sequential(*stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Run all stages.

        Args:
            x: (B, in_channels, H, W) BEV features.

        Returns:
            One map per stage, (B, channels[i], H_i, W_i) with ``H_i = ceil(H_{i-1} / strides[i])``. For
            ``pre_process_net`` this is a one-element list.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"BEVResNet expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        feats = []
        use_cp = self.with_cp and torch.is_grad_enabled()
        for stage in self.layers:
            x = maybe_checkpoint(stage, x, use_cp)
            feats.append(x)
        return feats


class FPNLSS(nn.Module):
    """BEV neck of LSS/BEVDet (``FPN_LSS``): fuse a fine and a coarse level, then upsample.

    ``x = cat([fine, up(coarse)])`` where ``fine = feats[input_feature_index[0]]``, ``coarse =
    feats[input_feature_index[1]]`` and ``up`` is bilinear (``align_corners=True``) by ``scale_factor``; then
    3x3 conv → BN → ReLU → 3x3 conv → BN → ReLU (``2·out_channels`` wide when ``extra_upsample`` is set, else
    ``out_channels``); then, with ``extra_upsample``, bilinear ×``extra_upsample`` (``align_corners=True``) →
    3x3 conv → BN → ReLU → 1x1 conv (with bias) to ``out_channels``.

    The concatenation puts the fine level first (the reference's order; its config writes the channel sum as
    ``8C + 2C``, but the first input channels of ``conv.0`` are the fine level's).

    Args:
        in_channels: channels of fine + coarse levels (reference: 2C + 8C = 800 / 1600).
        out_channels: output channels (256).
        scale_factor: upsampling of the coarse level onto the fine one (4: stride 8 → stride 2).
        input_feature_index: (fine, coarse) indices into the backbone outputs.
        extra_upsample: final upsampling factor (2: stride 2 → the full BEV grid), or None for none.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        scale_factor: int = 4,
        input_feature_index: tuple[int, int] = (0, 2),
        extra_upsample: int | None = 2,
    ) -> None:
        super().__init__()
        check_config(in_channels >= 1, f"FPNLSS: in_channels must be >= 1, got {in_channels}")
        check_config(out_channels >= 1, f"FPNLSS: out_channels must be >= 1, got {out_channels}")
        check_config(scale_factor >= 1, f"FPNLSS: scale_factor must be >= 1, got {scale_factor}")
        check_config(
            len(input_feature_index) == 2,
            f"FPNLSS: input_feature_index must be (fine, coarse), got {input_feature_index}",
        )
        check_config(
            extra_upsample is None or extra_upsample >= 1,
            f"FPNLSS: extra_upsample must be >= 1 or None, got {extra_upsample}",
        )
        self.in_channels = in_channels
        self.scale_factor = scale_factor
        self.input_feature_index = tuple(input_feature_index)
        self.extra_upsample = extra_upsample

        mid = out_channels * 2 if extra_upsample is not None else out_channels
        # The units are unpacked: the reference numbers these layers flat (conv.0 = conv, conv.1 = BN, conv.3, ...).
        self.conv = nn.Sequential(*ConvBNReLU(in_channels, mid, 3), *ConvBNReLU(mid, mid, 3))
        self.up2: nn.Sequential | None = None
        if extra_upsample is not None:
            self.up2 = nn.Sequential(
                nn.Upsample(scale_factor=extra_upsample, mode="bilinear", align_corners=True),
                *ConvBNReLU(mid, out_channels, 3),
                nn.Conv2d(out_channels, out_channels, 1),
            )

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Fuse and upsample.

        Args:
            feats: backbone outputs; the fine level (B, C_f, H, W) and coarse level
                (B, C_c, H / scale_factor, W / scale_factor) are picked by ``input_feature_index``, with
                ``C_f + C_c == in_channels``.

        Returns:
            (B, out_channels, H·extra_upsample, W·extra_upsample) — (B, 256, 128, 128) for the reference.
        """
        fine = feats[self.input_feature_index[0]]
        coarse = feats[self.input_feature_index[1]]
        if fine.shape[1] + coarse.shape[1] != self.in_channels:
            raise ValueError(
                f"FPNLSS expects fine + coarse channels = {self.in_channels}, got {fine.shape[1]} + {coarse.shape[1]}"
            )
        coarse = F.interpolate(coarse, scale_factor=self.scale_factor, mode="bilinear", align_corners=True)
        if coarse.shape[-2:] != fine.shape[-2:]:
            raise ValueError(
                f"FPNLSS: coarse level upsampled x{self.scale_factor} is {tuple(coarse.shape[-2:])}, "
                f"fine level is {tuple(fine.shape[-2:])}"
            )
        x = self.conv(torch.cat([fine, coarse], dim=1))
        if self.up2 is not None:
            x = self.up2(x)
        return x
