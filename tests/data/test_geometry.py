"""Geometry of the data pipeline against the synthetic renderer: the acceptance core of ``BEVDataset``.

One synthetic dataset (3 scenes x 4 samples at 800 x 450, so the pipeline scales it to 704 x 256 as
it does real 1600 x 900 images: ``resize_unit`` = 2) is generated per module. The truth is the
synthetic world itself: its renderer's object-id and depth buffers at each camera's own timestamp,
and the objects' tracks. The batch's matrices (extrinsics, intrinsics, post_rot / post_trans, bda)
and boxes are checked against it over many random augmentations (image flips, rotations, resizes,
crops; BEV rotations, scales and both flips) on all six cameras.

Annotations are at the LiDAR key time while every camera sees the world at its own time, so box
positions are moved by ``velocity * (t_camera - t_lidar)`` wherever an image is involved.

Tolerances (stated per test, collected here):
* (a) projection: an eligible point must land exactly on its object's id in the warped id buffer;
  eligible = its true projection has a 5 x 5 source-pixel neighbourhood of that object's id (so
  nearest resampling at <= 1.3 source px per output px cannot reach another surface).
  The augmented image vs the rendering warped by the batch's post_rot / post_trans (nearest): mean
  |diff| < 6 grey levels on shown pixels (JPEG q90, bilinear vs nearest; measured <= 4.1, a mirrored
  warp gives 38 on average), and smaller than with that warp shifted by one output pixel in any of
  the four directions (measured: always, by >= 1.7 %), which pins the image geometry to < 1 px.
* (b) depth targets, against the camera's view (its own ego pose) of the objects frozen at the LiDAR
  time (the pipeline compensates ego motion, not object motion): relative |target - warped rendered
  depth| median < 0.5 %, < 2 % for over 90 % of targets (measured: 0.08 %, 90th percentile 0.7 %;
  the point lies anywhere in its pixel while the warped buffer holds the source pixel centre's
  depth), at most 0.5 % of targets on sky / off-image pixel centres (object tops, image borders;
  measured 0.05 %). Ground pixels (3 x 3 ground neighbourhood): the target lies within the analytic
  ray / plane depths at the output pixel's four corners +- 2 cm, for >= 99.9 % (measured: all).
* (c) lift: lifted object pixels at the rendered depth lie inside the BEV-augmented box, moved to
  the camera's time, enlarged by 2 cm (float32 matrices; the lifted points are exact otherwise).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nuscenes")

from bevnext.config.data import DataConfig  # noqa: E402
from bevnext.data.dataset import BEVDataset  # noqa: E402
from bevnext.data.info_record import key_ego2global  # noqa: E402
from bevnext.data.infos import create_infos  # noqa: E402
from bevnext.synth import generate_dataset  # noqa: E402
from bevnext.synth import generator as gen  # noqa: E402
from bevnext.synth.ground import GroundTexture  # noqa: E402
from bevnext.synth.render import GROUND, CameraRenderer, RenderResult  # noqa: E402
from bevnext.synth.world import SceneWorld  # noqa: E402
from bevnext.data.transforms import BEVAug  # noqa: E402
from bevnext.structures.boxes import box_corners  # noqa: E402
from bevnext.structures.sensors import CAMERAS  # noqa: E402

SIZE = (800, 450)
ARGS = {"scenes": 3, "samples_per_scene": 4, "image_size": SIZE, "seed": 3}
CFG = DataConfig(src_size=SIZE)
OUT_OF_IMAGE = -100  # warped id-buffer value outside the source image


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers.


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = generate_dataset(tmp_path_factory.mktemp("geom") / "data", progress=False, **ARGS)
    create_infos(out, gen.VERSION, progress=False)
    return Path(out)


@pytest.fixture(scope="module")
def worlds() -> dict[str, SceneWorld]:
    spec = gen.validate_args(ARGS["scenes"], ARGS["samples_per_scene"], SIZE, ARGS["seed"], 2, 0.25)
    return {w.name: w for w in (spec.world(i) for i in range(spec.scenes))}


class Renders:
    """Cached renderings per (scene, camera, timestamp)."""

    def __init__(self, worlds: dict[str, SceneWorld]) -> None:
        self.worlds = worlds
        self.renderers: dict[str, dict[str, CameraRenderer]] = {}
        self.cache: dict[tuple, RenderResult] = {}

    def renderer(self, scene: str, cam: str) -> CameraRenderer:
        if scene not in self.renderers:
            world = self.worlds[scene]
            texture = GroundTexture(world.road, world.texture_seed, world.ground_gain)
            self.renderers[scene] = {
                c.channel: CameraRenderer(world, i, texture) for i, c in enumerate(world.rig.cameras)
            }
        return self.renderers[scene][cam]

    def render(self, scene: str, cam: str, ts: int) -> RenderResult:
        key = (scene, cam, ts)
        if key not in self.cache:
            self.cache[key] = self.renderer(scene, cam).render(ts)
        return self.cache[key]

    def render_frozen(self, scene: str, cam: str, ts: int, objects_ts: int) -> RenderResult:
        """Camera at time ``ts`` (its ego pose), objects where they were at ``objects_ts``."""
        key = (scene, cam, ts, objects_ts)
        if key not in self.cache:
            world = self.worlds[scene]
            pose = world.ego.pose(world.timeline.seconds(ts))
            centres = world.objects.centres(world.timeline.seconds(objects_ts))
            self.cache[key] = self.renderer(scene, cam).render_at(pose, centres)
        return self.cache[key]

    def cam2global(self, scene: str, cam: str, ts: int):
        world = self.worlds[scene]
        return self.renderer(scene, cam).cam2global(world.ego.pose(world.timeline.seconds(ts)))


@pytest.fixture(scope="module")
def renders(worlds: dict[str, SceneWorld]) -> Renders:
    return Renders(worlds)


def _dataset(root: Path, split: str, train: bool, cfg: DataConfig = CFG) -> BEVDataset:
    return BEVDataset(root / f"bevnext_infos_{split}.json", root, cfg, train=train, seed=11)


def _aug_matrix(sample: dict, f: int, n: int) -> np.ndarray:
    """(3, 3) original -> augmented pixels, from the sample's post_rot / post_trans."""
    m = np.eye(3)
    m[:2, :2] = sample.cams.post_rot[0][f, n, :2, :2].double().numpy()
    m[:2, 2] = sample.cams.post_trans[0][f, n, :2].double().numpy()
    return m


