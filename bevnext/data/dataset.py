"""The camera dataset: one key sample with its history, augmented, as the model consumes it.

``BEVDataset(info_path, data_root, cfg, train)[i]`` builds sample ``i`` of an info file (written by
``bevnext create-data``) the way the reference's train / test pipelines do
(``reference/bevnext-model.md`` §4.2-4.4) as a ``Sample``; ``bevnext.data.collate.Collate`` stacks samples
into a ``Batch``. Per sample:

* Frames: the key sample, then its previous key samples (``num_prev_frames`` of them, nearest
  first) from ``prev_tokens``. Where the scene has fewer (its first samples) the key sample itself
  fills the missing slots, as the reference does (``index - k`` clamped, a sample of another scene
  replaced by the current one; the reference's clamping to index 0 of the very first scene of the
  file, which repeats that scene's first sample instead, is not reproduced).
* Cameras: one ``ImageAug`` per camera, shared by all frames of that camera. Extrinsics map each
  frame's camera into the key frame: camera -> ego at that camera's timestamp -> global -> key ego
  (ego at the key sample's CAM_FRONT timestamp). Intrinsics are those of the original image;
  ``post_rot`` / ``post_trans`` come from the ``ImageAug``.
* BEV augmentation (train): ``BEVAug`` on the ground truth, then the BEV range filter and yaw wrap.
* Depth targets (train): the key LiDAR sweep projected into the six augmented key images.
* Images leave the dataset as augmented uint8 RGB; ``Collate`` normalises them (``cfg.mean``,
  ``cfg.std``, ``cfg.bgr_normalize``) directly into the batch tensor,
  which in a loader worker it allocates in shared memory. A stage-2 sample is 54 images, 117 MB
  as float32: normalising per sample and then stacking, then copying the batch into shared memory
  to hand it to the main process, moved that much memory three times; this way it is written once.

Randomness. Every random draw of a sample comes from ``numpy.random.default_rng([seed, epoch, index,
attempt])``; ``set_epoch`` changes the epoch. A sample is therefore the same whichever loader
worker builds it and however many workers there are, and the global NumPy / torch generators are
never touched.

Empty ground truth (train). The reference (``filter_empty_gt``) replaces a sample whose ground
truth is empty after the BEV augmentation and range filter by a random other sample. We do the
same, drawing the replacement from the sample's own generator (attempt + 1, ...), so it is
deterministic. The check runs before any file is read, so a replaced sample costs nothing. At test
time samples are never replaced.

Bad files. A missing or corrupt image or LiDAR file raises ``DataError`` ``"<path> (sample
<token>): <what was expected>"``. With ``cfg.on_bad_file == "skip"`` the dataset logs a warning,
counts it (``num_skipped``, which adds up the counts of all loader workers) and returns another
sample, chosen as for empty ground truth. Use ``"raise"`` for evaluation: a replaced sample would
give a second prediction for another token.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch.utils.data import Dataset

from bevnext.config.data import DataConfig
from bevnext.data import image_io
from bevnext.data.files import lidar_bin_problem
from bevnext.data.image_aug import ImageAug
from bevnext.data.info_record import InfoRecord, key_ego2global, sensor2global
from bevnext.data.infos import load_infos
from bevnext.data.sample import Sample
from bevnext.data.transforms import (
    depth_map,
    filter_boxes,
    sample_bev_aug,
    sample_image_aug,
)
from bevnext.errors import ConfigError, DataError
from bevnext.structures.boxes import BOX_DIM, CLASSES
from bevnext.structures.cameras import CameraGeometry
from bevnext.structures.sensors import CAMERAS
from bevnext.structures.transforms import RigidTransform

logger = logging.getLogger(__name__)

LoadImageFn = Callable[[Path, ImageAug], np.ndarray]
"""An image loader: ``(path, aug) -> (H_out, W_out, 3) uint8 RGB`` (see ``bevnext.data.image_io.load_image``)."""

MAX_ATTEMPTS = 100
"""Replacements tried (empty ground truth, skipped bad files) before ``__getitem__`` gives up."""

_LIDAR_COLUMNS = 5
_LIDAR_WHAT = f"a LiDAR point file of float32 x {_LIDAR_COLUMNS} columns"
_WORKER_SLOTS = 64


class _SharedState:
    """The epoch and the skip counts, in shared memory so that DataLoader workers and the main process agree.

    Workers hold copies of the dataset; a plain attribute set by ``set_epoch`` in the main process
    would not reach persistent workers, and skip counts made in a worker would never reach the
    trainer. A lock-free shared array does both: slot 0 holds the epoch, the other slots one skip
    counter per worker (so that concurrent increments never race), summed on reading. It survives
    fork (shared mapping) and spawn (pickled while the worker starts); pickled at any other time
    (e.g. ``copy.deepcopy``) it becomes a private copy.
    """

    def __init__(self, values: list[int] | None = None) -> None:
        self._values = multiprocessing.RawArray(ctypes.c_int64, 1 + _WORKER_SLOTS)
        if values is not None:
            self._values[:] = values

    def __getstate__(self) -> dict[str, Any]:
        spawning = multiprocessing.context.get_spawning_popen() is not None
        return {"shared": self._values} if spawning else {"copy": list(self._values)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "shared" in state:
            self._values = state["shared"]
        else:
            self.__init__(state["copy"])

    @property
    def epoch(self) -> int:
        return int(self._values[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._values[0] = int(value)

    def count_skip(self) -> None:
        info = torch.utils.data.get_worker_info()
        # Slot 1: the main process; 2...: the workers (wrapping around past the last slot, which only shares
        # a counter between two workers).
        slot = 1 if info is None else 2 + info.id % (_WORKER_SLOTS - 1)
        self._values[slot] += 1

    @property
    def skipped(self) -> int:
        return int(sum(self._values[1:]))


class PackedInfos(Sequence[InfoRecord]):
    """Info records stored as one byte buffer, decoded on access: a read-only sequence of dicts.

    A list of nested dicts in a forked loader worker is slowly copied into the worker's own memory,
    page by page, because merely reading a Python object updates its reference count (on nuScenes
    train, ~28k records of nested lists and floats, that is on the order of a gigabyte per worker and
    rank). Each record is kept as its JSON bytes in one NumPy buffer instead, which reading never
    writes to, and decoded when asked for (tens of microseconds per record).

    Args:
        infos: the records.
    """

    def __init__(self, infos: Sequence[InfoRecord]) -> None:
        encoded = [json.dumps(info, separators=(",", ":")).encode("utf-8") for info in infos]
        self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return int(self._offsets.size - 1)

    @overload
    def __getitem__(self, index: int) -> InfoRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[InfoRecord]: ...

    def __getitem__(self, index: int | slice) -> InfoRecord | list[InfoRecord]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"info index {index} out of range for {len(self)} records")
        start, stop = self._offsets[index], self._offsets[index + 1]
        return json.loads(self._buffer[start:stop].tobytes())


def _with_sample(err: DataError | OSError, path: Path, token: str, what: str) -> DataError:
    """A ``DataError`` ``"<path> (sample <token>): <problem>"`` from a loader's error."""
    message = str(err)
    prefix = f"{path}: "
    if isinstance(err, DataError):
        detail = message[len(prefix):] if message.startswith(prefix) else message
    else:
        detail = f"cannot be read ({getattr(err, 'strerror', None) or err}); expected {what}"
    return DataError(f"{path} (sample {token}): {detail}")


