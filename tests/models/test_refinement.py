"""PerspectiveRefinement and depth_emb: reference state-dict layout, projection geometry, a re-batching
oracle for the batched spatial cross-attention, gradients, and the real stage-1 shape."""

from __future__ import annotations

import math
import time

import pytest
import torch
from reference_layout import reference_rows, state_rows

from bevnext.errors import ConfigError
from bevnext.models.refinement import (
    MSDeformableAttention,
    PerspectiveRefinement,
    SpatialCrossAttention,
    make_depth_embedding,
    pillar_centres,
    project_reference_points,
)
from bevnext.ops import multi_scale_deformable_attn
from bevnext.structures.cameras import CameraGeometry

# Optical camera axes (x right, y down, z forward) expressed in an ego frame (x forward, y left, z up) for a
# camera looking along +x: columns are the camera axes.
FRONT = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def yaw_matrix(degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    return torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def make_rig(yaws, positions, focal, centre, batch=1, post_rot=None, post_trans=None, bda=None):
    """Camera tensors (B, N, ...) for cameras with the given yaws (degrees) and positions (metres)."""
    n = len(yaws)
    rot = torch.stack([yaw_matrix(y) @ FRONT for y in yaws]).expand(batch, n, 3, 3).clone()
    trans = torch.tensor(positions, dtype=torch.float32).expand(batch, n, 3).clone()
    k = torch.tensor([[focal[0], 0.0, centre[0]], [0.0, focal[1], centre[1]], [0.0, 0.0, 1.0]])
    intr = k.expand(batch, n, 3, 3).clone()
    prot = (torch.eye(3) if post_rot is None else post_rot).expand(batch, n, 3, 3).clone()
    ptrans = (torch.zeros(3) if post_trans is None else post_trans).expand(batch, n, 3).clone()
    bda = (torch.eye(3) if bda is None else bda).expand(batch, 3, 3).clone()
    return rot, trans, intr, prot, ptrans, bda


def nuscenes_like_rig(batch=1):
    """Six cameras like the reference check: yaws 55/0/-55/110/180/-110, f=1266, resize 0.44, crop top 140."""
    yaws = (55.0, 0.0, -55.0, 110.0, 180.0, -110.0)
    positions = [(0.5 + math.cos(math.radians(y)), math.sin(math.radians(y)), 1.6) for y in yaws]
    return make_rig(
        yaws,
        positions,
        (1266.0, 1266.0),
        (800.0, 450.0),
        batch=batch,
        post_rot=torch.diag(torch.tensor([0.44, 0.44, 1.0])),
        post_trans=torch.tensor([0.0, -140.0, 0.0]),
    )


def randomise_(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values for every parameter (the init zeroes the offset/attention weights)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


# ---------------------------------------------------------------------------------------------------------
# State-dict layout and init


@pytest.mark.parametrize("stage, channels, count", [(1, 80, 1_585_872), (2, 160, 3_299_552)])
def test_transformer_neck_matches_reference_state_dict(stage, channels, count):
    module = PerspectiveRefinement(channels)
    assert state_rows(module) == reference_rows(stage, "transformer_neck.")
    assert sum(p.numel() for p in module.parameters()) == count


@pytest.mark.parametrize("stage, channels, count", [(1, 80, 23_798), (2, 160, 33_318)])
def test_depth_embedding_matches_reference_state_dict(stage, channels, count):
    module = make_depth_embedding(118, channels)
    assert state_rows(module) == reference_rows(stage, "depth_emb.")
    assert sum(p.numel() for p in module.parameters()) == count
    out = module(torch.rand(2, 118, 3, 4))
    assert out.shape == (2, channels, 3, 4)


def test_init_follows_reference():
    module = PerspectiveRefinement(16, in_channels=8, bev_shape=(4, 6), num_heads=8)
    attn = module.decoder.layers[0].attentions[0]
    deform = attn.deformable_attention
    assert torch.count_nonzero(deform.sampling_offsets.weight) == 0
    assert torch.count_nonzero(deform.attention_weights.weight) == 0
    assert torch.count_nonzero(deform.attention_weights.bias) == 0
    assert torch.count_nonzero(deform.value_proj.bias) == 0
    assert torch.count_nonzero(attn.output_proj.bias) == 0
    # Head h points at angle 45*h degrees, scaled onto the unit square; points 0-3 at 1x, points 4-7 at 2x.
    directions = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]
    expected = torch.tensor(
        [[[d[0] * (1 + p // 4), d[1] * (1 + p // 4)] for p in range(8)] for d in directions], dtype=torch.float32
    )
    torch.testing.assert_close(deform.sampling_offsets.bias.view(8, 1, 8, 2)[:, 0], expected, atol=1e-6, rtol=0)
    # Every >= 2-D parameter other than the zeroed ones is Xavier-uniform (bounded, and not the default init).
    for name, p in module.named_parameters():
        if p.dim() >= 2 and "sampling_offsets" not in name and "attention_weights" not in name:
            fan_out, fan_in = p.shape[0], p[0].numel()
            receptive = p[0, 0].numel() if p.dim() > 2 else 1
            bound = math.sqrt(6.0 / (fan_in + fan_out * receptive))
            assert p.abs().max() <= bound + 1e-7, name
            assert p.abs().max() > 0.5 * bound, name


def test_bad_configs_fail_at_construction():
    with pytest.raises(ConfigError, match="embed_dims"):
        PerspectiveRefinement(15, num_heads=5)
    with pytest.raises(ConfigError, match="num_heads"):
        PerspectiveRefinement(20, num_heads=8)
    with pytest.raises(ConfigError, match="pillar_z"):
        PerspectiveRefinement(16, pillar_z=(-5.0, 3.0, 3.0))
    with pytest.raises(ConfigError, match="num_points"):
        PerspectiveRefinement(16, num_points=6)
    with pytest.raises(ConfigError, match="bev_shape"):
        PerspectiveRefinement(16, bev_shape=(0, 4))
    with pytest.raises(ConfigError, match="query_chunk"):
        PerspectiveRefinement(16, bev_shape=(2, 2), query_chunk=0)
    with pytest.raises(ConfigError, match="depth_bins"):
        make_depth_embedding(0, 80)


# ---------------------------------------------------------------------------------------------------------
# Reference points


def test_pillar_centres():
    centres = pillar_centres((4, 5), (4.0, -2.0), (2.0, 1.0), (-0.5, 0.5, 1.5, 2.5))
    assert centres.shape == (4, 5, 4, 3)
    assert centres[3, 2, 0].tolist() == [9.0, 1.5, -0.5]
    assert centres[0, 0, 3].tolist() == [5.0, -1.5, 2.5]
    module = PerspectiveRefinement(8, in_channels=4, bev_shape=(128, 128), num_heads=2)
    assert module.heights == (-4.5, -3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5)
    real = pillar_centres(module.bev_shape, module.grid_lower, module.grid_interval, module.heights)
    torch.testing.assert_close(real[0, 0, 0], torch.tensor([-50.8, -50.8, -4.5]))
    torch.testing.assert_close(real[127, 1, 7], torch.tensor([-50.0, 50.8, 2.5]))


def test_projection_matches_hand_computed_pixels():
    # Sample 0: BEV y-flip and an image augmentation (resize 0.44, crop 140 rows, horizontal flip to 704 wide);
    # sample 1: the same cameras without any augmentation.
    flip_y = torch.diag(torch.tensor([1.0, -1.0, 1.0]))
    rot, trans, intr, prot, ptrans, bda = make_rig(
        (0.0, 180.0), [(1.0, 0.2, 1.5), (-1.0, 0.0, 1.5)], (1000.0, 1100.0), (800.0, 450.0), batch=2
    )
    prot[0] = torch.tensor([[-0.44, 0.0, 0.0], [0.0, 0.44, 0.0], [0.0, 0.0, 1.0]])
    ptrans[0] = torch.tensor([704.0, -140.0, 0.0])
    bda[0] = flip_y
    size = (256, 704)
    points = pillar_centres((4, 5), (4.0, -2.0), (2.0, 1.0), (-0.5, 0.5, 1.5, 2.5))
    uv, valid = project_reference_points(points, CameraGeometry(rot, trans, intr, prot, ptrans, bda), size)
    assert uv.shape == (2, 2, 4, 5, 4, 2) and valid.shape == (2, 2, 4, 5, 4)

    # Cell (iy=3, ix=2), height 0: augmented (9, 1.5, -0.5) -> un-flipped (9, -1.5, -0.5) -> minus the camera
    # position (8, -1.7, -2.0) -> optical (x=1.7, y=2.0, z=8) -> u = 1000*1.7/8 + 800 = 1012.5,
    # v = 1100*2/8 + 450 = 725 -> resized/cropped/flipped u = 704 - 0.44*1012.5 = 258.5, v = 0.44*725 - 140 = 179.
    torch.testing.assert_close(uv[0, 0, 3, 2, 0], torch.tensor([258.5 / 704, 179.0 / 256]))
    assert bool(valid[0, 0, 3, 2, 0])
    # Sample 1 (no augmentation): (9, 1.5, -0.5) - t = (8, 1.3, -2.0) -> x = -1.3 -> u = 637.5, v = 725 (inside
    # the raw 1600x900 image but below the 256-row input, so invalid for this image size).
    torch.testing.assert_close(uv[1, 0, 3, 2, 0], torch.tensor([637.5 / 704, 725.0 / 256]))
    assert not bool(valid[1, 0, 3, 2, 0])
    # Height 2.5 of cell (iy=0, ix=0) in sample 0: (5, 1.5, 2.5) after un-flip, minus t = (4, 1.3, 1.0):
    # optical (-1.3, -1.0, 4) -> v = -275 + 450 = 175 -> 0.44*175 - 140 = -63 < 0: above the image.
    expected_u = 704 - 0.44 * (1000 * -1.3 / 4 + 800)
    torch.testing.assert_close(uv[0, 0, 0, 0, 3], torch.tensor([expected_u / 704, -63.0 / 256]))
    assert not bool(valid[0, 0, 0, 0, 3])
    # The rear camera looks away from every pillar (all x > 4 m ahead of it): depth < 0, never valid.
    assert not bool(valid[:, 1].any())
    # Batch entries are independent: sample 1 equals a one-sample call.
    uv1, valid1 = project_reference_points(
        points, CameraGeometry(rot[1:], trans[1:], intr[1:], prot[1:], ptrans[1:], bda[1:]), size
    )
    torch.testing.assert_close(uv1[0], uv[1])
    assert torch.equal(valid1[0], valid[1])


def test_point_behind_camera_is_invalid_even_when_it_lands_in_the_image():
    # Optical (1.5, 1.0, -2) projects to d*u = 1000*1.5 + 750*(-2) = 0 and d*v = 1000*1.0 + 500*(-2) = 0, so
    # after the clamped divide and a (100, 50) pixel shift it lands inside the image: only the depth test rejects it.
    cams = make_rig(
        (0.0,), [(0.0, 0.0, 0.0)], (1000.0, 1000.0), (750.0, 500.0), post_trans=torch.tensor([100.0, 50.0, 0])
    )
    behind = torch.tensor([[-2.0, -1.5, -1.0]])  # ego (x, y, z) of optical (1.5, 1.0, -2)
    uv, valid = project_reference_points(behind, CameraGeometry(*cams), (256, 704))
    assert bool(((uv > 0) & (uv < 1)).all()), uv
    assert not bool(valid.any())


def test_module_reference_points_are_row_major_cells():
    module = PerspectiveRefinement(
        8,
        in_channels=4,
        bev_shape=(4, 5),
        grid_lower=(4.0, -2.0),
        grid_interval=(2.0, 1.0),
        pillar_z=(-1.0, 3.0, 1.0),
        num_heads=2,
        num_points=4,
    )
    cams = make_rig((0.0,), [(1.0, 0.2, 1.5)], (1000.0, 1100.0), (800.0, 450.0))
    uv, valid = module.reference_points(CameraGeometry(*cams))
    assert uv.shape == (1, 1, 20, 4, 2)
    points = pillar_centres((4, 5), (4.0, -2.0), (2.0, 1.0), (-0.5, 0.5, 1.5, 2.5))
    uv_grid, valid_grid = project_reference_points(points, CameraGeometry(*cams), (256, 704))
    torch.testing.assert_close(uv[0, 0, 3 * 5 + 2], uv_grid[0, 0, 3, 2])
    assert torch.equal(valid.view(1, 1, 4, 5, 4), valid_grid)


# ---------------------------------------------------------------------------------------------------------
# Batched spatial cross-attention vs the reference's re-batching loop


def tiny_setup(dtype=torch.float32, batch=2, seed=0, channels=16, bev_shape=(6, 8)):
    """3 cameras (yaws 0/100/200, ~116 degree FOV) around a 1 m BEV grid centred on them (6x8: queries seen by
    0, 1 and 2 cameras); 4x8 feature maps of 32x64 images."""
    gen = torch.Generator().manual_seed(seed)
    module = PerspectiveRefinement(
        channels,
        in_channels=4,
        bev_shape=bev_shape,
        grid_lower=(-bev_shape[1] / 2, -bev_shape[0] / 2),
        grid_interval=(1.0, 1.0),
        pillar_z=(-1.0, 1.0, 0.5),
        num_heads=2,
        num_points=8,
        image_size=(32, 64),
    ).to(dtype)
    randomise_(module, seed)
    cams = make_rig((0.0, 100.0, 200.0), [(0.0, 0.0, 0.0)] * 3, (20.0, 20.0), (32.0, 16.0), batch=batch)
    cams[1][-1] += torch.tensor([0.3, -0.2, 0.1])  # the last sample sees the grid from a slightly different place
    bev_x = torch.randn(batch, 4, *bev_shape, generator=gen, dtype=dtype)
    feats = torch.randn(batch, 3, channels, 4, 8, generator=gen, dtype=dtype)
    return module, cams, bev_x, feats


def rebatching_sca_oracle(sca: SpatialCrossAttention, query, query_pos, value, level_shapes, ref, valid):
    """The reference's algorithm: per (sample, camera) gather the visible queries with nonzero, pad to the
    longest list, run deformable attention on the padded batch, scatter-add back, average, project, add."""
    batch, num_cams, num_queries, num_anchors, _ = ref.shape
    deform = sca.deformable_attention
    heads, levels, points, channels = deform.num_heads, deform.num_levels, deform.num_points, deform.embed_dims
    q = query + query_pos
    indexes = [[valid[b, n].sum(-1).nonzero().squeeze(-1) for n in range(num_cams)] for b in range(batch)]
    max_len = max(len(i) for row in indexes for i in row)
    queries = q.new_zeros(batch, num_cams, max_len, channels)
    refs = ref.new_zeros(batch, num_cams, max_len, num_anchors, 2)
    for b in range(batch):
        for n in range(num_cams):
            idx = indexes[b][n]
            queries[b, n, : len(idx)] = q[b, idx]
            refs[b, n, : len(idx)] = ref[b, n, idx]
    queries = queries.view(batch * num_cams, max_len, channels)
    refs = refs.view(batch * num_cams, max_len, num_anchors, 2)
    projected = deform.value_proj(value).view(batch * num_cams, value.shape[2], heads, channels // heads)
    offsets = deform.sampling_offsets(queries).view(batch * num_cams, max_len, heads, levels, points, 2)
    normaliser = torch.tensor([[w, h] for h, w in level_shapes], dtype=q.dtype)
    offsets = offsets / normaliser[None, None, None, :, None, :]
    weights = deform.attention_weights(queries).view(batch * num_cams, max_len, heads, levels * points)
    weights = weights.softmax(-1).view(batch * num_cams, max_len, heads, levels, points)
    # The P points are viewed as (P / Z, Z): the reference point of anchor j plus each of its offsets.
    offsets = offsets.view(batch * num_cams, max_len, heads, levels, points // num_anchors, num_anchors, 2)
    locations = (refs[:, :, None, None, None, :, :] + offsets).view(batch * num_cams, max_len, heads, levels, points, 2)
    shapes = torch.tensor(level_shapes)
    starts = torch.cumsum(shapes.prod(1), 0) - shapes.prod(1)
    out = multi_scale_deformable_attn(projected, shapes, starts, locations, weights)
    out = out.view(batch, num_cams, max_len, channels)
    slots = torch.zeros_like(query)
    for b in range(batch):
        for n in range(num_cams):
            idx = indexes[b][n]
            slots[b, idx] += out[b, n, : len(idx)]
    count = (valid.sum(-1) > 0).sum(1).clamp(min=1)
    return sca.output_proj(slots / count[..., None]) + query


def sca_inputs(module, cams, bev_x, feats):
    query = module.bev_embedding.weight[None] + module.shared_conv(bev_x).flatten(2).transpose(1, 2)
    pos = module.positional_encoding(*module.bev_shape)[None]
    value = feats.flatten(3).transpose(2, 3)
    uv, valid = module.reference_points(CameraGeometry(*cams))
    return query, pos, value, [tuple(feats.shape[3:])], uv.to(query.dtype), valid


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("chunk", [None, 5])
def test_batched_sca_matches_rebatching_oracle(dtype, atol, chunk):
    module, cams, bev_x, feats = tiny_setup(dtype)
    module.eval()
    sca = module.decoder.layers[0].attentions[0]
    sca.query_chunk = chunk
    query, pos, value, shapes, uv, valid = sca_inputs(module, cams, bev_x, feats)
    seen_by = valid.any(-1).sum(1)
    # The set-up exercises every case: queries seen by no camera, by one and by two.
    assert {0, 1, 2} <= set(seen_by.flatten().tolist())
    with torch.no_grad():
        ours = sca(query, pos, value, shapes, uv, valid)
        expected = rebatching_sca_oracle(sca, query, pos, value, shapes, uv, valid)
    torch.testing.assert_close(ours, expected, atol=atol, rtol=0)


def test_full_forward_matches_oracle_composition():
    module, cams, bev_x, feats = tiny_setup(torch.float64)
    module.eval()
    layer = module.decoder.layers[0]
    with torch.no_grad():
        out = module(bev_x, feats, CameraGeometry(*cams))
        # Queries and the positional encoding written out: pos(y, x) = concat(col_embed[x], row_embed[y]).
        conv = module.shared_conv
        bev = torch.relu(conv.bn(conv.conv(bev_x)))
        query = module.bev_embedding.weight[None] + bev.flatten(2).transpose(1, 2)
        pe = module.positional_encoding
        pos = torch.stack(
            [torch.cat((pe.col_embed.weight[x], pe.row_embed.weight[y])) for y in range(6) for x in range(8)]
        )[None]
        uv, valid = module.reference_points(CameraGeometry(*cams))
        attended = rebatching_sca_oracle(
            layer.attentions[0], query, pos, feats.flatten(3).transpose(2, 3), [(4, 8)], uv.double(), valid
        )
        normed = layer.norms[0](attended)
        ffn = layer.ffns[0].layers
        expected = layer.norms[1](normed + ffn[1](torch.relu(ffn[0][0](normed))))
    assert out.shape == (2, 16, 6, 8)
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), expected, atol=1e-12, rtol=0)


def test_query_seen_by_no_camera_gets_its_residual():
    module, cams, bev_x, feats = tiny_setup()
    module.eval()
    layer = module.decoder.layers[0]
    sca = layer.attentions[0]
    query, pos, value, shapes, uv, valid = sca_inputs(module, cams, bev_x, feats)
    unseen = ~valid.any(-1).any(1)  # (B, Q)
    assert unseen.any() and (~unseen).any()
    with torch.no_grad():
        attended = sca(query, pos, value, shapes, uv, valid)
        # No camera: the averaged slot is exactly zero, so output_proj contributes exactly its bias.
        assert torch.equal(attended[unseen], query[unseen] + sca.output_proj.bias)
        out = module(bev_x, feats, CameraGeometry(*cams)).flatten(2).transpose(1, 2)
        normed = layer.norms[0](query[unseen] + sca.output_proj.bias)
        expected = layer.norms[1](layer.ffns[0](normed))
    torch.testing.assert_close(out[unseen], expected, atol=1e-6, rtol=0)


def test_sca_gradcheck():
    module, cams, bev_x, feats = tiny_setup(torch.float64, batch=1, seed=3, channels=4, bev_shape=(3, 4))
    sca = module.decoder.layers[0].attentions[0]
    query, pos, value, shapes, uv, valid = sca_inputs(module, cams, bev_x, feats)
    assert valid.any(-1).any(1).sum() >= 6  # most cells are seen, so the attention path is exercised
    query, pos, value = (t.detach().requires_grad_() for t in (query, pos, value))
    assert torch.autograd.gradcheck(lambda q, p, v: sca(q, p, v, shapes, uv, valid), (query, pos, value))


def test_every_parameter_gets_a_gradient():
    module, cams, bev_x, feats = tiny_setup()
    module.train()
    feats.requires_grad_()
    out = module(bev_x, feats, CameraGeometry(*cams))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_points_per_anchor_must_divide():
    deform = MSDeformableAttention(8, 2, 1, 4)
    with pytest.raises(ValueError, match="multiple"):
        deform(torch.zeros(1, 3, 8), torch.zeros(1, 1, 6, 2, 4), torch.zeros(1, 1, 3, 3, 2), [(2, 3)])


# ---------------------------------------------------------------------------------------------------------
# Real stage-1 shape


def test_real_stage1_shape():
    torch.manual_seed(0)
    module = PerspectiveRefinement(80)
    cams = nuscenes_like_rig()
    bev_x = torch.randn(1, 256, 128, 128)
    feats = torch.randn(1, 6, 80, 32, 88)
    _, valid = module.reference_points(CameraGeometry(*cams))
    per_cam = valid.any(-1).sum(-1)
    # Every camera sees a few thousand of the 16384 cells (the reference check saw at most 3055).
    assert bool(((per_cam > 1000) & (per_cam < 4000)).all()), per_cam
    start = time.perf_counter()
    with torch.no_grad():
        out = module(bev_x, feats, CameraGeometry(*cams))
    print(f"stage-1 PerspectiveRefinement forward (B=1, 6x32x88 -> 128x128x80): {time.perf_counter() - start:.2f} s")
    assert out.shape == (1, 80, 128, 128)
    assert torch.isfinite(out).all()


def test_projection_ignores_autocast():
    # Under bf16 autocast the camera matrices would be rounded to 8 mantissa bits (pixels of error at 704 px).
    cams = CameraGeometry(*nuscenes_like_rig())
    points = pillar_centres((16, 16), (-30.0, -30.0), (4.0, 4.0), (-1.0, 1.0))
    uv, valid = project_reference_points(points, cams, (256, 704))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        uv_bf16, valid_bf16 = project_reference_points(points, cams, (256, 704))
    assert valid.any() and torch.equal(valid, valid_bf16)
    assert uv_bf16.dtype == torch.float32 and torch.equal(uv, uv_bf16)
