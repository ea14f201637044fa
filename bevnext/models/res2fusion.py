"""Stage-2 BEV encoder backbone: long-term temporal fusion followed by a Res2Net trunk (reference §2.5).

``Res2Fusion`` takes the channel-concatenated BEV maps of all frames, ``(B, C·F, H, W)`` — frame-major blocks of
``C`` channels, key frame first (block ``f`` holds frame ``t − f``), all in the key ego frame on the BEV grid
(rows = y cells, columns = x cells, as produced by the view transformer) — and returns three feature maps at
strides 2, 4 and 8 of the input grid.

1. ``FusionLayer`` squeezes the ``C·F`` channels to ``C``. A grouped 1x1 convolution gives every group of
   ``F / scales`` consecutive frames its own slice of the hidden width; the slices then pass through a Res2Net-style
   hierarchy **oldest group first**, so the oldest frames go through the most 3x3 convolutions (the largest
   receptive field, to cover the larger displacement of old observations) and the newest group none.
2. Three ``Res2Layer`` stages of ``Bottle2neck`` blocks (Res2Net bottlenecks), each halving the resolution.

State-dict names and shapes equal the reference checkpoint's (``layers.{i}.0.{j}.…``, ``fusion_layer.…``); the
extra ``.0`` level exists only for that compatibility.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bevnext.models.blocks import check_config, maybe_checkpoint

__all__ = ["Bottle2neck", "FusionLayer", "Res2Fusion", "Res2Layer"]

# Res2Net's width rule: width = floor(mid_channels * base_width / _BASE_CHANNELS).
_BASE_CHANNELS = 64


def _res2_width(name: str, out_channels: int, expansion: int, base_width: int) -> int:
    """Channels of one Res2Net scale: ``floor((out_channels / expansion) * base_width / 64)``."""
    check_config(expansion >= 1, f"{name}: expansion must be >= 1, got {expansion}")
    check_config(base_width >= 1, f"{name}: base_width must be >= 1, got {base_width}")
    check_config(
        out_channels % expansion == 0,
        f"{name}: out_channels ({out_channels}) must be divisible by expansion ({expansion})",
    )
    width = (out_channels // expansion) * base_width // _BASE_CHANNELS
    check_config(
        width >= 1,
        f"{name}: per-scale width floor({out_channels}/{expansion}*{base_width}/64) is 0; "
        "raise out_channels or base_width",
    )
    return width


class FusionLayer(nn.Module):
    """Grouped temporal fusion of the stacked frame BEVs (``C·F → C``), no residual shortcut.

    With ``S = scales`` and ``w`` the per-scale width: ``conv1`` (1x1, ``groups=S``) maps the ``C·F`` input channels
    to ``S·w``; group ``g`` sees only frames ``[g·F/S, (g+1)·F/S)`` (group 0 holds the key frame). After BN+ReLU the
    ``S`` chunks are taken oldest group first: ``y_0 = ReLU(BN(conv3x3(oldest)))``,
    ``y_i = ReLU(BN(conv3x3(y_{i-1} + chunk_i)))`` for ``i = 1 … S−2``, and the newest chunk passes through
    unchanged. ``[y_0, …, y_{S−2}, newest]`` → 1x1 conv → BN → ReLU.

    Args:
        in_channels: total input channels ``C·F``.
        out_channels: output channels ``C``.
        num_frames: frames ``F`` stacked in the input; must be a multiple of ``scales`` so that each group holds
            whole frames.
        scales: number of frame groups ``S`` (>= 2).
        base_width: Res2Net base width (48 in the reference).
        expansion: ``out_channels / expansion`` is the bottleneck width the per-scale width derives from.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_frames: int,
        scales: int = 3,
        base_width: int = 48,
        expansion: int = 2,
    ) -> None:
        super().__init__()
        check_config(num_frames >= 1, f"FusionLayer: num_frames must be >= 1, got {num_frames}")
        check_config(in_channels >= 1, f"FusionLayer: in_channels must be >= 1, got {in_channels}")
        check_config(out_channels >= 1, f"FusionLayer: out_channels must be >= 1, got {out_channels}")
        check_config(scales >= 2, f"FusionLayer: scales must be >= 2 (one group per scale), got {scales}")
        check_config(
            in_channels % num_frames == 0,
            f"FusionLayer: in_channels ({in_channels}) must be divisible by num_frames ({num_frames})",
        )
        check_config(
            num_frames % scales == 0,
            f"FusionLayer: num_frames ({num_frames}) must be divisible by scales ({scales}) so every group "
            "holds whole frames",
        )
        width = _res2_width("FusionLayer", out_channels, expansion, base_width)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_frames = num_frames
        self.scales = scales
        self.width = width

        # Registration order = reference state-dict order.
        self.conv1 = nn.Conv2d(in_channels, width * scales, 1, groups=scales, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scales)
        self.conv3 = nn.Conv2d(width * scales, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(scales - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scales - 1))

    def forward(self, x: Tensor) -> Tensor:
        """Fuse the frame stack.

        Args:
            x: (B, C·F, H, W) frame BEVs, frame-major, key frame first.

        Returns:
            (B, C, H, W) fused BEV on the same grid.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FusionLayer expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        hidden = self.relu(self.bn1(self.conv1(x)))
        # Chunk g comes from group g (group 0 = newest frames); reverse so the oldest group is processed first.
        chunks = list(torch.split(hidden, self.width, dim=1))[::-1]
        outs = []
        prev: Tensor | None = None
        for i in range(self.scales - 1):
            inp = chunks[i] if prev is None else prev + chunks[i]
            prev = self.relu(self.bns[i](self.convs[i](inp)))
            outs.append(prev)
        outs.append(chunks[-1])  # the newest group: no spatial mixing before the final 1x1
        return self.relu(self.bn3(self.conv3(torch.cat(outs, dim=1))))


class Bottle2neck(nn.Module):
    """Res2Net bottleneck (stride on the 3x3 convolutions), as mmcls's ``Bottle2neck``.

    ``conv1`` (1x1) → ``S`` chunks of ``w`` channels. Chunk 0 → 3x3 conv/BN/ReLU; chunk ``i`` (``1 ≤ i ≤ S−2``) →
    3x3 conv/BN/ReLU of (previous output + chunk ``i``), or of chunk ``i`` alone in a ``stage`` block (the first
    block of a layer, whose strided chunks could not be added). The last chunk is passed through, or 3x3
    average-pooled with the block's stride in a ``stage`` block. Concat → ``conv3`` (1x1) → BN → + shortcut → ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        scales: number of chunks ``S`` (>= 2).
        base_width: Res2Net base width; ``w = floor(out_channels / expansion * base_width / 64)``.
        expansion: bottleneck expansion.
        stride: stride of the 3x3 convolutions (and of the stage block's pooling).
        stage_block: True for the first block of a layer (see above).
        downsample: shortcut module, or None for the identity.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        scales: int = 4,
        base_width: int = 26,
        expansion: int = 4,
        stride: int = 1,
        stage_block: bool = False,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        check_config(scales >= 2, f"Bottle2neck: scales must be >= 2 (scales = 1 is a plain ResNet), got {scales}")
        check_config(stride >= 1, f"Bottle2neck: stride must be >= 1, got {stride}")
        check_config(
            stage_block or stride == 1,
            "Bottle2neck: only a stage block may be strided (the hierarchical add needs equal sizes)",
        )
        width = _res2_width("Bottle2neck", out_channels, expansion, base_width)
        self.scales = scales
        self.width = width
        self.stage_block = stage_block

        # Registration order = reference state-dict order (conv1, bn1, conv3, bn3, downsample, convs, bns).
        self.conv1 = nn.Conv2d(in_channels, width * scales, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scales)
        self.conv3 = nn.Conv2d(width * scales, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        # Only a stage block needs the pooling of its last chunk (count_include_pad left at its default, True).
        self.pool = nn.AvgPool2d(3, stride=stride, padding=1) if stage_block else None
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False) for _ in range(scales - 1)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scales - 1))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: (B, in_channels, H, W).

        Returns:
            (B, out_channels, ceil(H / stride), ceil(W / stride)).
        """
        chunks = torch.split(self.relu(self.bn1(self.conv1(x))), self.width, dim=1)
        outs = []
        prev: Tensor | None = None
        for i in range(self.scales - 1):
            inp = chunks[i] if (prev is None or self.stage_block) else prev + chunks[i]
            prev = self.relu(self.bns[i](self.convs[i](inp)))
            outs.append(prev)
        outs.append(self.pool(chunks[-1]) if self.pool is not None else chunks[-1])
        out = self.bn3(self.conv3(torch.cat(outs, dim=1)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Res2Layer(nn.Sequential):
    """One Res2Net stage: a strided ``stage`` ``Bottle2neck`` followed by ``num_blocks − 1`` normal ones.

    The first block's shortcut (when the stride or the channel count changes) is "avg_down":
    ``AvgPool(stride, ceil_mode, count_include_pad=False)`` → 1x1 conv → BN, so the shortcut averages rather than
    skips pixels.

    Args:
        in_channels: input channels.
        out_channels: output channels of every block.
        num_blocks: blocks in the stage (>= 1).
        scales: Res2Net scales of every block.
        base_width: Res2Net base width of every block.
        expansion: bottleneck expansion of every block.
        stride: stride of the first block.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        scales: int = 4,
        base_width: int = 26,
        expansion: int = 4,
        stride: int = 1,
    ) -> None:
        check_config(num_blocks >= 1, f"Res2Layer: num_blocks must be >= 1, got {num_blocks}")
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                nn.AvgPool2d(stride, stride=stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        blocks = [
            Bottle2neck(in_channels, out_channels, scales, base_width, expansion, stride, True, downsample),
        ]
        blocks += [
            Bottle2neck(out_channels, out_channels, scales, base_width, expansion, 1, False, None)
            for _ in range(num_blocks - 1)
        ]
        super().__init__(*blocks)


class Res2Fusion(nn.Module):
    """Stage-2 BEV encoder backbone: ``FusionLayer`` then three ``Res2Layer`` stages.

    Args:
        in_channels: per-frame BEV channels ``C`` (160); the fusion squeezes ``C·num_frames`` back to ``C``.
        num_frames: frames ``F`` stacked on the channel axis (9 = key + 8 previous key frames).
        channels: output channels of each stage.
        scales: Res2Net scales per stage.
        num_blocks: blocks per stage.
        base_width: Res2Net base width per stage.
        expansion: bottleneck expansion per stage.
        strides: stride of each stage.
        fusion_scales: frame groups of the fusion layer (must divide ``num_frames``).
        fusion_base_width: Res2Net base width of the fusion layer.
        fusion_expansion: expansion of the fusion layer.
        with_cp: activation checkpointing of the fusion layer and of each stage while gradients are enabled
            (saves memory, costs one extra forward). Outputs, gradients and BatchNorm running statistics are
            those of the plain forward (see ``bevnext.models.blocks.maybe_checkpoint``).
    """

    def __init__(
        self,
        in_channels: int = 160,
        num_frames: int = 9,
        channels: Sequence[int] = (320, 640, 1280),
        scales: Sequence[int] = (4, 4, 4),
        num_blocks: Sequence[int] = (2, 2, 2),
        base_width: Sequence[int] = (32, 32, 32),
        expansion: Sequence[int] = (4, 4, 4),
        strides: Sequence[int] = (2, 2, 2),
        fusion_scales: int = 3,
        fusion_base_width: int = 48,
        fusion_expansion: int = 2,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        check_config(in_channels >= 1, f"Res2Fusion: in_channels must be >= 1, got {in_channels}")
        check_config(num_frames >= 1, f"Res2Fusion: num_frames must be >= 1, got {num_frames}")
        per_stage = {
            "channels": channels,
            "scales": scales,
            "num_blocks": num_blocks,
            "base_width": base_width,
            "expansion": expansion,
            "strides": strides,
        }
        check_config(len(channels) >= 1, "Res2Fusion: channels must name at least one stage")
        for name, values in per_stage.items():
            check_config(
                len(values) == len(channels),
                f"Res2Fusion: {name} has {len(values)} entries but channels has {len(channels)}",
            )
        for i, stride in enumerate(strides):
            check_config(stride >= 1, f"Res2Fusion: strides[{i}] must be >= 1, got {stride}")
        self.in_channels = in_channels
        self.num_frames = num_frames
        self.with_cp = with_cp

        # `layers` is registered before `fusion_layer` to reproduce the reference state-dict order. Each stage is
        # wrapped in a one-element Sequential only to reproduce the reference names (layers.{i}.0.{block}).
        stages = []
        prev = in_channels
        for i, out in enumerate(channels):
            stage = Res2Layer(prev, out, num_blocks[i], scales[i], base_width[i], expansion[i], strides[i])
            stages.append(nn.Sequential(stage))
            prev = out
        self.layers = nn.Sequential(*stages)
        self.fusion_layer = FusionLayer(
            in_channels * num_frames, in_channels, num_frames, fusion_scales, fusion_base_width, fusion_expansion
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        """Fuse the frames and run the Res2Net stages.

        Args:
            x: (B, C·F, H, W) frame BEVs, frame-major, key frame first.

        Returns:
            One map per stage: (B, channels[i], H / prod(strides[:i+1]), W / …); for the reference at 128²:
            (B, 320, 64, 64), (B, 640, 32, 32), (B, 1280, 16, 16).
        """
        use_cp = self.with_cp and torch.is_grad_enabled()
        x = maybe_checkpoint(self.fusion_layer, x, use_cp)
        feats = []
        for stage in self.layers:
            x = maybe_checkpoint(stage, x, use_cp)
            feats.append(x)
        return feats
