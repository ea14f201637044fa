"""``BEVDataset``, its transforms, ``DataConfig`` and ``Collate``: layout, reference numbers, randomness,
loader workers, bad files and empty ground truth. Geometry is in ``test_geometry.py``.

The session's shared synthetic dataset (``tiny_synth_root``: 2 scenes x 4 samples at 400 x 225), loaded at
128 x 352 (``resize_unit`` = 2, as for 800 x 450 -> 704 x 256); tests that edit infos or files work on copies.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("nuscenes")

from bevnext.config.data import DataConfig  # noqa: E402
from bevnext.config.overrides import apply_overrides  # noqa: E402
from bevnext.structures.batch import Batch  # noqa: E402
from bevnext.data.collate import Collate  # noqa: E402
from bevnext.data.loader import loader_worker_setup  # noqa: E402
from bevnext.data.sample import Sample  # noqa: E402
from bevnext.structures.cameras import CameraGeometry  # noqa: E402
from bevnext.data.dataset import BEVDataset  # noqa: E402
from bevnext.data.image_aug import ImageAug  # noqa: E402
from bevnext.data.transforms import (  # noqa: E402
    depth_map,
    normalize_images,
    sample_bev_aug,
    sample_image_aug,
)
from bevnext.errors import ConfigError, DataError  # noqa: E402
from bevnext.structures.sensors import CAMERAS  # noqa: E402
from bevnext.structures.transforms import RigidTransform  # noqa: E402

SIZE = (400, 225)
CFG = DataConfig(input_size=(128, 352), src_size=SIZE)
TRAIN = "synth_train"


@pytest.fixture
def root(tiny_synth_root: Path) -> Path:
    """The shared dataset (read only) with its info files; one ``synth_train`` scene of 4 samples."""
    return tiny_synth_root


def _infos_path(root: Path) -> Path:
    return root / f"bevnext_infos_{TRAIN}.json"


def _dataset(root: Path, train: bool = True, cfg: DataConfig = CFG, info: Path | None = None, **kwargs) -> BEVDataset:
    return BEVDataset(info or _infos_path(root), root, cfg, train=train, **kwargs)


def _edited_infos(root: Path, tmp_path: Path, edit) -> Path:
    """A copy of the train info file with ``edit(infos)`` applied."""
    content = json.loads(_infos_path(root).read_text())
    edit(content["infos"])
    path = tmp_path / "infos.json"
    path.write_text(json.dumps(content))
    return path


def _assert_samples_equal(a: Sample, b: Sample, but: tuple[str, ...] = ()) -> None:
    """Equal tensors, cameras and metas (meta keys in ``but`` aside)."""
    for key in ("images", "gt_boxes", "gt_labels"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert (a.gt_depth is None) == (b.gt_depth is None)
    assert a.gt_depth is None or torch.equal(a.gt_depth, b.gt_depth)
    for field in dataclasses.fields(CameraGeometry):
        assert torch.equal(getattr(a.cams, field.name), getattr(b.cams, field.name)), field.name
    keep = lambda meta: {k: v for k, v in meta.items() if k not in but}  # noqa: E731
    assert keep(a.meta) == keep(b.meta)


# ------------------------------------------------------------------------------------------------
# Config and reference numbers.


def test_config_defaults_are_the_reference_pipeline():
    cfg = DataConfig()
    cfg.validate()
    assert cfg.resize_unit == 1.0 and cfg.num_frames == 1
    assert sample_image_aug(cfg, None) == ImageAug(resize=0.44, crop=(0, 140, 704, 396))
    assert DataConfig(src_size=(800, 450)).resize_unit == pytest.approx(2.0)
    assert sample_image_aug(DataConfig(src_size=(800, 450)), None).crop == (0, 140, 704, 396)
    stage2 = apply_overrides(cfg, ["num_prev_frames=8", "bgr_normalize=False", "on_bad_file=skip"])
    assert stage2.num_frames == 9 and not stage2.bgr_normalize and stage2.on_bad_file == "skip"


@pytest.mark.parametrize(
    ("change", "key"),
    [({"on_bad_file": "ignore"}, "on_bad_file"), ({"resize_lim": (0.6, 0.4)}, "resize_lim"),
     ({"flip_prob": 1.5}, "flip_prob"), ({"cbgs_count": "names"}, "cbgs_count"),
     ({"num_prev_frames": -1}, "num_prev_frames"), ({"depth_range": (60.0, 1.0)}, "depth_range")],
)
def test_config_rejects_bad_values(change: dict, key: str):
    with pytest.raises(ConfigError, match=f"data.{key}"):
        dataclasses.replace(DataConfig(), **change).validate()


def test_train_augmentation_ranges():
    """The reference's draws: resize in [0.38, 0.55], bottom crop, horizontal offset inside the resized image,
    flips half the time, rotation within +-5.4 degrees; BDA within its ranges, each flip half the time."""
    cfg = DataConfig()
    rng = np.random.default_rng(0)
    augs = [sample_image_aug(cfg, rng) for _ in range(2000)]
    resize = np.array([a.resize for a in augs])
    assert resize.min() >= 0.38 and resize.max() <= 0.55 and resize.max() - resize.min() > 0.15
    for a in augs[:200]:
        new_w, new_h = int(1600 * a.resize), int(900 * a.resize)
        x0, y0, x1, y1 = a.crop
        assert (x1 - x0, y1 - y0) == (704, 256)
        assert y1 == new_h  # bottom crop
        assert 0 <= x0 <= max(0, new_w - 704)
        assert abs(a.rotate_deg) <= 5.4
    assert 0.45 < np.mean([a.flip for a in augs]) < 0.55
    bevs = [sample_bev_aug(cfg, rng) for _ in range(2000)]
    assert all(abs(b.rotate_deg) <= 22.5 and 0.95 <= b.scale <= 1.05 for b in bevs)
    assert 0.45 < np.mean([b.flip_x for b in bevs]) < 0.55 and 0.45 < np.mean([b.flip_y for b in bevs]) < 0.55
    assert sample_bev_aug(cfg, None).matrix().tolist() == np.eye(3).tolist()


def test_normalisation_keeps_the_bgr_quirk():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    bgr = normalize_images(images, mean, std, bgr=True)
    rgb = normalize_images(images, mean, std, bgr=False)
    assert bgr.shape == (2, 3, 5, 7) and bgr.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(bgr[:, c], (images[..., 2 - c] - mean[c]) / std[c], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rgb[:, c], (images[..., c] - mean[c]) / std[c], rtol=1e-5, atol=1e-5)


def test_depth_map_keeps_the_nearest_point_per_pixel():
    """Pixel = floor of the augmented projection; depth in [min, max); the nearest of several points wins."""
    k = np.array([[10.0, 0.0, 5.5], [0.0, 10.0, 5.5], [0.0, 0.0, 1.0]])
    aug = ImageAug(resize=1.0, crop=(0, 0, 10, 10))
    # Optical-frame points: (u, v) = 10 * (x, y) / z + 5.5.
    points = np.array([
        [0.0, 0.0, 2.0],     # (5.5, 5.5)
        [0.0, 0.0, 3.0],     # same pixel, farther: loses
        [0.1, 0.0, 4.0],     # (5.75, 5.5) -> pixel (5, 5), farther: loses
        [0.41, 0.0, 4.0],    # (6.525, 5.5) -> pixel (6, 5)
        [0.0, 0.0, 0.5],     # too near
        [0.0, 0.0, 60.0],    # too far (max is exclusive)
        [-0.3, -0.3, 1.0],   # (2.5, 2.5)
        [10.0, 0.0, 1.0],    # outside the image
    ])
    out = depth_map(points, [RigidTransform.identity()], [k], [aug], (10, 10), (1.0, 60.0))
    assert out.shape == (1, 10, 10)
    expected = np.zeros((10, 10), dtype=np.float32)
    expected[5, 5], expected[5, 6], expected[2, 2] = 2.0, 4.0, 1.0
    np.testing.assert_array_equal(out[0], expected)
    # A flipped output window mirrors the columns: pixel c -> 9 - c.
    flipped = depth_map(points, [RigidTransform.identity()], [k], [dataclasses.replace(aug, flip=True)], (10, 10),
                        (1.0, 60.0))
    np.testing.assert_array_equal(flipped[0], expected[:, ::-1])


# ------------------------------------------------------------------------------------------------
# Samples.


def test_sample_layout_train_and_test(root: Path):
    cfg = dataclasses.replace(CFG, num_prev_frames=2)
    h, w = cfg.input_size
    train = _dataset(root, cfg=cfg)
    sample = train[2]
    assert isinstance(sample, Sample)
    assert sample.images.shape == (3, 6, h, w, 3) and sample.gt_depth.shape == (6, h, w)
    assert sample.cams.cam2key_rot.shape == (1, 3, 6, 3, 3) and sample.cams.bda.shape == (1, 3, 3)
    assert sample.images.dtype == torch.uint8 and sample.cams.cam2key_rot.dtype == torch.float32
    assert Collate.from_config(cfg) == Collate(cfg.mean, cfg.std, True)
    assert sample.gt_boxes.shape[1] == 9 and sample.gt_boxes.shape[0] == sample.gt_labels.shape[0] > 0
    assert sample.gt_labels.dtype == torch.int64
    assert (sample.gt_depth > 0).sum() > 500
    boxes = sample.gt_boxes
    assert boxes[:, :2].abs().max() < 51.2 and boxes[:, 6].min() >= -np.pi and boxes[:, 6].max() < np.pi
    meta = sample.meta
    assert meta["token"] == train.infos[2]["token"] and len(meta["frame_tokens"]) == 3
    assert np.asarray(meta["key_ego2global"]).shape == (4, 4)
    # Cameras share one augmentation across frames.
    assert torch.equal(sample.cams.post_rot[0][1], sample.cams.post_rot[0][0])

    test = _dataset(root, train=False, cfg=cfg)
    sample = test[2]
    assert sample.gt_depth is None
    assert torch.equal(sample.cams.bda[0], torch.eye(3))
    r = 0.44 * cfg.resize_unit
    top = int(225 * r + 1e-6) - h
    for n in range(6):
        np.testing.assert_allclose(sample.cams.post_rot[0][0, n], np.diag([r, r, 1.0]), rtol=1e-6)
        np.testing.assert_allclose(sample.cams.post_trans[0][0, n], [0.0, -top, 0.0])
    test.set_epoch(3)
    _assert_samples_equal(test[2], sample, but=("epoch",))  # no randomness at test time


def test_batch_images_are_the_normalised_canvas(root: Path):
    """Batch images are the samples' images normalised with the BGR quirk (default) or in RGB order; the
    canvas is the key frame's un-normalised images."""
    cfg = dataclasses.replace(CFG, num_prev_frames=1)
    for bgr in (True, False):
        ds = _dataset(root, cfg=dataclasses.replace(cfg, bgr_normalize=bgr))
        samples = [ds[0], ds[2]]
        batch = Collate.from_config(ds.cfg)(samples)
        for b, sample in enumerate(samples):
            rgb = sample.images.numpy()
            np.testing.assert_array_equal(batch.canvas[b].numpy(), rgb[0])
            np.testing.assert_array_equal(batch.images[b].numpy(), normalize_images(rgb, cfg.mean, cfg.std, bgr))
            # Channel 0 holds blue under the quirk, red otherwise.
            src = 2 if bgr else 0
            np.testing.assert_allclose(batch.images[b, :, :, 0].numpy(), (rgb[..., src] - cfg.mean[0]) / cfg.std[0],
                                       rtol=1e-5, atol=1e-4)


