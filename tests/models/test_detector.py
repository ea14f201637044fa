"""The composed detector: reference layout to the parameter, training step and prediction on tiny configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference_layout import reference_param_count, reference_rows, state_rows

from bevnext.config.stages import stage1, stage2, tiny
from bevnext.data.synth.batches import ODD_PER_TASK, random_batch
from bevnext.errors import ConfigError
from bevnext.models.detector import build_model

TOP_LEVEL = (
    "pts_bbox_head", "img_backbone", "img_neck", "img_view_transformer", "img_bev_encoder_backbone",
    "img_bev_encoder_neck", "pre_process_net", "transformer_neck", "proposal_head", "depth_emb",
)
# reference/bevnext-params.md, "Parameters per top-level child".
PARAMS = {
    1: (1_190_588, 23_508_032, 4_196_352, 7_603_215, 19_363_680, 7_293_696, 288_720, 1_585_872, 375_306, 23_798),
    2: (1_236_668, 23_508_032, 4_196_352, 7_623_775, 6_855_000, 10_980_096, 1_153_440, 3_299_552, 375_306, 33_318),
}


@pytest.fixture(scope="module", params=[1, 2], ids=["stage1", "stage2"])
def full_model(request):
    cfg = stage1() if request.param == 1 else stage2()
    return request.param, build_model(dataclasses.replace(cfg, pretrained=None))


def test_state_dict_equals_reference(full_model):
    stage, model = full_model
    assert state_rows(model) == reference_rows(stage)


def test_parameter_counts_per_module(full_model):
    stage, model = full_model
    assert tuple(name for name, _ in model.named_children() if name in TOP_LEVEL) == TOP_LEVEL
    counts = tuple(sum(p.numel() for p in getattr(model, name).parameters()) for name in TOP_LEVEL)
    assert counts == PARAMS[stage]
    total = sum(p.numel() for p in model.parameters())
    assert total == reference_param_count(stage) == (65_429_259 if stage == 1 else 59_261_539)


@pytest.mark.parametrize("stage", [1, 2])
def test_tiny_training_step_reaches_every_parameter(stage):
    torch.manual_seed(0)
    cfg = tiny(stage)
    model = build_model(cfg).train()
    # Objects in every task (a task without objects gives its regression branches no gradient, in the
    # reference too), an odd number each so that no L1 bias gradient can cancel exactly.
    batch = random_batch(cfg, batch_size=1, labels=ODD_PER_TASK)
    losses = model.loss(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    assert {"loss_depth", "task0.loss_heatmap", "task5.loss_vel"} <= set(losses)
    total.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in params if p.grad is None] == []  # every parameter is in the graph (DDP-safe)
    zero = [n for n, p in params if not p.grad.abs().sum()]
    # Documented exception: the learned positional encoding only reaches the output through the sampling
    # offsets and attention weights, whose weights are zero-initialised (as in the reference), so its first
    # gradient is exactly zero; it becomes non-zero after the first optimiser step.
    assert zero == ["transformer_neck.positional_encoding.row_embed.weight",
                    "transformer_neck.positional_encoding.col_embed.weight"], zero


def test_tiny_training_without_boxes_is_finite():
    cfg = tiny(1)
    model = build_model(cfg).train()
    batch = random_batch(cfg, batch_size=1, num_boxes=0)
    total = sum(model.loss(batch).values())
    assert torch.isfinite(total)
    total.backward()


def test_tiny_predict_shapes():
    cfg = tiny(2)
    model = build_model(cfg).eval()
    dets = model.predict(random_batch(cfg, batch_size=2))
    assert len(dets) == 2
    for boxes, scores, labels in dets:
        assert boxes.shape[1] == 9 and boxes.shape[0] == scores.shape[0] == labels.shape[0]
        assert boxes.shape[0] <= 6 * 83
        if len(scores):
            assert scores.min() > cfg.score_threshold and 0 <= labels.min() and labels.max() < 10


def test_history_frames_get_no_gradient_path():
    # Only the key frame's images influence the gradient (history frames run under no_grad).
    cfg = tiny(2)
    model = build_model(cfg).train()
    batch = random_batch(cfg, batch_size=1)
    batch.images.requires_grad_(True)
    sum(model.loss(batch).values()).backward()
    grad = batch.images.grad
    assert grad[:, 0].abs().sum() > 0
    assert grad[:, 1:].abs().sum() == 0


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"bev_cell": (0.7, 0.8, 8.0)}, "model.point_cloud_range / model.bev_cell"),
        ({"depth_range": (5.0, 1.0, 0.5)}, "model.depth_range"),
        ({"input_size": (250, 704)}, "model.input_size"),
        ({"context_channels": 84}, "model.context_channels"),
        ({"context_channels": 368}, "model.context_channels=368 must be a multiple of 8 and at most 360"),
        ({"num_frames": 4, "bev_encoder": "res2fusion"}, "model.num_frames"),
    ],
)
def test_bad_config_fails_at_build_time_naming_the_key(change, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(")", r"\)")):
        build_model(dataclasses.replace(tiny(1), **change))
