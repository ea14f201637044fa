"""Camera images by ray casting: ground plane, solid oriented boxes, sky, with a z-buffer.

Pixel convention: pixel (column ``c``, row ``r``) is the square ``[c, c + 1) x [r, r + 1)`` of
image coordinates and is rendered with the ray through its centre ``(c + 0.5, r + 0.5)``. A 3D
point that projects with the intrinsics to ``(u, v)`` therefore lands in pixel column
``floor(u)``, row ``floor(v)``; the pixel's colour is that of the nearest surface on its centre ray.

Depth is camera depth (the optical z coordinate, metres), not distance along the ray: the ray
through pixel ``(u, v)`` has optical direction ``K^-1 [u, v, 1]`` whose z component is 1, so its
ray parameter is the depth. Sky pixels have depth ``inf``.

Speed. The ego is yaw-only on the ground plane z = 0, so each camera's ray directions in the ego
frame, and hence the ground hit of every pixel (in ego coordinates), its depth and its fog, are
constants of the camera: ``CameraRenderer`` computes them once per scene. Per image only the ego
pose changes the ground's texture lookup. Boxes are tested only against the pixels of their
projected bounding rectangle (the rectangle of the corners, or of the box clipped to the near
plane when it straddles the camera plane), with ray directions in the box frame formed as outer
sums of a per-column and a per-row term, and are drawn front to back so that few pixels are
shaded twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevnext.structures.transforms import RigidTransform
from bevnext.synth import world as W
from bevnext.synth.ground import HALF_WIDTH, PERIOD, RES, TILE_L, TILE_S, GroundTexture
from bevnext.synth.raycast import slab_interval

GROUND = -1
"""Object-id buffer value of ground pixels."""
SKY = -2
"""Object-id buffer value of sky pixels."""
NEAR = 0.05
"""Near plane (m): box parts closer to the camera plane than this are clipped for culling."""
FOG_DISTANCE = 300.0
"""Depth (m) at which the haze covers 1 - 1/e of a surface's colour."""
_GROUND_CLAMP = 1500.0
"""Ground hits further than this (m, near the horizon, fully hazed) are looked up as if at this range."""

_CORNER_SIGNS = np.array(
    [[1, 1, -1], [-1, 1, -1], [-1, -1, -1], [1, -1, -1], [1, 1, 1], [-1, 1, 1], [-1, -1, 1], [1, -1, 1]],
    dtype=np.float64,
)
_EDGES = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4], [0, 4], [1, 5], [2, 6],
                   [3, 7]])
_SKIN = np.array([0.80, 0.62, 0.50], dtype=np.float32)


@dataclass(frozen=True)
class RenderResult:
    """One rendered camera image.

    Attributes:
        rgb: (H, W, 3) uint8 image.
        depth: (H, W) float32 camera depth in metres (``inf`` for sky).
        ids: (H, W) int32 index of the object seen in each pixel (into the scene's ``ObjectSet``),
            ``GROUND`` or ``SKY``.
    """

    rgb: np.ndarray
    depth: np.ndarray
    ids: np.ndarray