def test_augmentation_is_reproducible_per_seed_epoch_and_index(root: Path):
    ds = _dataset(root)
    first = ds[1]
    _assert_samples_equal(first, _dataset(root)[1])  # a fresh dataset, same draws
    ds.set_epoch(1)
    assert ds.epoch == 1
    other_epoch = ds[1]
    assert not torch.equal(other_epoch.cams.post_rot[0], first.cams.post_rot[0])
    ds.set_epoch(0)
    _assert_samples_equal(ds[1], first)
    assert not torch.equal(_dataset(root, seed=1)[1].cams.post_rot[0], first.cams.post_rot[0])


def test_collate_builds_a_batch(root: Path):
    ds = _dataset(root)
    batch = Collate.from_config(CFG)([ds[0], ds[1]])
    assert isinstance(batch, Batch) and batch.batch_size == 2 and batch.num_frames == 1 and batch.num_cams == 6
    assert batch.images.shape == (2, 1, 6, 3, *CFG.input_size) and batch.gt_depth.shape == (2, 6, *CFG.input_size)
    assert batch.images.dtype == torch.float32 and batch.canvas.shape == (2, 6, *CFG.input_size, 3)
    assert len(batch.gt_boxes) == len(batch.metas) == 2 and batch.cams.bda.shape == (2, 3, 3)
    test_batch = Collate.from_config(CFG)([_dataset(root, train=False)[0]])
    assert test_batch.gt_depth is None
    with pytest.raises(ValueError, match="no samples"):
        Collate.from_config(CFG)([])


