"""Reuse of image features across a scene's samples at test time equals recomputing them, with bounded memory."""

from __future__ import annotations

import pytest
import torch

from bevnext.config.stages import tiny
from bevnext.models.detector import build_model
from bevnext.models.feature_cache import ImageFeatureCache
from bevnext.synth.batches import random_scene_batches


def test_reuse_equals_recompute_across_scene_starts():
    torch.manual_seed(0)
    cfg = tiny(2)  # 3 frames
    model = build_model(cfg).eval()
    batches = random_scene_batches(cfg, scene_lengths=(4, 1, 3), seed=1)
    cache = ImageFeatureCache()
    sizes = []
    with torch.no_grad():
        for batch in batches:
            fresh = model.forward_features(batch)
            reused = model.forward_features(batch, cache)
            sizes.append(len(cache))
            for a, b in zip(fresh.regression + fresh.proposals, reused.regression + reused.proposals):
                for key in a:
                    torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
            for a, b in zip(model.postprocess(fresh), model.postprocess(reused)):
                torch.testing.assert_close(b.boxes, a.boxes, rtol=0, atol=1e-5)
                assert torch.equal(a.labels, b.labels)
    # Each sample's key frame is new (8 misses); its history frames were seen before or repeat the key frame.
    assert (cache.misses, cache.hits) == (8, 8 * 3 - 8)
    # Only the current window is kept: never more frames than one sample has.
    assert max(sizes) <= cfg.num_frames and sizes[4] == 1  # the one-sample scene keeps its single frame


def test_reuse_uses_the_kept_features_not_the_images():
    """A frame served from the cache ignores the images it arrives with: proof that the work is skipped."""
    cfg = tiny(2)
    model = build_model(cfg).eval()
    first, second = random_scene_batches(cfg, scene_lengths=(2,), seed=2)
    cache = ImageFeatureCache()
    with torch.no_grad():
        model.forward_features(first, cache)
        expected = model.forward_features(second, cache).regression
        cache.keep_only(first.metas[0]["frame_tokens"])  # back to the state after the first sample
        second.images[:, 1:] = 0.0  # history frames (the first sample's images) blanked
        blanked = model.forward_features(second, cache).regression
    for a, b in zip(expected, blanked):
        for key in a:
            assert torch.equal(a[key], b[key])


def test_cache_is_refused_in_training():
    cfg = tiny(2)
    model = build_model(cfg).train()
    (batch,) = random_scene_batches(cfg, scene_lengths=(1,))
    with pytest.raises(ValueError, match="eval mode"):
        model.forward_features(batch, ImageFeatureCache())