def box_corners_global(centres: np.ndarray, size: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """(N, 8, 3) corners of yawed boxes (same corner order as ``structures.boxes.box_corners``).

    Args:
        centres: (N, 3) gravity centres.
        size: (N, 3) ``(l, w, h)``.
        yaw: (N,) headings.
    """
    local = _CORNER_SIGNS[None] * (0.5 * size)[:, None, :]
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    x = local[..., 0] * c - local[..., 1] * s
    y = local[..., 0] * s + local[..., 1] * c
    return np.stack([x, y, local[..., 2]], axis=-1) + centres[:, None, :]


class CameraRenderer:
    """Renders one camera of one scene; holds the per-camera constants.

    Args:
        world: the scene.
        camera_index: index into ``world.rig.cameras``.
        texture: the scene's ground texture.
    """

    def __init__(self, world: W.SceneWorld, camera_index: int, texture: GroundTexture) -> None:
        calib = world.rig.cameras[camera_index]
        self.world = world
        self.calib = calib
        self.texture = texture
        k = calib.intrinsic
        self.width, self.height = calib.width, calib.height
        self.fx, self.fy, self.cx, self.cy = float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2])
        # Optical ray directions through pixel centres: (xs[c], ys[r], 1).
        self.xs = (np.arange(self.width) + 0.5 - self.cx) / self.fx
        self.ys = (np.arange(self.height) + 0.5 - self.cy) / self.fy
        self.xs32 = self.xs.astype(np.float32)
        self.ys32 = self.ys.astype(np.float32)

        rot, trans = calib.sensor2ego.rotation, calib.sensor2ego.translation
        dirs = [rot[i, 0] * self.xs[None, :] + rot[i, 1] * self.ys[:, None] + rot[i, 2] for i in range(3)]
        dex, dey, dez = dirs  # (H, W) ego-frame directions
        ground = dez < -1e-12
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = np.where(ground, -trans[2] / dez, np.inf)
        self.ground_depth = depth.astype(np.float32)
        self.base_ids = np.where(ground, GROUND, SKY).astype(np.int32)

        # Sky: a gradient from haze at the horizon to blue at the zenith, by ray elevation.
        elev = dez / np.sqrt(dex**2 + dey**2 + dez**2)
        w = np.clip(elev / 0.35, 0.0, 1.0)[..., None] ** 0.7
        sky = world.sky_horizon[None, None, :] * (1 - w) + world.sky_zenith[None, None, :] * w
        self.background = np.clip(sky * 255.0, 0, 255).astype(np.uint8)

        # The ground block: rows from the first one that has ground down to the bottom.
        rows_with_ground = np.flatnonzero(ground.any(axis=1))
        self.row0 = int(rows_with_ground[0]) if rows_with_ground.size else self.height
        g = ground[self.row0 :]
        d = np.where(g, depth[self.row0 :], 0.0)
        ex = trans[0] + d * dex[self.row0 :]
        ey = trans[1] + d * dey[self.row0 :]
        rng_ = np.hypot(ex, ey)
        scale = np.minimum(1.0, _GROUND_CLAMP / np.maximum(rng_, 1e-9))
        self.ground_ex = (ex * scale).astype(np.float32)
        self.ground_ey = (ey * scale).astype(np.float32)
        fog = np.where(g, 1.0 - np.exp(-d / FOG_DISTANCE), 1.0)
        self.fog_keep = np.floor(256.0 * (1.0 - fog))[..., None].astype(np.uint16)
        self.fog_add = np.floor(256.0 * fog[..., None] * np.clip(world.sky_horizon * 255.0, 0, 255)).astype(
            np.uint16
        )
        self.sky_in_block = np.flatnonzero(~g)
        self.haze = world.sky_horizon.astype(np.float32)

        # Frustum planes through the camera centre (unit normals pointing out of the view), used to
        # cull bounding spheres.
        a_right = (self.width - self.cx) / self.fx
        a_left = self.cx / self.fx
        a_down = (self.height - self.cy) / self.fy
        a_up = self.cy / self.fy
        planes = np.array(
            [[1.0, 0.0, -a_right], [-1.0, 0.0, -a_left], [0.0, 1.0, -a_down], [0.0, -1.0, -a_up]]
        )
        self.planes = planes / np.linalg.norm(planes, axis=1, keepdims=True)

    # ------------------------------------------------------------------------------------------

    def render(self, timestamp_us: int) -> RenderResult:
        """Render the camera at an absolute timestamp (ego pose and objects at that time).

        Args:
            timestamp_us: capture time, microseconds since the epoch.

        Returns:
            The image with its depth and object-id buffers.
        """
        t = self.world.timeline.seconds(timestamp_us)
        ego2global = self.world.ego.pose(t)
        return self.render_at(ego2global, self.world.objects.centres(t))

    def cam2global(self, ego2global: RigidTransform) -> RigidTransform:
        """camera -> global for an ego pose."""
        return ego2global @ self.calib.sensor2ego

    def render_at(self, ego2global: RigidTransform, centres: np.ndarray) -> RenderResult:
        """Render with an explicit ego pose and object centres.

        Args:
            ego2global: ego pose at the capture time.
            centres: (N, 3) global object centres at the capture time.
        """
        rgb = np.empty((self.height, self.width, 3), dtype=np.uint8)
        rgb[: self.row0] = self.background[: self.row0]
        depth = self.ground_depth.copy()
        ids = self.base_ids.copy()
        if self.row0 < self.height:
            self._draw_ground(rgb, ego2global)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            self._draw_objects(rgb, depth, ids, self.cam2global(ego2global), centres)
        return RenderResult(rgb=rgb, depth=depth, ids=ids)

    # ------------------------------------------------------------------------------------------

    def _draw_ground(self, rgb: np.ndarray, ego2global: RigidTransform) -> None:
        road = self.world.road
        pos = ego2global.translation[:2]
        s_ego, l_ego = road.to_road(pos)
        yaw = float(np.arctan2(ego2global.rotation[1, 0], ego2global.rotation[0, 0]))
        delta = road.heading - yaw
        c, s = np.cos(delta) / RES, np.sin(delta) / RES
        # Texel coordinates; the s offset keeps values positive (the tile repeats every PERIOD).
        s_off = (float(s_ego) % PERIOD + 64.0 * PERIOD) / RES
        l_off = (float(l_ego) + HALF_WIDTH) / RES
        ex, ey = self.ground_ex, self.ground_ey
        si = (ex * np.float32(c) + ey * np.float32(s) + np.float32(s_off)).astype(np.int32)
        si &= TILE_S - 1
        li = (ey * np.float32(c) - ex * np.float32(s) + np.float32(l_off)).astype(np.int32)
        np.clip(li, 0, TILE_L - 1, out=li)
        li *= TILE_S
        li += si
        tex = self.texture.rgb[li]  # (hb, W, 3)
        blended = tex.astype(np.uint16)
        blended *= self.fog_keep
        blended += self.fog_add
        blended >>= 8
        block = rgb[self.row0 :]
        block[...] = blended
        if self.sky_in_block.size:
            flat = block.reshape(-1, 3)
            flat[self.sky_in_block] = self.background[self.row0 :].reshape(-1, 3)[self.sky_in_block]

    def _rects(self, cam_corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel rectangles [c0, c1) x [r0, r1) that contain each box's projection.

        Args:
            cam_corners: (M, 8, 3) corners in the camera frame.

        Returns:
            ``(rects, ok)``: (M, 4) int64 ``c0, c1, r0, r1`` and (M,) bool non-empty.
        """
        z = cam_corners[..., 2]
        front = z > NEAR
        all_front = front.all(axis=1)
        any_front = front.any(axis=1)
        m = cam_corners.shape[0]
        bounds = np.zeros((m, 4))  # umin, umax, vmin, vmax
        if all_front.any():
            pc = cam_corners[all_front]
            u = self.fx * pc[..., 0] / pc[..., 2] + self.cx
            v = self.fy * pc[..., 1] / pc[..., 2] + self.cy
            bounds[all_front] = np.stack([u.min(1), u.max(1), v.min(1), v.max(1)], axis=1)
        for i in np.flatnonzero(any_front & ~all_front):
            # Straddles the camera plane: bound the part in front of the near plane, whose vertices
            # are the corners in front plus the edge crossings of the near plane.
            pc = cam_corners[i]
            a, b = pc[_EDGES[:, 0]], pc[_EDGES[:, 1]]
            za, zb = a[:, 2] - NEAR, b[:, 2] - NEAR
            cross = za * zb < 0
            frac = za[cross] / (za[cross] - zb[cross])
            pts = np.concatenate([pc[front[i]], a[cross] + frac[:, None] * (b[cross] - a[cross])])
            zc = np.maximum(pts[:, 2], NEAR)
            u = self.fx * pts[:, 0] / zc + self.cx
            v = self.fy * pts[:, 1] / zc + self.cy
            bounds[i] = (u.min(), u.max(), v.min(), v.max())
        # Pixel c is covered iff c + 0.5 lies in [umin, umax]; one pixel of slack each side.
        lim = 1e7
        bounds = np.clip(bounds, -lim, lim)
        c0 = np.clip(np.floor(bounds[:, 0] - 0.5) - 1, 0, self.width).astype(np.int64)
        c1 = np.clip(np.ceil(bounds[:, 1] - 0.5) + 2, 0, self.width).astype(np.int64)
        r0 = np.clip(np.floor(bounds[:, 2] - 0.5) - 1, 0, self.height).astype(np.int64)
        r1 = np.clip(np.ceil(bounds[:, 3] - 0.5) + 2, 0, self.height).astype(np.int64)
        ok = any_front & (c1 > c0) & (r1 > r0)
        return np.stack([c0, c1, r0, r1], axis=1), ok

    def _draw_objects(
        self,
        rgb: np.ndarray,
        depth: np.ndarray,
        ids: np.ndarray,
        cam2global: RigidTransform,
        centres: np.ndarray,
    ) -> None:
        objs = self.world.objects
        if len(objs) == 0:
            return
        r_cg, t_cg = cam2global.rotation, cam2global.translation
        cc = (centres - t_cg) @ r_cg  # (N, 3) centres in the camera frame
        radius = 0.5 * np.linalg.norm(objs.size, axis=1)
        visible = (cc @ self.planes.T).max(axis=1) < radius
        visible &= cc[:, 2] > NEAR - radius
        cand = np.flatnonzero(visible)
        if cand.size == 0:
            return
        corners = box_corners_global(centres[cand], objs.size[cand], objs.yaw[cand])
        cam_corners = (corners - t_cg) @ r_cg
        rects, ok = self._rects(cam_corners)
        cand, rects = cand[ok], rects[ok]
        if cand.size == 0:
            return
        order = np.argsort(cc[cand, 2], kind="stable")  # front to back
        cand, rects = cand[order], rects[order]
        # Box-frame rotation of optical directions and box-frame camera origins, for all candidates.
        cy, sy = np.cos(objs.yaw[cand]), np.sin(objs.yaw[cand])
        rbt = np.zeros((cand.size, 3, 3))  # R_box^T
        rbt[:, 0, 0], rbt[:, 0, 1], rbt[:, 1, 0], rbt[:, 1, 1], rbt[:, 2, 2] = cy, sy, -sy, cy, 1.0
        mats = rbt @ r_cg  # optical -> box
        origins = np.einsum("nij,nj->ni", rbt, t_cg[None, :] - centres[cand])
        halves = 0.5 * objs.size[cand]
        for j, k in enumerate(cand):
            c0, c1, r0, r1 = (int(x) for x in rects[j])
            m = mats[j].astype(np.float32)
            col = self.xs32[c0:c1][None, :]
            row = self.ys32[r0:r1][:, None]
            d0 = (row * m[0, 1] + m[0, 2]) + col * m[0, 0]
            d1 = (row * m[1, 1] + m[1, 2]) + col * m[1, 0]
            d2 = (row * m[2, 1] + m[2, 2]) + col * m[2, 0]
            t_in, t_out = slab_interval(d0, d1, d2, origins[j], halves[j])
            dep = depth[r0:r1, c0:c1]
            win = t_in < np.minimum(t_out, dep)
            win &= t_in > 0
            if not win.any():
                continue
            tw = t_in[win]
            dep[win] = tw
            ids[r0:r1, c0:c1][win] = k
            o = origins[j].astype(np.float32)
            p = (o[0] + tw * d0[win], o[1] + tw * d1[win], o[2] + tw * d2[win])
            half32 = halves[j].astype(np.float32)
            rgb[r0:r1, c0:c1][win] = self._object_colours(int(k), p, origins[j], half32, tw)

    def _object_colours(
        self, k: int, p: tuple[np.ndarray, np.ndarray, np.ndarray], origin: np.ndarray, half: np.ndarray,
        depth: np.ndarray,
    ) -> np.ndarray:
        """Colours (n, 3) uint8 of the hit points ``p`` (box-frame components, each (n,)) on object ``k``.

        ``origin`` is the camera centre in the box frame: the camera sees at most one face per axis,
        the one on its side, so the face shading per axis is a constant of the object.
        """
        objs = self.world.objects
        inv = 1.0 / half
        q0, q1, q2 = p[0] * inv[0], p[1] * inv[1], p[2] * inv[2]
        a0, a1 = np.abs(q0), np.abs(q1)
        # The hit face is the axis where the hit point is furthest out (relative to the half size).
        on_x = (a0 >= a1) & (a0 >= np.abs(q2))
        on_z = (np.abs(q2) > a1) & ~on_x
        side = ~on_z
        fs = objs.face_shade[k].astype(np.float32)
        sx, sy, sz = (fs[2 * i + int(origin[i] > 0)] for i in range(3))
        shade = np.where(on_x, sx, np.where(on_z, sz, sy))
        pattern = int(objs.pattern[k])
        second: np.ndarray | None = None
        if pattern in (W.PATTERN_CAR, W.PATTERN_TRUCK, W.PATTERN_BUS, W.PATTERN_PLAIN):
            if pattern == W.PATTERN_CAR:  # windows all round
                second = side & (q2 > 0.12) & (q2 < 0.8) & np.where(on_x, a1 < 0.85, a0 < 0.72)
            elif pattern == W.PATTERN_TRUCK:  # cab windows at the front only
                second = side & (q2 > 0.2) & (q2 < 0.75) & np.where(on_x, (q0 > 0) & (a1 < 0.85),
                                                                    (q0 > 0.6) & (q0 < 0.93))
            elif pattern == W.PATTERN_BUS:  # a long window band
                second = side & (q2 > -0.05) & (q2 < 0.72) & np.where(on_x, a1 < 0.85, a0 < 0.93)
            else:  # trailer: a dark stripe along the sides
                second = side & (q2 > -0.4) & (q2 < -0.3)
            shade[side & (q2 < -0.62)] *= 0.35  # wheels and underbody
        elif pattern == W.PATTERN_PEDESTRIAN:
            second = q2 < -0.08  # trousers
        elif pattern == W.PATTERN_CYCLE:
            shade *= 0.8
            if objs.rider[k]:
                second = q2 > 0.05  # the rider's jacket
            shade[q2 < -0.55] *= 0.3  # wheels
        elif pattern == W.PATTERN_BARRIER:
            second = (((p[1] + half[1]) * (1.0 / 0.35)).astype(np.int32) & 1) == 1  # stripes along it
        elif pattern == W.PATTERN_CONE:
            second = (q2 > -0.05) & (q2 < 0.3)
        # A faint checker of 0.4 m panels on every face (photometric texture for depth/CRF learning):
        # the vertical coordinate and the horizontal one along the face. Offsets keep values positive
        # so truncation is a floor.
        along = np.where(on_x, p[1] + half[1], p[0] + half[0])
        checker = ((p[2] + half[2]) * 2.5).astype(np.int32) + (along * 2.5).astype(np.int32)
        shade *= 1.0 - 0.07 * (checker & 1).astype(np.float32)
        # Haze, as on the ground: colour * (1 - f) + horizon * f.
        fog = 1.0 - np.exp(depth * np.float32(-1.0 / FOG_DISTANCE))
        shade *= 1.0 - fog
        lut = np.stack([objs.colour[k], objs.colour2[k], _SKIN]).astype(np.float32) * 255.0
        sel = np.zeros(shade.shape, dtype=np.int64) if second is None else second.astype(np.int64)
        if pattern == W.PATTERN_PEDESTRIAN:
            sel[q2 > 0.74] = 2  # head
        out = lut[sel]
        out *= shade[:, None]
        out += (self.haze * 255.0) * fog[:, None]
        out += 0.5  # round; every factor is <= 1 so values stay within [0, 255]
        return out.astype(np.uint8)


__all__ = ["GROUND", "SKY", "CameraRenderer", "RenderResult", "box_corners_global"]
