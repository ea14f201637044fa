"""A spinning 32-beam LiDAR, ray-cast against the ground plane and the object boxes.

The sensor is level and yawed only (``camera_rig``), so in its own frame the ground hit of every
ray is a constant of the scene; only the boxes are cast per sweep. Each box is tested against the
rays in its angular bounding window (an azimuth interval from its footprint corners, a beam interval
from conservative elevation bounds), and the nearest hit per ray wins.

Point cloud layout, as nuScenes ``.pcd.bin``: float32 (N, 5) rows ``x, y, z, intensity, ring``
in the ``LIDAR_TOP`` sensor frame (metres). ``ring`` is the beam index, 0 for the lowest beam.
Rays that hit nothing within ``MAX_RANGE`` return no point. The sweep is instantaneous (no
rolling-shutter motion), i.e. already "motion compensated" to its timestamp.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevnext.structures.transforms import RigidTransform
from bevnext.synth.ground import HALF_WIDTH, PERIOD, GroundTexture
from bevnext.synth.raycast import slab_interval
from bevnext.synth.world import SceneWorld

N_BEAMS = 32
ELEVATIONS_DEG = np.linspace(-30.67, 10.67, N_BEAMS)
"""Beam elevations (like an HDL-32E), lowest first."""
N_AZIMUTH = 1000
"""Azimuth steps per revolution."""
MAX_RANGE = 70.0
"""Returns beyond this range (m) are dropped."""


@dataclass(frozen=True)
class LidarScan:
    """One sweep.

    Attributes:
        points: (M, 5) float32 ``x, y, z, intensity, ring`` in the sensor frame.
        point_ids: (M,) int32 object index of each point, -1 for ground.
        hits: (N,) int64 points on each object (its ``num_lidar_pts``).
        unoccluded: (N,) int64 rays that would hit each object within range if nothing occluded it.
    """

    points: np.ndarray
    point_ids: np.ndarray
    hits: np.ndarray
    unoccluded: np.ndarray

    def visibility(self) -> np.ndarray:
        """(N,) fraction of each object's rays not occluded by a nearer object (0 where none)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = self.hits / self.unoccluded
        return np.where(self.unoccluded > 0, frac, 0.0)


