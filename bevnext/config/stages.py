"""Model presets: the reference's two stages and tiny CPU configs built from the same modules.

Both stage presets reproduce the reference architecture to the parameter (state-dict names and shapes
equal the reference's, so reference checkpoints load directly). Reference quirks:

* The voxel index truncates toward zero; kept by default, ``model.truncate_voxel_index=False`` floors.
* Every frame's camera-aware depth input is built from the key frame's extrinsics, and the history
  frames' CRF is guided by the key frame's colours. Both are kept without a switch: released checkpoints
  were trained with them, and the alternative (each frame's own colours) would need every frame's
  un-normalised images in the batch, F times the colour-guide memory.
* History frames run without gradients but with BatchNorm in train mode; kept.
* The image normalisation applies BGR statistics to RGB pixels; kept by default,
  ``data.bgr_normalize=False`` normalises in RGB order.

Deliberate differences, none of which changes what the model computes beyond float rounding:

* Boxes leave the model with the gravity-centre z (the reference lowers it to the bottom centre; the
  nuScenes metrics are unaffected, and our result formatting expects the gravity centre).
* Perspective refinement evaluates every (camera, query) pair and masks the invisible ones instead of
  re-batching visible queries with ``nonzero`` (same result, no host synchronisation, ~5x more sampling).
  It attends with 4096 BEV queries at a time (``model.refine_query_chunk``; same result): the sampling step's
  transient then stays small, which keeps a training step's peak memory at the reference's or below.
* The CRF keeps a few belief snapshots and recomputes in its backward: 31 MB of activations instead of
  312 MB at the stage-2 shape (``bevnext bench crf``); it always computes in at least fp32.
* 3x3 matrices are inverted by the adjugate everywhere (``bevnext.structures.cameras.inverse_3x3``), the
  refinement's reference-point projection included (the reference: LU). Measured against an fp64 inverse,
  the adjugate path is as close as LU's; outputs differ from an LU build by float rounding only.
* Checkpointed blocks update BatchNorm running statistics once per step (the reference's recompute
  updated them twice).
* Heatmap target cells use floor instead of truncation (out-of-range centres are range-filtered anyway);
  zero-height boxes are skipped instead of producing an infinite loss.
* Decoding takes one top-k over classes x cells (the reference: per class, then overall; ties may differ).
* Options the reference does not have, off in both stage presets (the defaults reproduce the reference) and
  used by the demo's short CPU runs: ``model.backbone_base_channels`` (a narrower image ResNet, without
  pretrained weights), ``model.heatmap_init_std`` (heatmap logits start uniform at the prior instead of spread by
  the Kaiming init) and ``model.bev_strides`` (e.g. ``(1, 2, 2)``: the BEV encoder's first stage at the grid's
  resolution, the neck without its final upsampling). With the ground-truth heatmaps fed in as the BEV features,
  the last two together bring the tiny model's heatmap loss after 120 steps of 8 samples from 2.9 to 0.3.
  ``model.channels_last`` (convolution weights and camera images in the NHWC layout) changes no result beyond
  float rounding; it makes the demo's CPU steps about 20 % faster.
* On NPU, deformable attention with 10 / 20 channels per head runs mx_driving's kernel, as in Ascend's own
  port, although its documentation asks for a multiple of 8: in mx-driving 26.2.0.post2 neither the Python
  wrapper nor its compiled layer checks that (the latter checks at most 256 channels and levels x points
  <= 64), the tiling picks an unaligned kernel variant for such widths, and that variant's forward and
  backward binaries ship for Atlas A2 (``bevnext.ops.deform_attn``; ``TORCH_DEVICE=npu python -m pytest
  tests/ops`` compares it with the reference at these shapes).
"""

from __future__ import annotations

import dataclasses

from bevnext.config.model import ModelConfig

STAGE2_CODE_WEIGHTS: tuple[float, ...] = (1.0,) * 10
"""Stage 2's regression weights: velocity counts as much as the rest once history frames carry motion."""


def stage1() -> ModelConfig:
    """BEVNeXt stage 1 (reference ``bevnext-stage1.py``): single frame, C = 80, BEV ResNet encoder.

    Velocity is down-weighted (code weights 0.2) because a single frame carries no motion.
    Deliberate differences from the reference: none in the architecture (the quirks above are kept).
    """
    return ModelConfig()


def stage2() -> ModelConfig:
    """BEVNeXt stage 2 (reference ``bevnext-stage2.py``): 9 frames, C = 160, Res2Fusion encoder.

    Initialised from stage 1's ``epoch_2_ema.pth`` by shape-matching weights. Velocity code weights
    are 1.0. Deliberate differences from the reference: none in the architecture.
    """
    return dataclasses.replace(
        ModelConfig(),
        context_channels=160,
        num_frames=9,
        bev_encoder="res2fusion",
        bev_channels=(320, 640, 1280),
        code_weights=STAGE2_CODE_WEIGHTS,
    )


def tiny(stage: int = 1) -> ModelConfig:
    """A CPU-sized model from the same modules, for tests and the demo.

    ResNet-18 without pretrained weights, 64x176 input, 8 depth bins (5 m each from 1 m), a 32x32
    BEV grid of 3.2 m cells, C = 16, 4 CRF iterations, no activation checkpointing; stage 2 uses
    3 frames (one per fusion group).
    """
    base = dataclasses.replace(
        ModelConfig(),
        context_channels=16,
        backbone_depth=18,
        backbone_with_cp=False,
        pretrained=None,
        image_neck_channels=64,
        input_size=(64, 176),
        bev_cell=(3.2, 3.2, 8.0),
        depth_range=(1.0, 41.0, 5.0),
        depth_mid_channels=32,
        depth_with_cp=False,
        crf_iters=4,
        bev_channels=(32, 64, 128),
        bev_neck_channels=32,
        head_channels=16,
    )
    if stage == 1:
        return base
    if stage == 2:
        return dataclasses.replace(base, num_frames=3, bev_encoder="res2fusion", code_weights=STAGE2_CODE_WEIGHTS)
    raise ValueError(f"tiny(stage={stage}): stage must be 1 or 2")


PRESETS = {"stage1": stage1, "stage2": stage2, "tiny-stage1": lambda: tiny(1), "tiny-stage2": lambda: tiny(2)}
"""Model presets by name."""