def _warp_nearest(buf: np.ndarray, m: np.ndarray, out_hw: tuple[int, int], fill: float) -> np.ndarray:
    """Nearest-neighbour warp of a source buffer into the augmented image: output pixel (x, y) shows the
    source pixel containing ``m^-1 (x + 0.5, y + 0.5)``."""
    out_h, out_w = out_hw
    inv = np.linalg.inv(m)
    ys, xs = np.mgrid[0:out_h, 0:out_w] + 0.5
    su = np.floor(inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]).astype(np.int64)
    sv = np.floor(inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]).astype(np.int64)
    ok = (su >= 0) & (su < buf.shape[1]) & (sv >= 0) & (sv < buf.shape[0])
    out = np.full((out_h, out_w, *buf.shape[2:]), fill, dtype=buf.dtype)
    out[ok] = buf[sv[ok], su[ok]]
    return out


def _warp_error(rgb: np.ndarray, m: np.ndarray, image: np.ndarray, shown: np.ndarray) -> float:
    """Mean |image - rgb warped by m (nearest)| over the ``shown`` pixels of the augmented image."""
    warped = _warp_nearest(rgb, m, image.shape[:2], 0).astype(np.float64)
    return float(np.abs(image[shown] - warped[shown]).mean())


def _object_of_boxes(sample: dict, info: dict, world: SceneWorld) -> np.ndarray:
    """World object index of each batch box (boxes moved back through bda^-1, to global, matched at LiDAR time)."""
    boxes = sample.gt_boxes.double().numpy()
    bda_inv = np.linalg.inv(sample.cams.bda[0].double().numpy())
    centres = key_ego2global(info).apply(boxes[:, :3] @ bda_inv.T)
    objs = world.objects.centres(world.timeline.seconds(info["timestamp"]))
    dist = np.linalg.norm(centres[:, None, :] - objs[None, :, :], axis=2)
    k = dist.argmin(axis=1)
    assert np.all(dist[np.arange(k.size), k] < 2e-3), "a ground-truth box matches no world object"
    return k


