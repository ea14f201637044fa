"""The composed detector: reference layout to the parameter, training step and prediction on tiny configs."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from reference_layout import reference_param_count, reference_rows, state_rows

from bevnext.config.stages import stage1, stage2, tiny
from bevnext.errors import ConfigError
from bevnext.eval.formatting import detections_to_nusc
from bevnext.models.detector import HeadOutputs, build_model
from bevnext.models.oracle import oracle_head_outputs
from bevnext.structures import CLASSES, RigidTransform, quat_to_yaw, wrap_angle, yaw_rotmat
from bevnext.synth.batches import ODD_PER_TASK, random_batch

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


def test_perfect_head_outputs_come_back_as_ground_truth_results():
    """Ground truth encoded as the heads' targets goes through the model's output path (sigmoid, decoding and
    Scale-NMS with the decode config ``build_model`` made) and the result formatting, and comes back exactly."""
    cfg = tiny(2)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    # 16 objects of every class on sites 24 m apart (nothing to suppress, even for x9 traffic cones), inside the
    # 32 x 32 grid of 3.2 m cells.
    sites = torch.tensor([(x, y) for x in (-36.0, -12.0, 12.0, 36.0) for y in (-36.0, -12.0, 12.0, 36.0)])
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 3, 5, 8, 9])
    n = len(labels)
    xy = sites + torch.rand(n, 2, generator=g) * 4 - 2
    boxes = torch.cat([
        xy, torch.rand(n, 1, generator=g) * 2 - 1, 0.4 + torch.rand(n, 3, generator=g) * 4,
        (torch.rand(n, 1, generator=g) * 2 - 1) * 3.1, torch.randn(n, 2, generator=g) * 3,
    ], dim=1)
    proposals, regression = oracle_head_outputs(model.target_builder([boxes], [labels]))
    (det,) = model.postprocess(HeadOutputs(proposals=proposals, regression=regression, depth=torch.zeros(0)))

    assert len(det.boxes) == n and torch.all(det.scores == 1.0)
    match = torch.cdist(boxes[:, :2], det.boxes[:, :2]).argmin(1)
    assert sorted(match.tolist()) == list(range(n)) and torch.equal(det.labels[match], labels)
    torch.testing.assert_close(det.boxes[match], boxes, rtol=0, atol=1e-4)

    # Into the key ego frame of a sample whose ego pose turns it by 0.7 rad and moves it to (100, 200, 1).
    ego2global = RigidTransform(yaw_rotmat(0.7), np.array([100.0, 200.0, 1.0]))
    records = detections_to_nusc(det.boxes.numpy(), det.scores.numpy(), det.labels.numpy(), "token-0", ego2global)
    rot = yaw_rotmat(0.7)
    for record, k in zip([records[int(j)] for j in match], range(n)):
        box = boxes[k].double().numpy()
        assert record["sample_token"] == "token-0" and record["detection_name"] == CLASSES[int(labels[k])]
        np.testing.assert_allclose(record["translation"], rot @ box[:3] + [100.0, 200.0, 1.0], atol=1e-4)
        np.testing.assert_allclose(record["size"], box[[4, 3, 5]], atol=1e-4)  # nuScenes order [w, l, h]
        assert abs(wrap_angle(quat_to_yaw(record["rotation"]) - box[6] - 0.7)) < 1e-4
        np.testing.assert_allclose(record["velocity"], rot[:2, :2] @ box[7:9], atol=1e-4)
        assert record["detection_score"] == 1.0


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
        ({"bev_strides": (1, 2, 0)}, "model.bev_strides"),
        ({"bev_strides": (4, 4, 4)}, "model.bev_strides=(4, 4, 4): the BEV grid (32, 32) is not divisible"),
        ({"heatmap_init_std": 0.0}, "model.heatmap_init_std"),
        ({"refine_points": 6}, "model.refine_points=6 must be a positive multiple of the 8 pillar heights"),
        ({"refine_pillar_z": (-5.0, 3.0, 3.0)}, "model.refine_pillar_z"),
        ({"refine_query_chunk": 0}, "model.refine_query_chunk=0"),
        ({"downsample": 6}, "model.downsample=6: expected one of [4, 8, 16, 32]"),
    ],
)
def test_bad_config_fails_at_build_time_naming_the_key(change, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        build_model(dataclasses.replace(tiny(1), **change))


@pytest.mark.parametrize("stage", [1, 2])
def test_full_resolution_first_bev_stage_keeps_every_map_on_the_grid(stage):
    """``bev_strides=(1, 2, 2)``: the first encoder stage stays on the 32 x 32 grid, the neck adds no upsampling,
    and the heads and losses see the grid as with the reference strides."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny(stage), bev_strides=(1, 2, 2))
    model = build_model(cfg).train()
    batch = random_batch(cfg, batch_size=1, labels=ODD_PER_TASK)
    bev = torch.randn(1, cfg.context_channels * cfg.num_frames, 32, 32)
    stages = model.img_bev_encoder_backbone(bev)
    assert [tuple(s.shape[-2:]) for s in stages] == [(32, 32), (16, 16), (8, 8)]
    assert tuple(model.img_bev_encoder_neck(stages).shape) == (1, cfg.bev_neck_channels, 32, 32)
    out = model.forward_features(batch)
    assert {tuple(p["heatmap"].shape[-2:]) for p in out.proposals} == {(32, 32)}
    assert torch.isfinite(sum(model.loss(batch).values()))


