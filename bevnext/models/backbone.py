"""Image backbone: a torchvision-layout ResNet that returns selected stage outputs.

The reference uses mmdet's ResNet-50 in "pytorch" style (the stride-2 of a bottleneck sits on its 3x3 conv), all
stages trainable, BatchNorm in train mode, activation checkpointing inside every residual block, ImageNet weights
from torchvision. State-dict names are torchvision's (``conv1``, ``bn1``, ``layer1`` ... ``layer4``, blocks with
``conv1..3``/``bn1..3`` and ``downsample.0/1``), which is also what the reference checkpoint uses under
``img_backbone.``; the classifier (``fc``) and the global pooling are not built.

Pretrained weights are never downloaded: ``pretrained="auto"`` looks for torchvision's file in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``) and falls back to random initialisation with one warning.

ResNet-18/34 use the shared :class:`~bevnext.models.blocks.BasicBlock`; the bottleneck of ResNet-50+ is here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from bevnext.errors import ConfigError
from bevnext.models.blocks import BasicBlock, maybe_checkpoint

__all__ = ["Bottleneck", "ResNetBackbone", "pretrained_weights_path"]

logger = logging.getLogger(__name__)

# depth -> (block type, blocks per stage)
_ARCH: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
# torchvision's IMAGENET1K_V1 file names (what torchvision://resnetXX resolves to in the reference).
_TORCHVISION_FILES = {
    18: "resnet18-f37072fd.pth",
    34: "resnet34-b627a593.pth",
    50: "resnet50-0676ba61.pth",
    101: "resnet101-63fe2227.pth",
    152: "resnet152-394f9c45.pth",
}
_warned_missing: set[str] = set()


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here: "pytorch" style) -> 1x1 (x4 channels) with BN; ResNet-50/101/152 block.

    Args:
        in_channels: input channels.
        planes: width of the 1x1/3x3 convs; the output has ``4 * planes`` channels.
        stride: stride of the 3x3 conv.
        downsample: shortcut projection, or None for the identity.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """(B, Cin, H, W) -> (B, 4 * planes, H / stride, W / stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def pretrained_weights_path(depth: int) -> Path:
    """Where torchvision keeps its ImageNet weights of ResNet-``depth``: ``<torch hub dir>/checkpoints/<file>``."""
    if depth not in _TORCHVISION_FILES:
        raise ConfigError(f"depth must be one of {sorted(_TORCHVISION_FILES)}, got {depth}")
    return Path(torch.hub.get_dir()) / "checkpoints" / _TORCHVISION_FILES[depth]


class ResNetBackbone(nn.Module):
    """ResNet (torchvision layout, no classifier) returning the outputs of selected stages.

    Stage ``i`` (``layer{i+1}``) has stride ``4 * 2**i`` and ``64 * 2**i * expansion`` channels; for ResNet-50 at a
    256x704 input, ``out_indices=(1, 2, 3)`` gives (512, 32, 88), (1024, 16, 44) and (2048, 8, 22). All four
    stages are built whatever ``out_indices`` says (their parameters are part of the reference state dict), but
    the forward stops after the last requested one.

    Args:
        depth: 18, 34 (basic blocks), 50, 101 or 152 (bottlenecks).
        out_indices: stages (0..3) whose outputs are returned, in increasing order.
        with_cp: checkpoint every residual block's activations when its input requires grad (saves memory, costs
            one extra forward of the backbone in the backward).
        pretrained: ``"auto"``: torchvision's ImageNet weights from the torch hub cache if the file is there, else
            random initialisation with one warning; None: random initialisation; a path: load that file (a plain
            state dict, or a checkpoint with a ``state_dict`` entry; an ``fc.*`` classifier and a ``backbone.``
            key prefix are ignored).
        require_pretrained: with ``"auto"``, a missing file is a ConfigError instead of a warning.
    """

    def __init__(
        self,
        depth: int = 50,
        out_indices: Sequence[int] = (1, 2, 3),
        with_cp: bool = False,
        pretrained: str | Path | None = "auto",
        require_pretrained: bool = False,
        base_channels: int = 64,
    ) -> None:
        super().__init__()
        if depth not in _ARCH:
            raise ConfigError(f"depth must be one of {sorted(_ARCH)}, got {depth}")
        out_indices = tuple(int(i) for i in out_indices)
        if (
            not out_indices
            or any(i not in range(4) for i in out_indices)
            or list(out_indices) != sorted(set(out_indices))
        ):
            raise ConfigError(f"out_indices must be increasing stage indices in 0..3, got {out_indices}")
        self.depth = depth
        self.out_indices = out_indices
        self.with_cp = with_cp
        kind, blocks = _ARCH[depth]
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck

        if base_channels < 8 or base_channels % 8:
            raise ConfigError(f"base_channels must be a multiple of 8, got {base_channels}")
        if base_channels != 64 and pretrained is not None:
            raise ConfigError(f"base_channels={base_channels}: ImageNet weights exist for 64 only; use pretrained=None")
        self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = base_channels
        self.out_channels: list[int] = []
        for i, num_blocks in enumerate(blocks):
            planes = base_channels * 2**i
            layer = self._make_layer(block, in_channels, planes, num_blocks, stride=1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", layer)
            in_channels = planes * block.expansion
            self.out_channels.append(in_channels)
        self.out_channels = [self.out_channels[i] for i in out_indices]
        self._init_random()
        self._load_pretrained(pretrained, require_pretrained)

    @staticmethod
    def _make_layer(
        block: type[BasicBlock] | type[Bottleneck], in_channels: int, planes: int, num_blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or in_channels != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(in_channels, planes, stride, downsample)]
        layers += [block(planes * block.expansion, planes) for _ in range(num_blocks - 1)]
        return nn.Sequential(*layers)

    def _init_random(self) -> None:
        # The reference's init without pretrained weights: Kaiming-normal (fan_out, ReLU) convs, BN = (1, 0).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _load_pretrained(self, pretrained: str | Path | None, require_pretrained: bool) -> None:
        if pretrained is None:
            return
        if str(pretrained) == "auto":
            path = pretrained_weights_path(self.depth)
            if not path.is_file():
                if require_pretrained:
                    raise ConfigError(
                        f"pretrained ResNet-{self.depth} weights required but not found: {path} "
                        "(put torchvision's ImageNet file there, or set require_pretrained=False)"
                    )
                if str(path) not in _warned_missing:
                    _warned_missing.add(str(path))
                    logger.warning(
                        "ImageNet ResNet-%d weights %s not found in the torch hub cache; training from random "
                        "initialisation (download torchvision's file there to start from ImageNet)",
                        self.depth,
                        path,
                    )
                return
        else:
            path = Path(pretrained)
            if not path.is_file():
                raise ConfigError(f"pretrained backbone weights not found: {path}")
        try:
            self.load_state_dict(_backbone_state_dict(path, set(self.state_dict())))
        except RuntimeError as err:  # shape mismatches (e.g. weights of another depth)
            raise ConfigError(f"backbone weights {path} do not fit ResNet-{self.depth}: {err}") from err
        logger.info("loaded ResNet-%d backbone weights from %s", self.depth, path)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Stage outputs.

        Args:
            x: (B, 3, H, W) normalised images.

        Returns:
            One (B, C_i, H / s_i, W / s_i) tensor per entry of ``out_indices``, with ``C_i = out_channels[k]``
            and stride ``s_i = 4 * 2**i``.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(self.out_indices[-1] + 1):
            for block in getattr(self, f"layer{i + 1}"):
                # Checkpoint only when a gradient flows back through x; the re-run leaves BN statistics alone.
                x = maybe_checkpoint(block, x, self.with_cp and x.requires_grad)
            if i in self.out_indices:
                outs.append(x)
        return outs


def _backbone_state_dict(path: Path, expected: set[str]) -> dict[str, Tensor]:
    """The backbone entries of a weights file, names as in :class:`ResNetBackbone`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or code-carrying file: report it as the user's file problem
        raise ConfigError(f"cannot load backbone weights {path}: {type(err).__name__}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"backbone weights {path} hold a {type(state).__name__}, not a state dict")
    if not expected & set(state):
        # A detector checkpoint (e.g. the nuImages one of the "pers-pretrained" variant) nests the backbone.
        for prefix in ("backbone.", "img_backbone."):
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                break
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"backbone weights {path} do not match the ResNet: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
            f", unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return state
