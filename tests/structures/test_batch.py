"""Batch: moving and casting a whole batch at once."""

from __future__ import annotations

import dataclasses

import torch

from bevnext.config.stages import tiny
from bevnext.synth.batches import random_batch


def test_to_dtype_casts_floating_tensors_only():
    batch = random_batch(tiny(2), batch_size=2, num_boxes=3)
    cast = batch.to(dtype=torch.float64)
    assert cast.images.dtype == cast.gt_depth.dtype == torch.float64
    assert all(b.dtype == torch.float64 for b in cast.gt_boxes)
    assert all(getattr(cast.cams, f.name).dtype == torch.float64 for f in dataclasses.fields(cast.cams))
    assert all(labels.dtype == torch.int64 for labels in cast.gt_labels)
    assert cast.canvas.dtype == torch.uint8
    torch.testing.assert_close(cast.images, batch.images.double(), rtol=0, atol=0)
    assert batch.images.dtype == torch.float32  # a copy: the original batch is unchanged
    assert batch.to("cpu").images.dtype == torch.float32  # no dtype: device only, as before