def _moved(boxes: np.ndarray, dt: float) -> np.ndarray:
    """Boxes (M, 9) with centres moved by their velocity over ``dt`` seconds."""
    out = boxes.copy()
    out[:, 0:2] += dt * boxes[:, 7:9]
    return out


def _inside(points: np.ndarray, box: np.ndarray, margin: float) -> np.ndarray:
    """(P,) points inside one box [x, y, z, l, w, h, yaw, ...] enlarged by ``margin``."""
    rel = points - box[:3]
    c, s = np.cos(box[6]), np.sin(box[6])
    x, y = rel[:, 0] * c + rel[:, 1] * s, -rel[:, 0] * s + rel[:, 1] * c
    half = 0.5 * box[3:6] + margin
    return (np.abs(x) <= half[0]) & (np.abs(y) <= half[1]) & (np.abs(rel[:, 2]) <= half[2])


def _project(sample: dict, f: int, n: int, points_aug: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points of the BEV-augmented key frame -> augmented image (u, v) and camera depth, with the batch's matrices."""
    as64 = lambda t: t.double().numpy()  # noqa: E731
    key = points_aug @ np.linalg.inv(as64(sample.cams.bda[0])).T
    rot, trans = as64(sample.cams.cam2key_rot[0][f, n]), as64(sample.cams.cam2key_trans[0][f, n])
    cam = (key - trans) @ rot  # R^T (p - t)
    pix = cam @ as64(sample.cams.intrinsics[0][f, n]).T
    uv = pix[:, :2] / pix[:, 2:3]
    m = _aug_matrix(sample, f, n)
    return uv @ m[:2, :2].T + m[:2, 2], cam[:, 2]


def _lift(sample: dict, f: int, n: int, uv: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """The Batch docstring's lift: bda @ (R @ K^-1 @ (d * post_rot^-1 @ ([u, v, 1] - post_trans)) + t)."""
    as64 = lambda t: t.double().numpy()  # noqa: E731
    homog = np.concatenate([uv, np.ones((uv.shape[0], 1))], axis=1) - as64(sample.cams.post_trans[0][f, n])
    img = homog @ np.linalg.inv(as64(sample.cams.post_rot[0][f, n])).T
    cam = (depth[:, None] * img) @ np.linalg.inv(as64(sample.cams.intrinsics[0][f, n])).T
    key = cam @ as64(sample.cams.cam2key_rot[0][f, n]).T + as64(sample.cams.cam2key_trans[0][f, n])
    return key @ as64(sample.cams.bda[0]).T


def _augmented_samples(ds: BEVDataset, epochs: int):
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            yield ds[i]


# ------------------------------------------------------------------------------------------------
# BEV augmentation: boxes and points transform consistently.


@pytest.mark.parametrize("flip_x", [False, True])
@pytest.mark.parametrize("flip_y", [False, True])
def test_bev_aug_moves_boxes_like_their_points(flip_x: bool, flip_y: bool):
    """A box transformed by ``BEVAug.apply_boxes`` has exactly the transformed corners, the transformed
    heading point (centre + l/2 along the heading) and the transformed motion (tolerance 1e-9 m)."""
    rng = np.random.default_rng(0)
    boxes = np.concatenate(
        [rng.uniform(-40, 40, (50, 2)), rng.uniform(-2, 2, (50, 1)), rng.uniform(0.5, 10, (50, 3)),
         rng.uniform(-np.pi, np.pi, (50, 1)), rng.uniform(-15, 15, (50, 2))], axis=1
    )
    aug = BEVAug(rotate_deg=float(rng.uniform(-22.5, 22.5)), scale=1.04, flip_x=flip_x, flip_y=flip_y)
    out = aug.apply_boxes(boxes)
    m = aug.matrix()
    expected = aug.apply_points(box_corners(boxes))  # (M, 8, 3)
    got = box_corners(out)
    # Mirroring reverses the corner order; compare as sets.
    dist = np.linalg.norm(expected[:, :, None, :] - got[:, None, :, :], axis=-1).min(axis=2)
    assert dist.max() < 1e-9
    heading = boxes[:, :3] + 0.5 * boxes[:, 3:4] * np.stack(
        [np.cos(boxes[:, 6]), np.sin(boxes[:, 6]), np.zeros(50)], axis=1)
    heading_out = out[:, :3] + 0.5 * out[:, 3:4] * np.stack(
        [np.cos(out[:, 6]), np.sin(out[:, 6]), np.zeros(50)], axis=1)
    np.testing.assert_allclose(heading_out, aug.apply_points(heading), atol=1e-9)
    later = boxes[:, :3] + 0.5 * np.concatenate([boxes[:, 7:9], np.zeros((50, 1))], axis=1)
    np.testing.assert_allclose(out[:, :3] + 0.5 * np.concatenate([out[:, 7:9], np.zeros((50, 1))], axis=1),
                               aug.apply_points(later), atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(m), aug.scale**3 * (-1) ** (flip_x + flip_y))


# ------------------------------------------------------------------------------------------------
# (a) Projection of boxes onto the rendered objects.


def test_projected_boxes_land_on_rendered_objects(root: Path, worlds, renders: Renders):
    """Centres and interior points (corners of the box shrunk to half size) of every ground-truth box, projected
    with the batch's bda^-1, extrinsics, intrinsics and post_rot / post_trans, land on that object in the
    renderer's id buffer warped by the same augmentation; and the canvas is the rendering warped by it.

    Tolerances: the module docstring's (a).
    """
    ds = _dataset(root, "synth_train", train=True)
    checked = flipped = bda_flipped = rotated = 0
    for sample in _augmented_samples(ds, epochs=4):
        info = ds.infos[sample.meta["sample_index"]]
        scene, world = info["scene_name"], worlds[info["scene_name"]]
        t_lidar = world.timeline.seconds(info["timestamp"])
        objects = _object_of_boxes(sample, info, world)
        boxes = sample.gt_boxes.double().numpy()
        half = boxes.copy()
        half[:, 3:6] *= 0.5
        local = np.concatenate([boxes[:, None, :3], box_corners(half)], axis=1)  # (M, 9, 3) in the aug frame
        bda = sample.cams.bda[0].double().numpy()
        # One flip reverses orientation; both flips make a rotation by ~180 degrees (|BDA rotation| <= 22.5).
        bda_flipped += np.linalg.det(bda) < 0 or bda[0, 0] < 0
        for n, cam in enumerate(CAMERAS):
            m = _aug_matrix(sample, 0, n)
            flipped += np.linalg.det(m[:2, :2]) < 0
            rotated += abs(m[0, 1]) > 1e-3
            ts = info["cams"][cam]["timestamp"]
            t_cam = world.timeline.seconds(ts)
            result = renders.render(scene, cam, ts)
            ids_aug = _warp_nearest(result.ids, m, CFG.input_size, OUT_OF_IMAGE)

            # The image is the rendering warped by this matrix (JPEG and interpolation aside), and better aligned
            # with it than with the same warp shifted by one output pixel in any direction.
            canvas = sample.images[0, n].numpy().astype(np.float64)  # what becomes the batch's canvas
            shown = (canvas.sum(axis=2) > 0) & (ids_aug != OUT_OF_IMAGE)
            assert shown.mean() > 0.6
            aligned = _warp_error(result.rgb, m, canvas, shown)
            assert aligned < 6.0, (cam, sample.meta["token"], aligned)
            if sample.meta["epoch"] < 2:
                for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    shifted = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]]) @ m
                    assert aligned < _warp_error(result.rgb, shifted, canvas, shown), (cam, dx, dy)

            # Truth: the same interior points on the world's box at the camera time, through the renderer's camera.
            wb = world.objects.boxes(t_cam)[objects]  # (M, 7) global
            rel = box_corners(np.concatenate([np.zeros((len(wb), 3)), 0.5 * wb[:, 3:6], wb[:, 6:7]], axis=1))
            truth_global = np.concatenate([wb[:, None, :3], rel + wb[:, None, :3]], axis=1)
            cam2global = renders.cam2global(scene, cam, ts)
            truth_cam = cam2global.inverse().apply(truth_global.reshape(-1, 3))
            k_mat = renders.renderer(scene, cam).calib.intrinsic
            with np.errstate(divide="ignore", invalid="ignore"):
                truth_uv = (truth_cam @ k_mat.T)[:, :2] / truth_cam[:, 2:3]

            moved = local + (t_cam - t_lidar) * np.concatenate(
                [boxes[:, None, 7:9], np.zeros((len(boxes), 1, 1))], axis=2)
            # The batch's points are the world's points: BEV flips reorder corners, so pair them by position
            # (this is also a 3D check of the box transform: within 5 mm).
            tested_global = key_ego2global(info).apply(moved @ np.linalg.inv(bda).T)
            gap = np.linalg.norm(truth_global[:, :, None, :] - tested_global[:, None, :, :], axis=-1)  # (M, 9, 9)
            pair = gap.argmin(axis=2)
            assert gap.min(axis=2).max() < 5e-3
            moved = np.take_along_axis(moved, pair[:, :, None], axis=1)
            uv, depth = _project(sample, 0, n, moved.reshape(-1, 3))
            obj = np.repeat(objects, 9)
            for p in range(uv.shape[0]):
                if truth_cam[p, 2] < 1.0 or depth[p] < 1.0:
                    continue
                c0, r0 = int(np.floor(truth_uv[p, 0])), int(np.floor(truth_uv[p, 1]))
                if not (2 <= c0 < SIZE[0] - 2 and 2 <= r0 < SIZE[1] - 2):
                    continue
                if not np.all(result.ids[r0 - 2 : r0 + 3, c0 - 2 : c0 + 3] == obj[p]):
                    continue  # occluded, at a silhouette edge, or too small to test
                col, row = int(np.floor(uv[p, 0])), int(np.floor(uv[p, 1]))
                if not (0 <= col < CFG.input_size[1] and 0 <= row < CFG.input_size[0]):
                    continue  # cropped away
                assert ids_aug[row, col] == obj[p], (sample.meta["token"], cam, p, ids_aug[row, col], obj[p])
                checked += 1
    n_views = 4 * len(ds) * len(CAMERAS)
    assert checked > 300
    assert 0 < flipped < n_views and 0 < rotated and 0 < bda_flipped