class BEVDataset(Dataset):
    """The samples of one info file, augmented for training or fixed for testing.

    Args:
        info_path: ``bevnext_infos_<split>.json`` written by ``bevnext create-data``.
        data_root: the nuScenes data root the info's relative file paths start from.
        cfg: data pipeline settings.
        train: random augmentation, BEV augmentation, depth targets, empty-ground-truth
            replacement; otherwise the deterministic test pipeline (no depth targets).
        load_image: image loader ``(path, aug) -> (H, W, 3) uint8 RGB`` (default
            ``bevnext.data.image_io.load_image``; the loader benchmark swaps in its baseline).
        seed: base seed of the augmentation draws.

    Raises:
        DataError: unreadable info file, or a sample lacking a camera.
        ConfigError: a bad ``cfg`` value, or camera images whose size differs from ``cfg.src_size``.
    """

    def __init__(
        self,
        info_path: str | Path,
        data_root: str | Path,
        cfg: DataConfig,
        train: bool,
        load_image: LoadImageFn = image_io.load_image,
        seed: int = 0,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.train = bool(train)
        self.data_root = Path(data_root)
        self.info_path = Path(info_path)
        self.load_image = load_image
        self.seed = int(seed)
        # Sorted by time (the info files already are; sorting keeps "nearest first" meaningful for any input).
        infos = sorted(load_infos(self.info_path).infos, key=lambda info: (info["timestamp"], info["token"]))
        self._check_cameras(infos)
        index_of = {info["token"]: i for i, info in enumerate(infos)}
        self.frame_indices: list[list[int]] = [self._frames_of(infos, i, index_of) for i in range(len(infos))]
        self.infos: Sequence[InfoRecord] = PackedInfos(infos)
        """The info records, in timestamp order (read-only; see ``PackedInfos``)."""
        self._state = _SharedState()

    # ------------------------------------------------------------------------------------------
    # Set-up.

    def _check_cameras(self, infos: list[InfoRecord]) -> None:
        src_w, src_h = self.cfg.src_size
        for info in infos:
            cams = info.get("cams", {})
            for cam in CAMERAS:
                if cam not in cams:
                    raise DataError(f"{self.info_path}: sample {info['token']} lacks camera {cam} "
                                    f"(expected all of {', '.join(CAMERAS)}) — re-run bevnext create-data")
                size = (int(cams[cam]["width"]), int(cams[cam]["height"]))
                if size != (src_w, src_h):
                    raise ConfigError(
                        f"data.src_size={self.cfg.src_size}, but {self.info_path} has {size[0]}x{size[1]} {cam} "
                        f"images (sample {info['token']}); set data.src_size=({size[0]}, {size[1]})"
                    )

    def _frames_of(self, infos: list[InfoRecord], i: int, index_of: dict[str, int]) -> list[int]:
        """Info indices of sample ``i``'s frames: itself, then its previous key samples, key repeated where missing."""
        info = infos[i]
        prev = info.get("prev_tokens", [])
        frames = [i]
        for k in range(1, self.cfg.num_frames):
            j = index_of.get(prev[k - 1]) if k - 1 < len(prev) else None
            if j is None or infos[j]["scene_token"] != info["scene_token"]:
                j = i
            frames.append(j)
        return frames

    # ------------------------------------------------------------------------------------------
    # Public state.

    def __len__(self) -> int:
        return len(self.infos)

    @property
    def epoch(self) -> int:
        """The epoch the augmentations are drawn for (see ``set_epoch``)."""
        return self._state.epoch

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of ``epoch`` from now on; seen by all loader workers, persistent ones too.

        Call it before iterating the loader of that epoch (workers start prefetching on ``iter``).
        """
        self._state.epoch = epoch

    @property
    def num_skipped(self) -> int:
        """Samples skipped for bad files so far (``on_bad_file="skip"``), summed over all loader workers."""
        return self._state.skipped

    # ------------------------------------------------------------------------------------------
    # Samples.

    def __getitem__(self, index: int) -> Sample:
        """Sample ``index``, or its deterministic replacement (empty training ground truth, skipped file).

        Returns:
            A ``Sample`` (F = 1 + num_prev_frames, N = 6 cameras, (H, W) = ``input_size``): images as augmented
            uint8 RGB, cameras (1, F, N), ``gt_depth`` in training, ground truth in the BEV-augmented key frame
            and ``meta`` with the token asked for (``index``), the one returned (``sample_index``), ``epoch`` and
            the ``replaced`` tokens passed over.
        """
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        epoch = self._state.epoch
        current = index
        replaced: list[str] = []
        for attempt in range(MAX_ATTEMPTS):
            rng = np.random.default_rng([self.seed, epoch, index, attempt]) if self.train else None
            try:
                sample = self._build(current, rng)
            except DataError as err:
                if self.cfg.on_bad_file != "skip":
                    raise
                self._state.count_skip()
                logger.warning("skipping a sample with a bad file: %s", err)
                sample = None
            if sample is not None:
                sample.meta.update(index=index, epoch=epoch, replaced=replaced)
                return sample
            replaced.append(self.infos[current]["token"])
            current = self._replacement(current, index, epoch, attempt)
        raise DataError(
            f"{self.info_path}: no usable sample found in {MAX_ATTEMPTS} attempts starting from sample "
            f"{self.infos[index]['token']} (every one had bad files or, in training, no ground truth in range)"
        )

    def _replacement(self, current: int, index: int, epoch: int, attempt: int) -> int:
        """A random other sample, from a stream of its own (so it does not shift the augmentation draws)."""
        if len(self) == 1:
            return current
        pick = np.random.default_rng([self.seed, epoch, index, attempt, 1])
        other = int(pick.integers(len(self) - 1))
        return other + 1 if other >= current else other

    def _build(self, i: int, rng: np.random.Generator | None) -> Sample | None:
        """Sample ``i`` with the augmentation drawn from ``rng`` (None: test); None when train GT is empty."""
        cfg = self.cfg
        info = self.infos[i]
        augs = [sample_image_aug(cfg, rng) for _ in CAMERAS]
        bev = sample_bev_aug(cfg, rng)

        # Ground truth first: in training an empty result means this sample is replaced, before any file is read.
        boxes = np.asarray(info.get("gt_boxes", []), dtype=np.float64).reshape(-1, BOX_DIM)
        labels = np.asarray(info.get("gt_labels", []), dtype=np.int64).reshape(-1)
        boxes, labels = filter_boxes(bev.apply_boxes(boxes), labels, cfg.point_cloud_range, len(CLASSES))
        if self.train and boxes.shape[0] == 0:
            return None

        frames = self.frame_indices[i]
        records = {j: (info if j == i else self.infos[j]) for j in frames}  # each distinct frame decoded once
        n_frames, n_cams = len(frames), len(CAMERAS)
        out_h, out_w = cfg.input_size
        key2global = key_ego2global(info)
        global2key = key2global.inverse()
        rots = np.empty((n_frames, n_cams, 3, 3))
        trans = np.empty((n_frames, n_cams, 3))
        intrinsics = np.empty((n_frames, n_cams, 3, 3))
        images = np.empty((n_frames, n_cams, out_h, out_w, 3), dtype=np.uint8)
        post = [aug.post_rot_trans() for aug in augs]
        loaded: dict[int, int] = {}  # info index -> first frame slot holding its images (scene starts repeat)
        for f, j in enumerate(frames):
            frame_info = records[j]
            for n, cam in enumerate(CAMERAS):
                record = frame_info["cams"][cam]
                cam2key = global2key @ sensor2global(record)
                rots[f, n], trans[f, n] = cam2key.rotation, cam2key.translation
                intrinsics[f, n] = record["intrinsic"]
            if j in loaded:
                images[f] = images[loaded[j]]
                continue
            loaded[j] = f
            for n, cam in enumerate(CAMERAS):
                images[f, n] = self._image(frame_info, cam, augs[n])

        gt_depth = None
        if self.train:
            gt_depth = torch.from_numpy(self._depth(info, augs))
        post_rot = np.broadcast_to(np.stack([p[0] for p in post]), (n_frames, n_cams, 3, 3))
        post_trans = np.broadcast_to(np.stack([p[1] for p in post]), (n_frames, n_cams, 3))
        as_f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        cams = CameraGeometry(
            cam2key_rot=as_f32(rots)[None],
            cam2key_trans=as_f32(trans)[None],
            intrinsics=as_f32(intrinsics)[None],
            post_rot=as_f32(post_rot)[None],
            post_trans=as_f32(post_trans)[None],
            bda=as_f32(bev.matrix())[None],
        )
        return Sample(
            # Normalised by Collate, straight into the batch buffer (see the module docstring).
            images=torch.from_numpy(images),
            cams=cams,
            gt_depth=gt_depth,
            gt_boxes=as_f32(boxes),
            gt_labels=torch.from_numpy(labels),
            meta={
                "token": info["token"],
                "scene_token": info["scene_token"],
                "timestamp": int(info["timestamp"]),
                "key_ego2global": key2global.matrix.tolist(),
                "frame_tokens": [records[j]["token"] for j in frames],
                "sample_index": i,
            },
        )

    def _image(self, info: InfoRecord, cam: str, aug: ImageAug) -> np.ndarray:
        """One augmented camera image (H, W, 3) uint8; bad files become ``DataError`` naming path and sample."""
        path = self.data_root / info["cams"][cam]["path"]
        try:
            image = self.load_image(path, aug)
        except (DataError, OSError) as err:
            raise _with_sample(err, path, info["token"], "a JPEG camera image") from None
        out_w, out_h = aug.out_size
        if image.shape != (out_h, out_w, 3) or image.dtype != np.uint8:
            raise ValueError(f"load_image returned {image.dtype} {image.shape} for {path}, "
                             f"expected uint8 ({out_h}, {out_w}, 3)")
        return image

    def _points(self, info: InfoRecord) -> np.ndarray:
        """The key LiDAR sweep, (P, 3) float64 in the LIDAR_TOP frame (non-finite points dropped)."""
        path = self.data_root / info["lidar"]["path"]
        try:
            raw = path.read_bytes()
        except OSError:
            raw = b""  # described below
        if not raw or len(raw) % (4 * _LIDAR_COLUMNS):
            # The file checker words the problem (missing, not a file, unreadable, empty, truncated).
            problem = lidar_bin_problem(path) or f"unreadable; expected {_LIDAR_WHAT}"
            raise DataError(f"{path} (sample {info['token']}): {problem}")
        points = np.frombuffer(raw, dtype=np.float32).reshape(-1, _LIDAR_COLUMNS)[:, :3].astype(np.float64)
        return points[np.isfinite(points).all(axis=1)]

    def _depth(self, info: InfoRecord, augs: list[ImageAug]) -> np.ndarray:
        """(N, H, W) float32 sparse depth of the key sample's cameras."""
        lidar = info["lidar"]
        lidar2global = sensor2global(lidar)
        lidar2cams, intrinsics = [], []
        for cam in CAMERAS:
            record = info["cams"][cam]
            # Through the global frame: the LiDAR's ego pose (its timestamp) and the camera's own (its timestamp).
            cam2global = sensor2global(record)
            lidar2cams.append(cam2global.inverse() @ lidar2global)
            intrinsics.append(np.asarray(record["intrinsic"], dtype=np.float64))
        return depth_map(self._points(info), lidar2cams, intrinsics, augs, self.cfg.src_size, self.cfg.depth_range)


__all__ = ["MAX_ATTEMPTS", "BEVDataset", "LoadImageFn", "PackedInfos"]
