"""``CBGSSampler``: the published CBGS rule on hand-made label lists, balancing, determinism, sharding."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bevnext.data.sampler import CBGSSampler, SceneShardSampler, cbgs_counts, cbgs_indices, class_sample_lists
from bevnext.errors import DataError

# Ten samples over three classes; per class, the samples containing it (each sample once per class):
# class 0: 0, 1, 2, 3, 4, 6, 8 (7); class 1: 2, 6, 9 (3); class 2: 5 (1) -> D = 11 listings.
LABELS = [[0], [0], [0, 1], [0], [0, 0], [2], [0, 1, 1], [], [0], [1]]


def _dataset(labels: list[list[int]], all_labels: list[list[int]] | None = None) -> SimpleNamespace:
    all_labels = all_labels if all_labels is not None else labels
    return SimpleNamespace(infos=[{"gt_labels": g, "all_labels": a} for g, a in zip(labels, all_labels)])


def _class_fractions(indices: np.ndarray, labels: list[list[int]], num_classes: int) -> np.ndarray:
    """Fraction of class listings (sample, class present) over a list of sample indices."""
    counts = np.zeros(num_classes)
    for i in indices:
        for c in set(labels[i]):
            counts[c] += 1
    return counts / counts.sum()


def test_counts_follow_the_cbgs_rule_exactly():
    """Each class gets D * (1/K) / (n_c / D) * n_c / D ... = D / K samples: here 11 // 3 = 3 each, 9 in all."""
    lists = class_sample_lists(LABELS, 3)
    assert [v.tolist() for v in lists] == [[0, 1, 2, 3, 4, 6, 8], [2, 6, 9], [5]]
    # The rule as published: ratio_c = (1/K) / (n_c / D), drawn n_c * ratio_c = D / K times.
    n = np.array([7, 3, 1])
    ratio = (1 / 3) / (n / n.sum())
    np.testing.assert_allclose(n * ratio, 11 / 3)
    assert cbgs_counts(LABELS, 3).tolist() == [3, 3, 3]
    indices = cbgs_indices(LABELS, 3, np.random.default_rng(0))
    assert indices.size == 9
    # Grouped by class, each drawn (with replacement) from that class's samples.
    assert set(indices[:3]) <= {0, 1, 2, 3, 4, 6, 8}
    assert set(indices[3:6]) <= {2, 6, 9}
    assert indices[6:].tolist() == [5, 5, 5]
    # Absent classes get nothing and do not count in K; labels outside the classes are ignored.
    assert cbgs_counts([[0], [0], [1], [7]], 4).tolist() == [1, 1, 0, 0]


def test_sampling_moves_class_frequencies_towards_uniform():
    rng = np.random.default_rng(0)
    probs = np.array([0.55, 0.2, 0.1, 0.06, 0.04, 0.02, 0.015, 0.01, 0.004, 0.001])
    labels = [sorted(set(rng.choice(10, size=rng.integers(1, 5), p=probs).tolist())) for _ in range(3000)]
    before = _class_fractions(np.arange(len(labels)), labels, 10)
    sampler = CBGSSampler(_dataset(labels), seed=0)
    after = _class_fractions(np.fromiter(sampler, dtype=np.int64), labels, 10)
    uniform = np.full(10, 0.1)
    # Not all the way to uniform: a draw for a rare class also brings the common classes of its sample.
    assert np.abs(after - uniform).sum() < 0.7 * np.abs(before - uniform).sum()
    assert after[9] > 5 * before[9]  # the rarest class is raised the most
    # The epoch length is the number of (sample, class) listings, rounded down to a multiple of K.
    listings = sum(len(set(s)) for s in labels)
    assert len(sampler) == listings - listings % 10


def test_epochs_are_deterministic_and_differ():
    ds = _dataset(LABELS)
    a, b = CBGSSampler(ds, seed=3), CBGSSampler(ds, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(CBGSSampler(ds, seed=4)) != first
    # One draw for the whole run (the reference): the same multiset every epoch, reshuffled.
    fixed = CBGSSampler(ds, seed=3, redraw_each_epoch=False)
    draws = []
    for epoch in range(3):
        fixed.set_epoch(epoch)
        draws.append(list(fixed))
    assert sorted(draws[0]) == sorted(draws[1]) == sorted(draws[2])
    unshuffled = CBGSSampler(ds, seed=3, shuffle=False)
    assert unshuffled.epoch_indices()[6:].tolist() == [5, 5, 5]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_get_equal_disjoint_slices_padded_by_wrap_around(world_size: int):
    ds = _dataset(LABELS)  # 9 samples per epoch
    samplers = [CBGSSampler(ds, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    for s in samplers:
        s.set_epoch(2)
    full = samplers[0].epoch_indices().tolist()
    per_rank = [list(s) for s in samplers]
    length = -(-9 // world_size)
    assert all(len(p) == len(s) == length for p, s in zip(per_rank, samplers))
    # The ranks' slices are consecutive pieces of one list: the epoch list, then its start again.
    assert sum(per_rank, []) == (full + full)[: length * world_size]


def test_count_all_labels_and_errors():
    gt = [[0], [0], [0], [1]]
    all_labels = [[0], [0, 2], [0, 2], [1, 2]]
    assert len(CBGSSampler(_dataset(gt, all_labels))) == 4  # D = 4, K = 2
    assert len(CBGSSampler(_dataset(gt, all_labels), count="all_labels")) == 6  # D = 7, K = 3 -> 2 each
    with pytest.raises(DataError, match="nothing to balance"):
        CBGSSampler(_dataset([[], []]))
    with pytest.raises(ValueError, match="rank"):
        CBGSSampler(_dataset(LABELS), rank=2, world_size=2)
    with pytest.raises(ValueError, match="count"):
        CBGSSampler(_dataset(LABELS), count="names")


def test_scene_shards_cover_every_sample_once_in_order_with_whole_scenes():
    sizes = {"a": 5, "b": 2, "c": 4, "d": 1, "e": 3}
    infos = [{"scene_token": scene} for scene, n in sizes.items() for _ in range(n)]
    for world in (1, 2, 3, 7):
        shards = [SceneShardSampler(infos, rank, world).indices for rank in range(world)]
        assert sorted(i for shard in shards for i in shard) == list(range(len(infos)))
        for shard in shards:
            assert shard == sorted(shard)  # scenes, and samples within a scene, in info order
            scenes = {infos[i]["scene_token"] for i in shard}
            assert len(shard) == sum(sizes[s] for s in scenes)  # whole scenes only
    # Largest first to the least loaded rank: a(5) -> 0, c(4) -> 1, e(3) -> 1, b(2) -> 0, d(1) -> 0.
    assert [len(SceneShardSampler(infos, r, 2)) for r in range(2)] == [8, 7]
    assert SceneShardSampler(infos, 6, 7).indices == []  # more ranks than scenes: some ranks idle
