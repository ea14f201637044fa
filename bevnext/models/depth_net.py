"""Camera-aware depth and context network (BEVDepth-style ``DepthNet`` as configured by BEVNeXt).

From the stride-8 image features of every camera it predicts per-pixel depth logits over D bins and a C-channel
context feature. Both branches are modulated by the camera geometry: a 27-value camera description
(:func:`camera_aware_input`), normalised by BatchNorm1d, goes through an MLP per branch and gates the shared
features channel-wise (squeeze-excitation style). Depth branch: 3 residual blocks, ASPP, 1x1 conv to D. Context
branch: 3x3 deformable conv (4 groups), BN, ReLU, 1x1 conv to C.

State-dict names and shapes are the reference's (``reduce_conv``, ``bn``, ``depth_mlp``, ``depth_se``,
``context_mlp``, ``context_se``, ``depth_conv.0..4``, ``context_conv.0/1/3``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bevnext.errors import ConfigError
from bevnext.models.blocks import BasicBlock, ConvBNReLU, maybe_checkpoint
from bevnext.ops import DeformConv2dPack
from bevnext.structures.cameras import CameraGeometry

__all__ = ["ASPP", "CAMERA_INPUT_DIM", "DepthNet", "camera_aware_input"]

CAMERA_INPUT_DIM = 27
_CONTEXT_GROUPS = 4


def camera_aware_input(cams: CameraGeometry) -> Tensor:
    """The 27 numbers that describe one camera to the depth net, in the reference's order.

    ``fx, fy, cx, cy`` (intrinsics), ``post_rot[0,0], post_rot[0,1], post_trans[0], post_rot[1,0], post_rot[1,1],
    post_trans[1]`` (2D image augmentation), ``bda[0,0], bda[0,1], bda[1,0], bda[1,1], bda[2,2]`` (BEV
    augmentation), then the camera -> key-ego matrix ``[R | t]`` flattened row by row (12 values).

    Args:
        cams: one frame's (B, N) cameras. The reference builds every frame's input from the key frame's
            extrinsics: pass ``cams.with_extrinsics(key_cams)`` to reproduce that.

    Returns:
        (B, N, 27), dtype of ``cams.intrinsics``.
    """
    if cams.num_frames is not None:
        raise ValueError("camera_aware_input: cams must be one frame's (B, N) cameras; use cams.frame(f)")
    B, N = cams.batch_size, cams.num_cams
    intrinsics, post_rot, post_trans = cams.intrinsics, cams.post_rot, cams.post_trans
    bda = cams.bda.unsqueeze(1).expand(B, N, 3, 3)
    values = [
        intrinsics[..., 0, 0],
        intrinsics[..., 1, 1],
        intrinsics[..., 0, 2],
        intrinsics[..., 1, 2],
        post_rot[..., 0, 0],
        post_rot[..., 0, 1],
        post_trans[..., 0],
        post_rot[..., 1, 0],
        post_rot[..., 1, 1],
        post_trans[..., 1],
        bda[..., 0, 0],
        bda[..., 0, 1],
        bda[..., 1, 0],
        bda[..., 1, 1],
        bda[..., 2, 2],
    ]
    extrinsics = torch.cat([cams.cam2key_rot, cams.cam2key_trans.unsqueeze(-1)], dim=-1).reshape(B, N, 12)
    return torch.cat([torch.stack(values, dim=-1), extrinsics.to(intrinsics.dtype)], dim=-1)


class _Mlp(nn.Module):
    """Linear -> ReLU -> Linear (the reference's dropout is 0, so it is left out)."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _SELayer(nn.Module):
    """``x * sigmoid(conv_expand(relu(conv_reduce(gate_input))))``; the gate is (B, C, 1, 1), broadcast over H, W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, channels, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(channels, channels, 1, bias=True)

    def forward(self, x: Tensor, gate_input: Tensor) -> Tensor:
        return x * torch.sigmoid(self.conv_expand(self.act(self.conv_reduce(gate_input))))


class _ASPPBranch(nn.Module):
    """Atrous conv (no bias) + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        padding = 0 if kernel_size == 1 else dilation
        self.atrous_conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 and three dilated 3x3 branches plus image-level pooling, fused by 1x1.

    Args:
        in_channels: input channels.
        mid_channels: channels of every branch and of the output.
        dilations: dilations of the 3x3 branches (the first branch is always a 1x1).
        dropout: dropout after the fusion (0.5 in the reference; active in train mode).
    """

    def __init__(
        self, in_channels: int, mid_channels: int, dilations: tuple[int, int, int] = (6, 12, 18), dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.aspp1 = _ASPPBranch(in_channels, mid_channels, 1, 1)
        self.aspp2 = _ASPPBranch(in_channels, mid_channels, 3, dilations[0])
        self.aspp3 = _ASPPBranch(in_channels, mid_channels, 3, dilations[1])
        self.aspp4 = _ASPPBranch(in_channels, mid_channels, 3, dilations[2])
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), *ConvBNReLU(in_channels, mid_channels, 1))
        self.conv1 = nn.Conv2d(5 * mid_channels, mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        # Reference init: Kaiming-normal convs (fan_in), BN = (1, 0).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> (B, mid_channels, H, W)."""
        pooled = self.global_avg_pool(x)
        # Upsampling a 1x1 map (bilinear, align_corners=True in the reference) is a broadcast.
        pooled = pooled.expand(-1, -1, x.shape[2], x.shape[3])
        branches = [self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x), pooled]
        return self.dropout(self.relu(self.bn1(self.conv1(torch.cat(branches, dim=1)))))