# ------------------------------------------------------------------------------------------------
# (b) Depth targets.


def test_depth_targets_match_rendered_depth(root: Path, worlds, renders: Renders):
    """Depth targets agree with the renderer's depth buffer warped by the same augmentation, and on the
    ground with the analytic ray / plane depth (tolerances: the module docstring's (b))."""
    ds = _dataset(root, "synth_train", train=True)
    rel_err = []
    ground_ok = ground_total = edge = 0
    for sample in _augmented_samples(ds, epochs=2):
        info = ds.infos[sample.meta["sample_index"]]
        scene = info["scene_name"]
        for n, cam in enumerate(CAMERAS):
            target = sample.gt_depth[n].numpy()
            rows, cols = np.nonzero(target)
            assert rows.size > 100
            d = target[rows, cols].astype(np.float64)
            assert d.min() >= CFG.depth_range[0] and d.max() < CFG.depth_range[1]
            m = _aug_matrix(sample, 0, n)
            ts = info["cams"][cam]["timestamp"]
            # The LiDAR saw the objects at its own time; the pipeline compensates the ego motion to the camera's
            # time, not the objects' motion. So the truth is the camera's view of the world frozen at LiDAR time.
            result = renders.render_frozen(scene, cam, ts, info["timestamp"])
            depth_aug = _warp_nearest(result.depth, m, CFG.input_size, np.nan)
            ids_aug = _warp_nearest(result.ids, m, CFG.input_size, OUT_OF_IMAGE)
            # Sky (inf) or outside the image (nan) at the pixel centre: a point near an object's top or the image
            # border whose pixel centre ray misses what the point lies on. Rare edge cases, counted.
            seen = depth_aug[rows, cols].astype(np.float64)
            finite = np.isfinite(seen)
            edge += int((~finite).sum())
            rel_err.append(np.abs(d[finite] - seen[finite]) / d[finite])

            # Ground pixels: analytic depths at the pixel's corners bound the target.
            pad = np.pad(ids_aug, 1, constant_values=OUT_OF_IMAGE)
            all_ground = np.ones(rows.size, dtype=bool)
            for dr in (0, 1, 2):
                for dc in (0, 1, 2):
                    all_ground &= pad[rows + dr, cols + dc] == GROUND
            gr, gc, gd = rows[all_ground], cols[all_ground], d[all_ground]
            corners = np.stack([np.stack([gc + a, gr + b], axis=1) for a in (0, 1) for b in (0, 1)])  # (4, P, 2)
            inv = np.linalg.inv(m)
            src = corners @ inv[:2, :2].T + inv[:2, 2]
            k_inv = np.linalg.inv(renders.renderer(scene, cam).calib.intrinsic)
            cam2global = renders.cam2global(scene, cam, ts)
            rays = np.concatenate([src, np.ones((*src.shape[:2], 1))], axis=2) @ k_inv.T  # optical, z = 1
            dz = rays @ cam2global.rotation[2]
            with np.errstate(divide="ignore"):
                analytic = np.where(dz < 0, -cam2global.translation[2] / dz, np.inf)
            ok = (gd >= analytic.min(axis=0) - 0.02) & (gd <= analytic.max(axis=0) + 0.02)
            ground_ok += int(ok.sum())
            ground_total += ok.size
    rel_err = np.concatenate(rel_err)
    print(f"depth targets: {rel_err.size} compared, {edge} at sky / border pixels; relative error median "
          f"{np.median(rel_err):.4f}, 90 % {np.percentile(rel_err, 90):.4f}; ground {ground_ok} / {ground_total}")
    assert edge <= 0.005 * rel_err.size
    assert np.median(rel_err) < 0.005 and np.mean(rel_err < 0.02) > 0.9
    assert ground_total > 5000 and ground_ok >= 0.999 * ground_total, (ground_ok, ground_total)


