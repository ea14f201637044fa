"""Data loaders for training and evaluation: dataset, sharded sampler, workers, collate.

Every random draw of a training sample comes from ``(seed, epoch, index)`` (see ``bevnext.data.dataset``)
and the samplers' orders from ``(seed, epoch)``, so which batches a rank sees, and what is in them, does
not depend on the number of workers, on timing, or on where a resumed run restarted.
"""

from __future__ import annotations

import math
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from bevnext.config.data import DataConfig
from bevnext.config.run import EvalConfig
from bevnext.data import image_io
from bevnext.data.collate import Collate
from bevnext.data.dataset import BEVDataset
from bevnext.data.infos import info_path
from bevnext.data.sampler import CBGSSampler, SceneShardSampler, shard
from bevnext.errors import DataError


class ShuffledShardSampler(Sampler[int]):
    """A plain shuffled epoch over all samples, padded by wrapping around and sharded across ranks.

    The same contract as ``CBGSSampler`` (``set_epoch``, equal contiguous shards of one list drawn from
    ``(seed, epoch)``), without class balancing.
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        if num_samples < 1:
            raise DataError("the dataset has no samples")
        self.total_size = num_samples
        self.seed, self.rank, self.world_size, self.shuffle = int(seed), rank, world_size, shuffle
        self.num_samples = math.ceil(num_samples / world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle of ``epoch``."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        order = np.arange(self.total_size)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 2]).permutation(self.total_size)
        return iter(shard(order, self.rank, self.world_size).tolist())

    def __len__(self) -> int:
        return self.num_samples


class SkipFirst(Sampler[int]):
    """Wraps an epoch sampler to leave out the first ``skip`` indices of the next epoch only.

    A run resumed in the middle of an epoch sets ``skip`` to the samples this rank already consumed, so it
    continues with the first unseen batch of the same order; later epochs are complete again.
    """

    def __init__(self, sampler: CBGSSampler | ShuffledShardSampler) -> None:
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Forward to the wrapped sampler."""
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        indices = iter(self.sampler)
        for _ in range(skip):
            next(indices, None)
        return indices

    def __len__(self) -> int:
        return len(self.sampler)


def loader_worker_setup(num_workers: int) -> Callable[[int], None] | None:
    """Prepare loader workers; returns the ``worker_init_fn`` to use (None without workers).

    Threads: workers decode and warp images; letting OpenCV in each of them start a thread per core
    oversubscribes the cores the training step computes on, which slows the step far more than it speeds up
    loading (torch itself already runs one thread per worker). Forked workers inherit the setting from this
    process, so it is made here, before they start: calling ``cv2.setNumThreads`` inside a forked worker
    deadlocks when this process's OpenCV thread pool was busy at the fork. Spawned workers (macOS, Windows)
    start fresh and set it themselves.

    Signals: workers ignore SIGINT and SIGTERM. Ctrl-C reaches every process of the terminal's group and a
    scheduler's SIGTERM may too; the training process handles them (it saves at the next step boundary),
    which needs its workers alive until then. They still exit with the training process.
    """
    if num_workers <= 0:
        return None
    if multiprocessing.get_start_method(allow_none=True) in (None, "fork"):
        image_io.set_opencv_threads(1)
        return _init_forked_worker
    return _init_spawned_worker


def _init_forked_worker(worker_id: int) -> None:
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _init_spawned_worker(worker_id: int) -> None:
    _init_forked_worker(worker_id)
    image_io.set_opencv_threads(1)


@dataclass
class TrainLoader:
    """The training data of one rank: ``loader`` yields ``Batch``es; call ``set_epoch`` before each epoch."""

    dataset: BEVDataset
    sampler: SkipFirst
    loader: DataLoader

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Draw ``epoch``'s order and augmentations; leave out its first ``skip_batches`` batches (resume)."""
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        self.sampler.skip = skip_batches * self.loader.batch_size

    def batches_per_epoch(self) -> int:
        """Full batches per epoch on this rank (the last, partial one is dropped)."""
        return len(self.sampler) // self.loader.batch_size


def build_train_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> TrainLoader:
    """The training loader of one rank over ``cfg.data_root`` / ``cfg.train_split``.

    Raises:
        DataError: a missing or unreadable info file (naming ``bevnext create-data``), or fewer samples on a
            rank than one batch.
    """
    path = info_path(cfg.data_root, cfg.train_split)
    if not path.is_file():
        raise DataError(f"{path}: no info file for split {cfg.train_split!r} — run bevnext create-data "
                        f"--data-root {cfg.data_root} --version VERSION first (or set data.data_root / "
                        "data.train_split)")
    dataset = BEVDataset(path, cfg.data_root, cfg, train=True, seed=seed)
    if cfg.cbgs:
        base: CBGSSampler | ShuffledShardSampler = CBGSSampler(
            dataset, seed=seed, rank=rank, world_size=world_size, count=cfg.cbgs_count
        )
    else:
        base = ShuffledShardSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
    if len(base) < batch_size:
        raise DataError(f"{path}: {len(base)} samples per rank is less than one batch of {batch_size} "
                        f"(train.batch_size) on {world_size} process(es)")
    sampler = SkipFirst(base)
    workers = dict(persistent_workers=True, prefetch_factor=prefetch_factor,
                   worker_init_fn=loader_worker_setup(num_workers))
    # A generator of its own: otherwise the loader draws its base seed from the global torch generator
    # (that dropout also uses) each time an iterator starts, so a resumed run or another worker count
    # would see different dropout masks. What is in a batch depends only on (seed, epoch, index) anyway.
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        collate_fn=Collate.from_config(cfg),
        pin_memory=pin_memory,
        drop_last=True,
        **(workers if num_workers > 0 else {}),
    )
    return TrainLoader(dataset, sampler, loader)


def build_eval_loader(cfg: DataConfig, eval_cfg: EvalConfig, split: str | None = None, rank: int = 0,
                      world_size: int = 1) -> DataLoader:
    """A test-pipeline loader over this rank's share of a split (``cfg.val_split`` by default).

    Each rank gets whole scenes, in timestamp order (``SceneShardSampler``); the ranks together cover every
    sample of the split once.

    Raises:
        DataError: no info file for the split, or a split without samples.
    """
    split = split or cfg.val_split
    path = info_path(cfg.data_root, split)
    if not path.is_file():
        raise DataError(f"{path}: no info file for split {split!r} — run bevnext create-data first")
    dataset = BEVDataset(path, cfg.data_root, cfg, train=False)
    if len(dataset) == 0:
        raise DataError(f"{path}: split {split!r} has no samples")
    workers = eval_cfg.num_workers
    return DataLoader(dataset, batch_size=eval_cfg.batch_size, sampler=SceneShardSampler(dataset.infos, rank,
                      world_size), num_workers=workers, collate_fn=Collate.from_config(cfg),
                      worker_init_fn=loader_worker_setup(workers))


__all__ = [
    "ShuffledShardSampler",
    "SkipFirst",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "loader_worker_setup",
]