class DepthNet(nn.Module):
    """Depth logits and context features from image features and camera parameters.

    Args:
        in_channels: channels of the image features (512 from the FPN).
        mid_channels: width of the internal layers (256).
        context_channels: C, channels of the context output (80 in stage 1, 160 in stage 2).
        depth_channels: D, number of depth bins (118).
        use_dcn: the context branch's 3x3 conv is deformable (reference); False uses an ordinary grouped 3x3 conv
            with the same weight shape.
        with_cp: checkpoint the 5 layers of the depth branch when their input requires grad.
    """

    def __init__(
        self,
        in_channels: int = 512,
        mid_channels: int = 256,
        context_channels: int = 80,
        depth_channels: int = 118,
        use_dcn: bool = True,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("mid_channels", mid_channels),
            ("context_channels", context_channels),
            ("depth_channels", depth_channels),
        ):
            if value < 1:
                raise ConfigError(f"{name} must be positive, got {value}")
        if mid_channels % _CONTEXT_GROUPS:
            raise ConfigError(f"mid_channels must be divisible by {_CONTEXT_GROUPS} (grouped 3x3), got {mid_channels}")
        self.context_channels = context_channels
        self.depth_channels = depth_channels
        self.with_cp = with_cp
        # Definition order = state-dict order of the reference.
        self.reduce_conv = nn.Sequential(*ConvBNReLU(in_channels, mid_channels, 3, bias=True))
        self.bn = nn.BatchNorm1d(CAMERA_INPUT_DIM)
        self.depth_mlp = _Mlp(CAMERA_INPUT_DIM, mid_channels, mid_channels)
        self.depth_se = _SELayer(mid_channels)
        self.context_mlp = _Mlp(CAMERA_INPUT_DIM, mid_channels, mid_channels)
        self.context_se = _SELayer(mid_channels)
        self.depth_conv = nn.Sequential(
            BasicBlock(mid_channels, mid_channels),
            BasicBlock(mid_channels, mid_channels),
            BasicBlock(mid_channels, mid_channels),
            ASPP(mid_channels, mid_channels),
            nn.Conv2d(mid_channels, depth_channels, 1, bias=True),
        )
        if use_dcn:
            context_3x3: nn.Module = DeformConv2dPack(
                mid_channels, mid_channels, 3, padding=1, groups=_CONTEXT_GROUPS, deform_groups=1, bias=False
            )
        else:
            context_3x3 = nn.Conv2d(mid_channels, mid_channels, 3, padding=1, groups=_CONTEXT_GROUPS, bias=False)
        self.context_conv = nn.Sequential(
            context_3x3,
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, context_channels, 1, bias=True),
        )

    def reduce(self, x: Tensor) -> Tensor:
        """The part that depends on the image alone: (B*N, in_channels, h, w) -> (B*N, mid_channels, h, w).

        Evaluation keeps its output per image and reuses it for the frames that return as history frames.
        """
        return self.reduce_conv(x)

    def forward(self, x: Tensor, mlp_input: Tensor, reduced: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Predict depth logits and context.

        Args:
            x: (B*N, in_channels, h, w) image features of every camera (unused when ``reduced`` is given).
            mlp_input: (B*N, 27) or (B, N, 27) camera descriptions from :func:`camera_aware_input`, same camera
                order as ``x``.
            reduced: ``self.reduce(x)`` when already computed.

        Returns:
            ``(depth_logits, context)``: (B*N, D, h, w) un-normalised depth scores and (B*N, C, h, w) features.
        """
        x = self.reduce(x) if reduced is None else reduced
        mlp_input = mlp_input.reshape(-1, CAMERA_INPUT_DIM)
        if mlp_input.shape[0] != x.shape[0]:
            raise ValueError(f"mlp_input describes {mlp_input.shape[0]} cameras, x has {x.shape[0]}")
        cam = self.bn(mlp_input.to(self.bn.weight.dtype))
        context = self.context_se(x, self.context_mlp(cam)[..., None, None])
        context = self.context_conv(context)
        depth = self.depth_se(x, self.depth_mlp(cam)[..., None, None])
        for layer in self.depth_conv:
            depth = maybe_checkpoint(layer, depth, self.with_cp and depth.requires_grad)
        return depth, context