# ------------------------------------------------------------------------------------------------
# (c) Lift into the BEV-augmented key frame, history frames included.


def test_lifted_object_pixels_land_in_their_boxes(root: Path, worlds, renders: Renders):
    """Pixels of an annotated object, lifted with the batch's matrices at the renderer's depth, lie inside the
    object's BEV-augmented box moved to the camera's time (key and previous frames; tolerance 2 cm)."""
    cfg = dataclasses.replace(CFG, num_prev_frames=2)
    ds = _dataset(root, "synth_train", train=True, cfg=cfg)
    rng = np.random.default_rng(0)
    checked = checked_history = 0
    for sample in _augmented_samples(ds, epochs=2):
        i = sample.meta["sample_index"]
        info = ds.infos[i]
        scene, world = info["scene_name"], worlds[info["scene_name"]]
        t_lidar = world.timeline.seconds(info["timestamp"])
        objects = _object_of_boxes(sample, info, world)
        boxes = sample.gt_boxes.double().numpy()
        for f, j in enumerate(ds.frame_indices[i]):
            if f > 0 and j == i:
                continue  # a repeated key frame: nothing new
            for n, cam in enumerate(CAMERAS):
                ts = ds.infos[j]["cams"][cam]["timestamp"]
                result = renders.render(scene, cam, ts)
                m = _aug_matrix(sample, f, n)
                for b, k in enumerate(objects):
                    rows, cols = np.nonzero(result.ids == k)
                    if rows.size == 0:
                        continue
                    pick = rng.choice(rows.size, size=min(rows.size, 40), replace=False)
                    rows, cols = rows[pick], cols[pick]
                    # The output position of each source pixel centre: exactly where that ray is in the input.
                    uv = np.stack([cols + 0.5, rows + 0.5], axis=1) @ m[:2, :2].T + m[:2, 2]
                    inside = (uv[:, 0] >= 0) & (uv[:, 0] < cfg.input_size[1]) & (uv[:, 1] >= 0)
                    inside &= uv[:, 1] < cfg.input_size[0]
                    if not inside.any():
                        continue
                    depth = result.depth[rows[inside], cols[inside]].astype(np.float64)
                    points = _lift(sample, f, n, uv[inside], depth)
                    box = _moved(boxes[b : b + 1], world.timeline.seconds(ts) - t_lidar)[0]
                    assert _inside(points, box, 0.02).all(), (sample.meta["token"], f, cam, int(k))
                    checked += points.shape[0]
                    checked_history += points.shape[0] if f > 0 else 0
    assert checked > 5000 and checked_history > 1000