@pytest.mark.parametrize(("downsample", "stages"), [(4, (0, 1, 2, 3)), (8, (1, 2, 3)), (16, (2, 3))])
def test_image_features_come_at_the_configured_stride(downsample, stages):
    """The image neck fuses the backbone stages from ``model.downsample``'s up, so its output matches the depth
    net's grid at any stride (8, the reference's, fuses stages 1-3) and a training step runs."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny(1), downsample=downsample)
    model = build_model(cfg).train()
    assert model.img_backbone.out_indices == stages
    batch = random_batch(cfg, batch_size=1, labels=ODD_PER_TASK)
    h, w = cfg.input_size[0] // downsample, cfg.input_size[1] // downsample
    feats = model.image_features(batch.images[:, 0].flatten(0, 1))
    assert tuple(feats.shape) == (batch.num_cams, cfg.depth_mid_channels, h, w)
    losses = model.loss(batch)
    assert tuple(model.forward_features(batch).depth.shape[-2:]) == (h, w)
    assert torch.isfinite(sum(losses.values()))


def test_heatmap_init_std_starts_every_cell_at_the_prior():
    torch.manual_seed(0)
    batch = random_batch(tiny(1), batch_size=1, labels=ODD_PER_TASK)
    spread = {}
    for std in (None, 1e-3):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(tiny(1), heatmap_init_std=std)).eval()
        with torch.no_grad():
            logits = torch.cat([p["heatmap"].flatten() for p in model.forward_features(batch).proposals])
        spread[std] = (logits + 2.19).abs().max().item()
    assert spread[1e-3] < 0.05  # sigmoid(-2.19) ~ 0.1 everywhere
    assert spread[None] > 1.0  # the reference's Kaiming init spreads the untrained logits by units


@pytest.mark.parametrize("stage", [1, 2])
def test_channels_last_computes_what_the_contiguous_model_does(stage):
    """``model.channels_last`` changes the memory layout only: with the same weights, the losses, every
    gradient and the detections agree with the default layout's. The network runs in float64, where the two
    layouts' different summation orders leave ~1e-12 (in float32 the untrained model's gradients already differ
    by up to several percent between two summation orders); the head losses compute in float32."""
    torch.manual_seed(0)
    cfg = tiny(stage)
    batch = random_batch(cfg, batch_size=2, labels=ODD_PER_TASK).to(dtype=torch.float64)
    plain = build_model(cfg).double().train()
    nhwc = build_model(dataclasses.replace(cfg, channels_last=True)).double().train()
    nhwc.load_state_dict(plain.state_dict())
    convs = [p for p in nhwc.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in plain.parameters() if p.dim() == 4)
    results = []
    for model in (plain, nhwc):
        # Dropout draws its mask in memory order, so the two layouts would drop different elements (equally
        # likely masks, not a different computation): off here, BatchNorm stays in training mode.
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.eval()
        losses = model.loss(batch)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.eval()
        results.append((losses, grads, model.predict(batch)))
    (l0, g0, d0), (l1, g1, d1) = results
    assert l0.keys() == l1.keys() and g0.keys() == g1.keys()
    for key in l0:
        torch.testing.assert_close(l1[key], l0[key], rtol=1e-6, atol=1e-9, msg=key)
    # Biases followed by BatchNorm have a zero gradient in exact arithmetic; the floor absorbs their residue.
    floor = 1e-10 * max(g.abs().max().item() for g in g0.values())
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-7, atol=floor, msg=name)
    for a, b in zip(d0, d1):
        torch.testing.assert_close(b.boxes, a.boxes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(b.labels, a.labels)
