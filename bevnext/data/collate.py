"""Collation: a list of ``BEVDataset`` samples -> one ``Batch``.

Used as ``DataLoader(collate_fn=collate)``; it runs inside the loader workers. The big outputs (the
normalised images, the canvas, the depth targets) are written once, straight into the batch
tensors, and inside a worker those are allocated in shared memory: the loader then hands the batch
to the main process without another copy (a stage-2 batch of 8 is about 1 GB of float32 images).
The ``Batch`` pins its tensors itself when the loader is created with ``pin_memory=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from bevnext.data.batch import Batch
from bevnext.data.transforms import normalize_images

_NUMPY_DTYPES = {torch.float32: np.float32, torch.uint8: np.uint8, torch.int64: np.int64, torch.float64: np.float64}
_STACKED = ("cam2key_rot", "cam2key_trans", "intrinsics", "post_rot", "post_trans", "bda")


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; in shared memory when called inside a DataLoader worker."""
    if get_worker_info() is not None:
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        try:
            # Allocated shared from the start, so that sending the batch to the main process copies nothing.
            storage = torch.UntypedStorage._new_shared(nbytes)
            return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
        except (AttributeError, RuntimeError, TypeError):  # a torch without this (private) constructor
            pass
    # NumPy backs large arrays with transparent huge pages where the OS allows, so first writes fault far
    # less often than into a fresh torch allocation (about half the time of normalising a stage-2 batch).
    return torch.from_numpy(np.empty(shape, dtype=_NUMPY_DTYPES[dtype]))


def _stack(tensors: list[torch.Tensor], key: str) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"collate: samples differ in {key!r} shape: {sorted(shapes)}")
    out = _empty((len(tensors), *tensors[0].shape), tensors[0].dtype)
    return torch.stack(tensors, out=out)


def collate(samples: Sequence[dict[str, Any]]) -> Batch:
    """Stack samples into a batch, normalising the images on the way.

    Args:
        samples: B dicts as returned by ``BEVDataset.__getitem__`` (same frame count, cameras, input
            size and normalisation).

    Returns:
        The ``Batch``: ``images`` (B, F, N, 3, H, W) float32 normalised as each sample's ``normalize``
        says; ``canvas`` (B, N, H, W, 3) uint8, the key-frame images; the per-camera matrices
        stacked to (B, F, N, ...); ``bda`` (B, 3, 3); ``gt_depth`` (B, N, H, W) when every sample
        has one, else None; boxes, labels and metas as lists of length B.

    Raises:
        ValueError: an empty list, or samples whose shapes or normalisation differ.
    """
    if not samples:
        raise ValueError("collate: no samples")
    first = samples[0]
    if any(sample["normalize"] != first["normalize"] for sample in samples):
        raise ValueError("collate: samples differ in their image normalisation")
    if len({tuple(sample["images"].shape) for sample in samples}) > 1:
        raise ValueError(f"collate: samples differ in image shape: {[tuple(s['images'].shape) for s in samples]}")
    n_frames, n_cams, height, width, _ = first["images"].shape
    norm = first["normalize"]
    images = _empty((len(samples), n_frames, n_cams, 3, height, width), torch.float32)
    canvas = _empty((len(samples), n_cams, height, width, 3), torch.uint8)
    for b, sample in enumerate(samples):
        rgb = sample["images"].numpy()
        normalize_images(rgb, norm["mean"], norm["std"], norm["bgr"], out=images[b].numpy())
        canvas[b] = sample["images"][0]
    depths = [sample.get("gt_depth") for sample in samples]
    gt_depth = _stack(depths, "gt_depth") if all(d is not None for d in depths) else None
    return Batch(
        images=images,
        canvas=canvas,
        **{key: _stack([sample[key] for sample in samples], key) for key in _STACKED},
        gt_depth=gt_depth,
        gt_boxes=[sample["gt_boxes"] for sample in samples],
        gt_labels=[sample["gt_labels"] for sample in samples],
        metas=[sample["meta"] for sample in samples],
    )


__all__ = ["collate"]