# ------------------------------------------------------------------------------------------------
# (d) Scene starts repeat the key frame.


def test_scene_start_repeats_the_key_frame(root: Path):
    """Stage-2 history (8 previous frames): frame k is the sample k steps back in the same scene, the key
    sample where the scene has none; at a scene's first sample all nine frames are the key frame."""
    cfg = dataclasses.replace(CFG, num_prev_frames=8)
    ds = _dataset(root, "synth_train", train=False, cfg=cfg)
    infos = ds.infos
    firsts = 0
    for i, info in enumerate(infos):
        # The reference's rule: index - k, and the current sample when that is before the file or another scene.
        expected = [i] + [
            i - k if i - k >= 0 and infos[i - k]["scene_token"] == info["scene_token"] else i for k in range(1, 9)
        ]
        assert ds.frame_indices[i] == expected
        if i == 0 or infos[i - 1]["scene_token"] != info["scene_token"]:
            firsts += 1
            sample = ds[i]
            assert sample.meta["frame_tokens"] == [info["token"]] * 9
            per_frame = {"images": sample.images}
            per_frame.update({k: getattr(sample.cams, k)[0] for k in ("cam2key_rot", "cam2key_trans", "intrinsics",
                                                                        "post_rot", "post_trans")})
            for key, value in per_frame.items():
                for f in range(1, 9):
                    assert torch.equal(value[f], value[0]), key
    assert firsts == 2
    # A later sample: distinct history frames, each with its own images and extrinsics.
    i = next(i for i in range(len(infos)) if ds.frame_indices[i][1] != i and ds.frame_indices[i][2] != i)
    sample = ds[i]
    assert not torch.equal(sample.images[1], sample.images[0])
    assert not torch.equal(sample.cams.cam2key_trans[0][1], sample.cams.cam2key_trans[0][0])
    assert torch.equal(sample.images[3], sample.images[0]) == (ds.frame_indices[i][3] == i)
