"""The model's configuration: every architecture number of the reference, as one typed dataclass.

``build_model(cfg)`` (``bevnext.models.detector``) is the only place that reads it; modules take
explicit constructor arguments. Stage presets live in ``bevnext.config.stages``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bevnext.errors import ConfigError


def num_depth_bins(depth_range: Sequence[float]) -> int:
    """Number of depth bins ``d = start, start + step, ... < stop``, as ``arange`` counts them (118 for (1, 60, 0.5)).

    Returns 0 for a range that yields no bin (``step <= 0`` or ``stop <= start``).
    """
    start, stop, step = (float(v) for v in depth_range)
    return max(0, math.ceil((stop - start) / step - 1e-9)) if step > 0 else 0


def whole_steps(lower: float, upper: float, step: float, name: str) -> int:
    """Number of steps of ``arange(lower, upper, step)``; raises ConfigError naming ``name`` unless it is a positive
    whole number."""
    if step <= 0:
        raise ConfigError(f"{name}: step must be > 0, got {step}")
    count = (upper - lower) / step
    if count < 0.5 or abs(count - round(count)) > 1e-6:
        raise ConfigError(f"{name}: ({upper} - {lower}) / {step} = {count} is not a positive whole number of cells")
    return int(round(count))


IMAGE_STRIDES = {4: 0, 8: 1, 16: 2, 32: 3}
"""Image feature stride (``model.downsample``) -> the first backbone stage the image neck fuses."""


@dataclass(frozen=True)
class ModelConfig:
    """BEVNeXt architecture.

    Attributes (frames: the BEV grid is in the key frame, x forward, y left, z up, metres):
        context_channels: C, the BEV feature width (``numC_Trans``: 80 stage 1, 160 stage 2).
        num_frames: key frame + previous key frames fed to the BEV encoder (1 stage 1, 9 stage 2).
        backbone_depth: image ResNet depth (50; 18 for tiny test configs).
        backbone_base_channels: width of the ResNet's first stage (64, as every ImageNet ResNet; the later stages
            double it); smaller values only without pretrained weights.
        backbone_with_cp: activation checkpointing in the image backbone (reference: on).
        pretrained: ``"auto"`` = ImageNet weights from the torch hub cache when present, a path, or None.
        require_pretrained: make missing pretrained weights an error instead of a warning.
        image_neck_channels: output width of the single-level image FPN (512).
        input_size: network input (H, W) of every camera image.
        downsample: image feature stride (8, the reference). The image neck fuses the backbone stages from the one at
            this stride up to the last (8: stages 1-3, as the reference; 4: stages 0-3; 16: stages 2-3).
        point_cloud_range: (x_min, y_min, z_min, x_max, y_max, z_max) of the BEV grid.
        bev_cell: (dx, dy, dz) BEV voxel size; z collapses into one cell in the reference.
        depth_range: (start, stop, step) of the depth bins in metres (118 bins for (1, 60, 0.5)).
        depth_mid_channels: DepthNet width (256).
        depth_with_cp: activation checkpointing of the DepthNet depth branch (reference: on).
        use_dcn: deformable conv in the DepthNet context branch.
        crf_iters / crf_zeta / crf_init_weight: mean-field depth refinement settings.
        truncate_voxel_index: reproduce the reference's truncation-toward-zero voxel indexing
            (points up to one cell below the lower bound land in cell 0); False uses floor.
        bev_encoder: ``"resnet"`` (stage 1) or ``"res2fusion"`` (stage 2).
        bev_channels: the three BEV encoder stage widths.
        bev_strides: strides of the three BEV encoder stages (2, 2, 2). The neck upsamples the third stage's output
            onto the first's by ``strides[1] * strides[2]`` and the result back onto the grid by ``strides[0]``, so
            ``(1, 2, 2)`` keeps the first stage at the grid's resolution.
        bev_neck_channels: FPN_LSS output width (256).
        head_channels: task-head conv width (64).
        heatmap_init_std: None = the reference's Kaiming init of the heatmap logits' conv; a value draws its weights
            from N(0, std^2), so that training starts from uniform logits at the prior (for short runs).
        refine_heads / refine_points / refine_pillar_z: perspective refinement attention settings.
        refine_query_chunk: the refinement attends with this many BEV queries at a time (None = all at once). Same
            result; it bounds the sampling step's transient memory: on CPU, one training step's peak falls from
            5.5 to 4.5-4.7 GB in stage 2 and from 4.1 to 3.6 GB in stage 1 with 4096, at the same step time
            (``bevnext bench model stage2 --compare model.refine_query_chunk=None``).
        channels_last: keep the weights of every convolution and the camera images in the channels-last memory
            layout (NHWC). Same result up to float rounding; on the CPU, oneDNN convolutions then skip their
            layout conversions, and the demo's training steps take about 20 % less time (measure a config with
            ``bevnext bench model PRESET --compare model.channels_last=true``). Off by default: the gain on
            accelerators depends on the device and precision.
        code_weights: per-component L1 weights [x, y, z, l, w, h, sin, cos, vx, vy].
        reg_loss_weight / depth_loss_weight: loss weights (0.25 and 3.0).
        score_threshold / post_max_size / pre_max_size / topk: decoding settings.
    """

    context_channels: int = 80
    num_frames: int = 1
    backbone_depth: int = 50
    backbone_base_channels: int = 64
    backbone_with_cp: bool = True
    pretrained: str | None = "auto"
    require_pretrained: bool = False
    image_neck_channels: int = 512
    input_size: tuple[int, int] = (256, 704)
    downsample: int = 8
    point_cloud_range: tuple[float, float, float, float, float, float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    bev_cell: tuple[float, float, float] = (0.8, 0.8, 8.0)
    depth_range: tuple[float, float, float] = (1.0, 60.0, 0.5)
    depth_mid_channels: int = 256
    depth_with_cp: bool = True
    use_dcn: bool = True
    crf_iters: int = 20
    crf_zeta: float = 0.001
    crf_init_weight: float = 0.015
    truncate_voxel_index: bool = True
    bev_encoder: str = "resnet"
    bev_channels: tuple[int, int, int] = (160, 320, 640)
    bev_strides: tuple[int, int, int] = (2, 2, 2)
    bev_neck_channels: int = 256
    head_channels: int = 64
    heatmap_init_std: float | None = None
    refine_heads: int = 8
    refine_points: int = 8
    refine_pillar_z: tuple[float, float, float] = (-5.0, 3.0, 1.0)
    refine_query_chunk: int | None = 4096
    channels_last: bool = False
    code_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
    reg_loss_weight: float = 0.25
    depth_loss_weight: float = 3.0
    score_threshold: float = 0.1
    pre_max_size: int = 1000
    post_max_size: int = 83
    topk: int = 500

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """(X, Y, Z) BEV cells; raises ConfigError when the range is not a whole number of cells."""
        cells = []
        for axis, name in enumerate("xyz"):
            extent = self.point_cloud_range[axis + 3] - self.point_cloud_range[axis]
            n = extent / self.bev_cell[axis]
            if extent <= 0 or abs(n - round(n)) > 1e-6 or round(n) < 1:
                raise ConfigError(
                    f"model.point_cloud_range / model.bev_cell: the {name} extent {extent:g} m is not a positive "
                    f"whole number of {self.bev_cell[axis]:g} m cells"
                )
            cells.append(int(round(n)))
        return cells[0], cells[1], cells[2]

    @property
    def num_depth_bins(self) -> int:
        """Number of depth bins D; raises ConfigError when the range yields none."""
        start, stop, step = self.depth_range
        if step <= 0 or stop <= start:
            raise ConfigError(f"model.depth_range={self.depth_range}: expected (start, stop, step) with stop > start, "
                              "step > 0")
        if abs((stop - start) / step - round((stop - start) / step)) > 1e-6:
            raise ConfigError(f"model.depth_range={self.depth_range}: (stop - start) is not a multiple of step")
        return num_depth_bins(self.depth_range)

    def validate(self) -> None:
        """Check every value that would otherwise fail deep inside a module; names the key."""
        _ = self.grid_size, self.num_depth_bins
        h, w = self.input_size
        if self.downsample not in IMAGE_STRIDES:
            raise ConfigError(f"model.downsample={self.downsample}: expected one of {sorted(IMAGE_STRIDES)} (the "
                              "strides of the image backbone's stages)")
        if h % self.downsample or w % self.downsample:
            raise ConfigError(f"model.input_size={self.input_size} is not divisible by model.downsample="
                              f"{self.downsample}")
        if self.context_channels <= 0 or self.context_channels % self.refine_heads:
            raise ConfigError(f"model.context_channels={self.context_channels} must be a positive multiple of "
                              f"model.refine_heads={self.refine_heads}")
        if self.context_channels % 8 or self.context_channels > 360:
            # mx_driving's bev_pool_v3 (the NPU splat) takes C as a multiple of 8, at most 360; failing here keeps
            # a config from training on one device and not on another.
            raise ConfigError(f"model.context_channels={self.context_channels} must be a multiple of 8 and at most "
                              "360 (the NPU bev_pool_v3 kernel's limits)")
        if self.context_channels % 2:
            raise ConfigError(f"model.context_channels={self.context_channels} must be even (positional encoding "
                              "splits it into row and column halves)")
        if self.num_frames < 1:
            raise ConfigError(f"model.num_frames={self.num_frames} must be >= 1")
        if self.backbone_base_channels < 8 or self.backbone_base_channels % 8:
            raise ConfigError(f"model.backbone_base_channels={self.backbone_base_channels} must be a positive "
                              "multiple of 8")
        if self.backbone_base_channels != 64 and self.pretrained is not None:
            raise ConfigError(f"model.backbone_base_channels={self.backbone_base_channels}: ImageNet weights exist "
                              "for 64 only; set model.pretrained=None to train a narrower backbone from scratch")
        if self.heatmap_init_std is not None and not self.heatmap_init_std > 0:
            raise ConfigError(f"model.heatmap_init_std={self.heatmap_init_std}: expected a positive value or None")
        if len(self.bev_strides) != 3 or min(self.bev_strides) < 1:
            raise ConfigError(f"model.bev_strides={self.bev_strides}: expected three strides >= 1")
        total = math.prod(self.bev_strides)
        if any(n % total for n in self.grid_size[:2]):
            raise ConfigError(f"model.bev_strides={self.bev_strides}: the BEV grid {self.grid_size[:2]} is not "
                              f"divisible by their product {total}")
        if self.refine_query_chunk is not None and self.refine_query_chunk < 1:
            raise ConfigError(f"model.refine_query_chunk={self.refine_query_chunk}: expected a positive number of "
                              "queries or None")
        heights = whole_steps(*self.refine_pillar_z, f"model.refine_pillar_z={self.refine_pillar_z}")
        if self.refine_points < 1 or self.refine_points % heights:
            raise ConfigError(f"model.refine_points={self.refine_points} must be a positive multiple of the "
                              f"{heights} pillar heights of model.refine_pillar_z={self.refine_pillar_z}")
        if self.bev_encoder not in ("resnet", "res2fusion"):
            raise ConfigError(f"model.bev_encoder={self.bev_encoder!r}: expected 'resnet' or 'res2fusion'")
        if self.bev_encoder == "res2fusion" and self.num_frames % 3:
            raise ConfigError(f"model.num_frames={self.num_frames}: the res2fusion encoder fuses frames in 3 groups, "
                              "so num_frames must be a multiple of 3")
        if len(self.code_weights) != 10:
            raise ConfigError(f"model.code_weights has {len(self.code_weights)} values, expected 10")
        if self.backbone_depth not in (18, 34, 50, 101):
            raise ConfigError(f"model.backbone_depth={self.backbone_depth}: expected 18, 34, 50 or 101")
        if self.crf_iters < 0:
            raise ConfigError(f"model.crf_iters={self.crf_iters} must be >= 0")