def test_loader_workers_give_the_same_batches(root: Path):
    """num_workers=2 (persistent) gives exactly the num_workers=0 batches, epoch after epoch, with no worker
    seeding at all (every draw comes from (seed, epoch, index)):
    the epoch set in the main process reaches persistent workers."""

    def batches(workers: int) -> list[Batch]:
        ds = _dataset(root)
        kwargs = {"num_workers": workers, "worker_init_fn": loader_worker_setup(workers),
                  "collate_fn": Collate.from_config(CFG), "batch_size": 2, "pin_memory": torch.cuda.is_available()}
        if workers:
            kwargs["persistent_workers"] = True
        loader = DataLoader(ds, **kwargs)
        out = []
        for epoch in range(2):
            ds.set_epoch(epoch)
            out.extend(loader)
        return out

    single, multi = batches(0), batches(2)
    assert len(single) == len(multi) == 4
    for a, b in zip(single, multi):
        for field in dataclasses.fields(Batch):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if isinstance(x, CameraGeometry):
                assert all(torch.equal(getattr(x, f.name), getattr(y, f.name)) for f in dataclasses.fields(x))
            elif isinstance(x, torch.Tensor):
                assert torch.equal(x.cpu(), y.cpu()), field.name
            elif field.name == "metas":
                assert x == y
            else:
                assert all(torch.equal(u, v) for u, v in zip(x, y)), field.name
    assert not torch.equal(single[0].cams.post_rot, single[2].cams.post_rot)  # epochs differ


