"""Class-balanced group sampling (CBGS, Zhu et al. 2019), as the reference trains with it.

The rule (``reference/bevnext-model.md`` §4.2, the published CBGS): for each class ``c`` collect the
samples that contain it (a sample with several classes is listed under each); with ``D`` the total
number of listings and ``n_c`` those of class ``c``, the class's current fraction is ``n_c / D`` and
its target fraction ``1 / K`` (``K`` classes); class ``c`` contributes ``n_c * (1/K) / (n_c/D) = D / K``
samples drawn with replacement from its list. Rare classes are thus repeated, frequent ones
thinned, and the epoch has about ``D`` samples (about 4.5x the dataset on nuScenes, where a sample
holds 4.5 classes on average).

Our choices, where the reference leaves room:
* ``K`` counts the classes present (each present class gets ``D // K``, in exact integer
  arithmetic); with all ten classes present, as on nuScenes, that is the reference's 1/10, and a
  class absent from the data no longer divides by zero.
* The draws are repeated every epoch from ``(seed, epoch)`` (``redraw_each_epoch=True``); the
  reference draws once when the dataset is built and only reshuffles per epoch (``False``).
* Labels are counted from ``gt_labels`` (boxes with at least one LiDAR or radar point, the
  reference's ``valid_flag`` filter) or, optionally, from ``all_labels``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from torch.utils.data import Sampler

from bevnext.data.info_record import InfoRecord
from bevnext.config.data import CBGS_COUNTS
from bevnext.errors import DataError
from bevnext.structures.boxes import CLASSES


class _HasInfos(Protocol):
    infos: Sequence[InfoRecord]


def class_sample_lists(labels_per_sample: Sequence[Sequence[int]], num_classes: int) -> list[np.ndarray]:
    """Per class, the indices of the samples containing it (each sample at most once per class).

    Args:
        labels_per_sample: per sample, its box labels (class indices; others are ignored).
        num_classes: K.

    Returns:
        K int64 arrays of sample indices, ascending.
    """
    lists: list[list[int]] = [[] for _ in range(num_classes)]
    for index, labels in enumerate(labels_per_sample):
        for c in sorted({int(label) for label in labels}):
            if 0 <= c < num_classes:
                lists[c].append(index)
    return [np.asarray(v, dtype=np.int64) for v in lists]


def cbgs_counts(labels_per_sample: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """How many samples CBGS draws for each class: ``D // K`` for each present class, 0 for absent ones.

    Args:
        labels_per_sample: per sample, its box labels.
        num_classes: K, the number of classes labels index into.

    Returns:
        (num_classes,) int64.
    """
    lists = class_sample_lists(labels_per_sample, num_classes)
    total = sum(len(v) for v in lists)
    present = sum(1 for v in lists if len(v))
    share = total // present if present else 0
    return np.array([share if len(v) else 0 for v in lists], dtype=np.int64)


def cbgs_indices(
    labels_per_sample: Sequence[Sequence[int]], num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """One CBGS draw: for each class, ``cbgs_counts`` of its samples with replacement; classes concatenated.

    Args:
        labels_per_sample: per sample, its box labels.
        num_classes: K.
        rng: generator of the draws.

    Returns:
        (sum of counts,) int64 sample indices, grouped by class in class order (not shuffled).
    """
    lists = class_sample_lists(labels_per_sample, num_classes)
    counts = cbgs_counts(labels_per_sample, num_classes)
    parts = [rng.choice(v, size=int(k), replace=True) for v, k in zip(lists, counts) if k]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def shard(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous share of one epoch list, padded by wrapping around to equal shares.

    Every rank gets ``ceil(len(indices) / world_size)`` positions, so all ranks take the same number of steps.
    """
    per_rank = math.ceil(indices.size / world_size)
    padded = np.resize(indices, per_rank * world_size)  # repeats from the start where it must grow
    return padded[rank * per_rank : (rank + 1) * per_rank]


