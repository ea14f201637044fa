"""Full-size training step on the CPU: stage 1 and stage 2 at 256x704, 6 cameras (9 frames for stage 2).

Checks a finite loss, the intermediate shapes of reference §1.2 and a gradient for every trainable
parameter (documented exception: the positional encoding's first gradient is exactly zero because the
sampling-offset and attention-weight projections are zero-initialised, as in the reference).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bevnext.config.stages import stage1, stage2
from bevnext.models.detector import build_model
from bevnext.synth.batches import ODD_PER_TASK, random_batch

pytestmark = pytest.mark.slow

ZERO_AT_INIT = [
    "transformer_neck.positional_encoding.row_embed.weight",
    "transformer_neck.positional_encoding.col_embed.weight",
]


def _shape(x):
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_shape(v) for v in x]
    return None


@pytest.mark.parametrize("stage", [1, 2])
def test_full_size_training_step(stage):
    torch.manual_seed(0)
    cfg = dataclasses.replace(stage1() if stage == 1 else stage2(), pretrained=None)
    c, frames = cfg.context_channels, cfg.num_frames
    model = build_model(cfg).train()
    seen: dict[str, list] = {}
    names = ["img_backbone", "img_neck", "img_view_transformer", "pre_process_net", "img_bev_encoder_backbone",
             "img_bev_encoder_neck", "proposal_head", "transformer_neck", "pts_bbox_head"]
    for name in names:
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.setdefault(name, []).append(_shape(out))
        )
    if stage == 2:
        model.img_bev_encoder_backbone.fusion_layer.register_forward_hook(
            lambda _m, _i, out: seen.setdefault("fusion_layer", []).append(_shape(out))
        )
    batch = random_batch(cfg, batch_size=1, labels=ODD_PER_TASK)
    assert tuple(batch.images.shape) == (1, frames, 6, 3, 256, 704)

    losses = model.loss(batch)
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()

    assert seen["img_backbone"] == [[(6, 512, 32, 88), (6, 1024, 16, 44), (6, 2048, 8, 22)]] * frames
    assert seen["img_neck"] == [(6, 512, 32, 88)] * frames
    assert seen["img_view_transformer"] == [[(1, c, 128, 128), (6, 118, 32, 88), (6, c, 32, 88)]] * frames
    assert seen["pre_process_net"] == [[(1, c, 128, 128)]] * frames
    enc = [(1, 2 * c, 64, 64), (1, 4 * c, 32, 32), (1, 8 * c, 16, 16)]
    assert seen["img_bev_encoder_backbone"] == [enc]
    if stage == 2:
        assert seen["fusion_layer"] == [(1, 160, 128, 128)]
    assert seen["img_bev_encoder_neck"] == [(1, 256, 128, 128)]
    assert seen["proposal_head"] == [[{"heatmap": (1, k, 128, 128)} for k in (1, 2, 2, 1, 2, 2)]]
    assert seen["transformer_neck"] == [(1, c, 128, 128)]
    reg = {"reg": (1, 2, 128, 128), "height": (1, 1, 128, 128), "dim": (1, 3, 128, 128),
           "rot": (1, 2, 128, 128), "vel": (1, 2, 128, 128)}
    assert seen["pts_bbox_head"] == [[reg] * 6]

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in params if p.grad is None] == []
    assert [n for n, p in params if not torch.isfinite(p.grad).all()] == []
    assert [n for n, p in params if not p.grad.abs().sum()] == ZERO_AT_INIT