class LidarCaster:
    """Casts the LiDAR of one scene.

    Args:
        world: the scene.
        texture: its ground texture (for ground intensities).
    """

    def __init__(self, world: SceneWorld, texture: GroundTexture) -> None:
        self.world = world
        self.texture = texture
        self.sensor2ego = world.rig.lidar.sensor2ego
        self.height = float(self.sensor2ego.translation[2])
        elev = np.deg2rad(ELEVATIONS_DEG)
        self.elev = elev
        self.cos_e = np.cos(elev).astype(np.float32)
        self.sin_e = np.sin(elev).astype(np.float32)
        self.step = 2.0 * np.pi / N_AZIMUTH
        az = np.arange(N_AZIMUTH) * self.step
        dirs = np.stack(
            [np.cos(elev)[:, None] * np.cos(az)[None, :], np.cos(elev)[:, None] * np.sin(az)[None, :],
             np.broadcast_to(np.sin(elev)[:, None], (N_BEAMS, N_AZIMUTH))],
            axis=-1,
        )
        # Azimuth-major order (like a spinning sensor's output): (N_AZIMUTH, N_BEAMS, 3).
        self.dirs_t = np.ascontiguousarray(dirs.transpose(1, 0, 2)).astype(np.float32)
        with np.errstate(divide="ignore"):
            tg = np.where(elev < 0, self.height / -np.sin(elev), np.inf)
        tg = np.where(tg <= MAX_RANGE, tg, np.inf)
        self.ground_t = np.broadcast_to(tg[:, None], (N_BEAMS, N_AZIMUTH)).astype(np.float32)
        self.ring_t = np.broadcast_to(np.arange(N_BEAMS, dtype=np.float32)[None, :], (N_AZIMUTH, N_BEAMS))

    def sensor2global(self, ego2global: RigidTransform) -> RigidTransform:
        """LiDAR -> global for an ego pose."""
        return ego2global @ self.sensor2ego

    def cast(self, timestamp_us: int) -> LidarScan:
        """Cast a sweep at an absolute timestamp (ego pose and objects at that time)."""
        t = self.world.timeline.seconds(timestamp_us)
        return self.cast_at(self.world.ego.pose(t), self.world.objects.centres(t))

    def cast_at(self, ego2global: RigidTransform, centres: np.ndarray) -> LidarScan:
        """Cast a sweep with an explicit ego pose and (N, 3) global object centres."""
        objs = self.world.objects
        n = len(objs)
        l2g = self.sensor2global(ego2global)
        origin = l2g.translation
        yaw_l = float(np.arctan2(l2g.rotation[1, 0], l2g.rotation[0, 0]))
        t_grid = self.ground_t.copy()
        id_grid = np.full((N_BEAMS, N_AZIMUTH), -1, dtype=np.int32)
        unoccluded = np.zeros(n, dtype=np.int64)

        if n:
            rel = centres - origin
            radius_xy = 0.5 * np.hypot(objs.size[:, 0], objs.size[:, 1])
            near = np.hypot(rel[:, 0], rel[:, 1]) < MAX_RANGE + radius_xy
            cl, sl = np.cos(yaw_l), np.sin(yaw_l)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                for k in np.flatnonzero(near):
                    self._cast_box(int(k), rel[k], cl, sl, yaw_l, t_grid, id_grid, unoccluded)

        # Points, azimuth-major.
        t_t = t_grid.T
        ids_t = id_grid.T
        mask = t_t <= MAX_RANGE
        tm = t_t[mask]
        xyz = self.dirs_t[mask] * tm[:, None]
        pid = ids_t[mask]
        intensity = np.empty(tm.shape, dtype=np.float32)
        is_ground = pid < 0
        if is_ground.any():
            g = xyz[is_ground].astype(np.float64)
            gx = origin[0] + l2g.rotation[0, 0] * g[:, 0] + l2g.rotation[0, 1] * g[:, 1]
            gy = origin[1] + l2g.rotation[1, 0] * g[:, 0] + l2g.rotation[1, 1] * g[:, 1]
            s, lat = self.world.road.to_road(np.stack([gx, gy], axis=-1))
            idx = GroundTexture.index(s % PERIOD, np.clip(lat, -HALF_WIDTH, HALF_WIDTH))
            intensity[is_ground] = self.texture.intensity[idx]
        if (~is_ground).any():
            intensity[~is_ground] = objs.intensity[pid[~is_ground]].astype(np.float32)
        points = np.concatenate([xyz, intensity[:, None], self.ring_t[mask][:, None]], axis=1)
        points = points.astype(np.float32, copy=False)
        hits = np.bincount(pid[pid >= 0], minlength=n).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
        return LidarScan(points=points, point_ids=pid, hits=hits, unoccluded=unoccluded)

    def _cast_box(
        self, k: int, rel: np.ndarray, cl: float, sl: float, yaw_l: float, t_grid: np.ndarray,
        id_grid: np.ndarray, unoccluded: np.ndarray,
    ) -> None:
        objs = self.world.objects
        length, width, height = objs.size[k]
        # Box centre in the (level) sensor frame, and the box yaw relative to the sensor.
        cx = cl * rel[0] + sl * rel[1]
        cy = -sl * rel[0] + cl * rel[1]
        cz = rel[2]
        alpha = float(objs.yaw[k]) - yaw_l
        ca, sa = np.cos(alpha), np.sin(alpha)
        # Ray origin (the sensor) in the box frame.
        origin = np.array([-(ca * cx + sa * cy), -(-sa * cx + ca * cy), -cz])
        half = np.array([0.5 * length, 0.5 * width, 0.5 * height])

        # Azimuth window from the footprint corners (exact for a convex footprint not containing us).
        fx = np.array([1.0, -1.0, -1.0, 1.0]) * half[0]
        fy = np.array([1.0, 1.0, -1.0, -1.0]) * half[1]
        px = cx + ca * fx - sa * fy
        py = cy + sa * fx + ca * fy
        az_c = np.arctan2(cy, cx)
        rel_az = (np.arctan2(py, px) - az_c + np.pi) % (2.0 * np.pi) - np.pi
        j0 = int(np.floor((az_c + rel_az.min()) / self.step)) - 1
        j1 = int(np.ceil((az_c + rel_az.max()) / self.step)) + 1
        # Beam window from conservative elevation bounds over the box.
        r_min = np.hypot(max(abs(origin[0]) - half[0], 0.0), max(abs(origin[1]) - half[1], 0.0))
        r_max = float(np.hypot(px, py).max())
        z_bot, z_top = cz - half[2], cz + half[2]
        e_lo = np.arctan2(z_bot, r_min if z_bot < 0 else r_max)
        e_hi = np.arctan2(z_top, r_min if z_top > 0 else r_max)
        b0 = int(np.searchsorted(self.elev, e_lo - 1e-6, side="left"))
        b1 = int(np.searchsorted(self.elev, e_hi + 1e-6, side="right"))
        if b1 <= b0 or j1 < j0:
            return
        js = np.arange(j0, j1 + 1)
        cols = js % N_AZIMUTH
        theta = js * self.step - alpha
        ce = self.cos_e[b0:b1, None]
        dx = ce * np.cos(theta).astype(np.float32)[None, :]
        dy = ce * np.sin(theta).astype(np.float32)[None, :]
        dz = self.sin_e[b0:b1, None]
        t_in, t_out = slab_interval(dx, dy, dz, origin, half)
        hit = (t_in < t_out) & (t_in > 0)
        unoccluded[k] += int(np.count_nonzero(hit & (t_in <= MAX_RANGE)))
        cur = t_grid[b0:b1, cols]
        win = hit & (t_in < cur)
        if not win.any():
            return
        t_grid[b0:b1, cols] = np.where(win, t_in, cur)
        ids = id_grid[b0:b1, cols]
        ids[win] = k
        id_grid[b0:b1, cols] = ids


__all__ = ["ELEVATIONS_DEG", "MAX_RANGE", "N_AZIMUTH", "N_BEAMS", "LidarCaster", "LidarScan"]
