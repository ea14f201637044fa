"""Collation: a list of ``Sample`` -> one ``Batch``, normalising the images on the way.

``Collate.from_config(data_cfg)`` is built once and passed as ``DataLoader(collate_fn=...)``; it runs
inside the loader workers. The big outputs (the normalised images, the canvas, the depth targets)
are written once, straight into the batch tensors, and inside a worker those are allocated in shared
memory: the loader then hands the batch to the main process without another copy (a stage-2 batch of
8 is about 1 GB of float32 images). The ``Batch`` pins its tensors itself when the loader is created
with ``pin_memory=True``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from bevnext.config.data import DataConfig
from bevnext.data.sample import Sample
from bevnext.data.transforms import normalize_images
from bevnext.structures.batch import Batch
from bevnext.structures.cameras import CameraGeometry

_NUMPY_DTYPES = {torch.float32: np.float32, torch.uint8: np.uint8, torch.int64: np.int64, torch.float64: np.float64}


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


def _cat_cameras(samples: Sequence[Sample]) -> CameraGeometry:
    # Each sample's geometry has a batch dimension of 1: concatenating along it gives the batch's.
    names = [f.name for f in dataclasses.fields(CameraGeometry)]
    return CameraGeometry(**{name: torch.cat([getattr(s.cams, name) for s in samples]) for name in names})


@dataclass(frozen=True)
class Collate:
    """Stacks samples into a ``Batch``, normalising the images as the data config says.

    Attributes:
        mean: per-channel mean subtracted from the 0...255 pixels.
        std: per-channel divisor.
        bgr: True reproduces the reference's normalisation of RGB pixels with BGR-ordered statistics.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Collate:
        """The collation of ``cfg``'s pipeline (``cfg.mean``, ``cfg.std``, ``cfg.bgr_normalize``)."""
        return cls(tuple(cfg.mean), tuple(cfg.std), bool(cfg.bgr_normalize))

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        """Stack ``samples`` (same frame count, cameras and input size) into a batch.

        Returns:
            The ``Batch``: ``images`` (B, F, N, 3, H, W) float32 normalised; ``canvas`` (B, N, H, W, 3) uint8, the
            key-frame images; the cameras (B, F, N); ``gt_depth`` (B, N, H, W) when every sample has one, else
            None; boxes, labels and metas as lists of length B.

        Raises:
            ValueError: an empty list, or samples whose shapes differ.
        """
        if not samples:
            raise ValueError("collate: no samples")
        if len({tuple(sample.images.shape) for sample in samples}) > 1:
            raise ValueError(f"collate: samples differ in image shape: {[tuple(s.images.shape) for s in samples]}")
        n_frames, n_cams, height, width, _ = samples[0].images.shape
        images = _empty((len(samples), n_frames, n_cams, 3, height, width), torch.float32)
        canvas = _empty((len(samples), n_cams, height, width, 3), torch.uint8)
        for b, sample in enumerate(samples):
            normalize_images(sample.images.numpy(), self.mean, self.std, self.bgr, out=images[b].numpy())
            canvas[b] = sample.images[0]
        depths = [sample.gt_depth for sample in samples]
        gt_depth = _stack(depths, "gt_depth") if all(d is not None for d in depths) else None
        return Batch(
            images=images,
            cams=_cat_cameras(samples),
            canvas=canvas,
            gt_depth=gt_depth,
            gt_boxes=[sample.gt_boxes for sample in samples],
            gt_labels=[sample.gt_labels for sample in samples],
            metas=[sample.meta for sample in samples],
        )


__all__ = ["Collate"]