class CBGSSampler(Sampler[int]):
    """Class-balanced group sampling over a dataset's infos, shuffled, sharded across ranks.

    Every rank computes the same epoch list from ``(seed, epoch)``, pads it by wrapping around to a
    multiple of ``world_size`` and takes its own contiguous, equal-length slice, so the ranks' slices
    are disjoint positions of one list. Call ``set_epoch`` before each epoch.

    Args:
        dataset: anything with ``infos`` (one dict per sample with ``gt_labels`` / ``all_labels``),
            e.g. ``BEVDataset``; indices refer to ``dataset.infos``.
        seed: base seed of the draws and the shuffle (same on every rank).
        rank: this process's rank.
        world_size: number of processes.
        count: ``"gt_labels"`` (default, as the reference) or ``"all_labels"``.
        num_classes: K (the ten detection classes).
        shuffle: shuffle the epoch list (the reference's sampler does).
        redraw_each_epoch: new CBGS draws every epoch (default) or one draw for the whole run.

    Raises:
        ValueError: a bad rank / world size / count.
        DataError: no sample contains any class.
    """

    def __init__(
        self,
        dataset: _HasInfos,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        count: str = "gt_labels",
        num_classes: int = len(CLASSES),
        shuffle: bool = True,
        redraw_each_epoch: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"CBGSSampler: rank {rank} / world_size {world_size} out of range")
        if count not in CBGS_COUNTS:
            raise ValueError(f"CBGSSampler: count={count!r}, expected one of {CBGS_COUNTS}")
        self.labels = [list(info.get(count, [])) for info in dataset.infos]
        self.num_classes = num_classes
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.shuffle, self.redraw_each_epoch = shuffle, redraw_each_epoch
        self.epoch = 0
        self.total_size = int(cbgs_counts(self.labels, num_classes).sum())
        if self.total_size == 0:
            raise DataError(f"CBGSSampler: no sample of the dataset has a {count} entry in any of the "
                            f"{num_classes} classes, so there is nothing to balance")
        self.num_samples = math.ceil(self.total_size / world_size)
        self._fixed = None if redraw_each_epoch else cbgs_indices(
            self.labels, num_classes, np.random.default_rng([self.seed, 0])
        )

    def set_epoch(self, epoch: int) -> None:
        """Use the draws / shuffle of ``epoch``."""
        self.epoch = int(epoch)

    def epoch_indices(self) -> np.ndarray:
        """The whole epoch list (all ranks), before padding and sharding: (total_size,) int64."""
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        indices = self._fixed if self._fixed is not None else cbgs_indices(self.labels, self.num_classes, rng)
        return indices[rng.permutation(indices.size)] if self.shuffle else indices.copy()

    def __iter__(self) -> Iterator[int]:
        return iter(shard(self.epoch_indices(), self.rank, self.world_size).tolist())

    def __len__(self) -> int:
        return self.num_samples


class SceneShardSampler(Sampler[int]):
    """Evaluation order: whole scenes per rank, each scene's samples in the order of the infos (timestamps).

    A scene never straddles two ranks, so a rank sees every history frame of its samples as an earlier key
    frame (what history-feature reuse needs), and the ranks together cover every sample exactly once. The
    scenes are dealt largest first to the rank with the fewest samples so far (ties to the lower rank), then
    each rank walks its scenes in their original order: the assignment depends only on the infos and the
    world size.

    Args:
        infos: the dataset's infos (``scene_token`` of each), in timestamp order.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, infos: Sequence[InfoRecord], rank: int = 0, world_size: int = 1) -> None:
        scenes: dict[str, list[int]] = {}
        for index, info in enumerate(infos):
            scenes.setdefault(str(info["scene_token"]), []).append(index)
        order = list(scenes)
        position = {scene: i for i, scene in enumerate(order)}
        load = [0] * world_size
        owner: dict[str, int] = {}
        for scene in sorted(order, key=lambda s: (-len(scenes[s]), position[s])):
            r = min(range(world_size), key=lambda k: (load[k], k))
            owner[scene] = r
            load[r] += len(scenes[scene])
        self.indices = [i for scene in order if owner[scene] == rank for i in scenes[scene]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


__all__ = ["CBGSSampler", "SceneShardSampler", "cbgs_counts", "cbgs_indices", "class_sample_lists", "shard"]