# ------------------------------------------------------------------------------------------------
# Bad files, empty ground truth, wrong sizes.


def _bad_image(tmp_path: Path, kind: str, root: Path) -> Path:
    path = tmp_path / "bad.jpg"
    if kind == "corrupt":
        good = next((root / "samples" / "CAM_FRONT").glob("*.jpg")).read_bytes()
        path.write_bytes(good[: len(good) // 2])  # truncated
    return path


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_bad_image_names_path_and_sample(root: Path, tmp_path: Path, kind: str):
    bad = _bad_image(tmp_path, kind, root)

    def edit(infos):
        infos[1]["cams"]["CAM_BACK"]["path"] = str(bad)

    info = _edited_infos(root, tmp_path, edit)
    ds = _dataset(root, info=info)
    token = ds.infos[1]["token"]
    with pytest.raises(DataError, match=rf"^{bad} \(sample {token}\): .*(expected|JPEG)"):
        ds[1]
    ds[0]  # the others load


@pytest.mark.parametrize("kind", ["missing", "truncated"])
def test_bad_lidar_file_names_path_and_sample(root: Path, tmp_path: Path, kind: str):
    bad = tmp_path / "bad.pcd.bin"
    if kind == "truncated":
        bad.write_bytes(np.zeros(7, dtype=np.float32).tobytes())

    def edit(infos):
        infos[0]["lidar"]["path"] = str(bad)

    ds = _dataset(root, info=_edited_infos(root, tmp_path, edit))
    token = ds.infos[0]["token"]
    expected = "missing" if kind == "missing" else "not a multiple"
    with pytest.raises(DataError, match=rf"^{bad} \(sample {token}\): .*{expected}.*float32 x 5"):
        ds[0]
    _dataset(root, train=False, info=ds.info_path)[0]  # the test pipeline reads no LiDAR


def test_skip_bad_files_returns_another_sample_and_counts(root: Path, tmp_path: Path, caplog):
    bad = _bad_image(tmp_path, "missing", root)

    def edit(infos):
        infos[1]["cams"]["CAM_FRONT"]["path"] = str(bad)

    info = _edited_infos(root, tmp_path, edit)
    cfg = dataclasses.replace(CFG, on_bad_file="skip")
    ds = _dataset(root, cfg=cfg, info=info)
    token = ds.infos[1]["token"]
    sample = ds[1]
    assert sample.meta["sample_index"] != 1 and sample.meta["replaced"] == [token]
    assert ds.num_skipped == 1
    assert str(bad) in caplog.text and token in caplog.text
    _assert_samples_equal(ds[1], sample)  # the replacement is deterministic
    assert ds.num_skipped == 2

    # Counts made in loader workers reach the main process.
    fresh = _dataset(root, cfg=cfg, info=info)
    loader = DataLoader(fresh, batch_size=1, num_workers=2, collate_fn=Collate.from_config(CFG))
    metas = [batch.metas[0] for batch in loader]
    assert len(metas) == len(fresh) and fresh.num_skipped == 1
    assert [m["replaced"] for m in metas].count([token]) == 1


def test_empty_ground_truth_is_replaced_in_training_only(root: Path, tmp_path: Path):
    def edit(infos):
        infos[0]["gt_boxes"], infos[0]["gt_labels"] = [], []
        # Boxes out of the BEV range count as empty too.
        infos[1]["gt_boxes"] = [[80.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0, 0.0, 0.0]]
        infos[1]["gt_labels"] = [0]

    info = _edited_infos(root, tmp_path, edit)
    ds = _dataset(root, info=info)
    for i in (0, 1):
        sample = ds[i]
        assert sample.meta["sample_index"] not in (i,) and sample.meta["replaced"][0] == ds.infos[i]["token"]
        assert sample.gt_boxes.shape[0] > 0
        _assert_samples_equal(ds[i], sample)
    assert ds.num_skipped == 0
    test = _dataset(root, train=False, info=info)
    assert test[0].gt_boxes.shape == (0, 9) and test[0].meta["sample_index"] == 0
    assert test[1].gt_boxes.shape == (0, 9)


def test_image_size_must_match_the_config(root: Path):
    with pytest.raises(ConfigError, match=r"data.src_size=\(1600, 900\).*400x225.*data.src_size=\(400, 225\)"):
        _dataset(root, cfg=DataConfig())


def test_custom_image_loader_is_used(root: Path):
    calls = []

    def loader(path: Path, aug: ImageAug) -> np.ndarray:
        calls.append((Path(path).parent.name, aug))
        w, h = aug.out_size
        return np.full((h, w, 3), 7, dtype=np.uint8)

    sample = _dataset(root, train=False, load_image=loader)[0]
    assert sorted(c[0] for c in calls) == sorted(CAMERAS)
    assert int(sample.images.min()) == int(sample.images.max()) == 7


def test_epoch_and_skip_counts_cross_spawned_workers(root: Path, tmp_path: Path):
    """The shared epoch / skip counters also work with the spawn start method (pickled into the workers)."""
    bad = _bad_image(tmp_path, "missing", root)

    def edit(infos):
        infos[2]["cams"]["CAM_FRONT_LEFT"]["path"] = str(bad)

    ds = _dataset(root, cfg=dataclasses.replace(CFG, on_bad_file="skip"), info=_edited_infos(root, tmp_path, edit))
    loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=Collate.from_config(CFG), multiprocessing_context="spawn",
                        persistent_workers=True)
    for epoch in (0, 4):
        ds.set_epoch(epoch)
        assert [batch.metas[0]["epoch"] for batch in loader] == [epoch] * len(ds)
    assert ds.num_skipped == 2


def test_packed_infos_round_trip():
    from bevnext.data.dataset import PackedInfos

    records = [{"token": "a", "gt_boxes": [[1.5, 2.0]], "cams": {"X": {"path": "p"}}}, {"token": "b"}, {}]
    packed = PackedInfos(records)
    assert len(packed) == 3 and list(packed) == records and packed[-3] == records[0] and packed[1:] == records[1:]
    with pytest.raises(IndexError):
        packed[3]
    assert len(PackedInfos([])) == 0
