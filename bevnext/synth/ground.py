"""Procedural ground: a texture tile in road coordinates, and the small semantic map PNG of a log.

The ground texture is a raster over road coordinates ``(s, l)`` (see ``world``): ``TILE_S``
texels along the road, repeating every ``PERIOD`` metres (so the road is endless and the tile stays
small), and ``TILE_L`` texels across it covering ``|l| < HALF_WIDTH`` (beyond that the outermost
texel, grass, repeats). Lane markings, kerbs, sidewalk joints and asphalt/grass noise are all baked
into the tile; the camera renderer looks the colour up per ground pixel, the LiDAR caster looks up
an intensity.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bevnext.synth.world import Road

RES = 0.05
"""Texel size, metres."""
TILE_S = 1024
"""Texels along the road (a power of two, so wrapping is a bit mask)."""
PERIOD = RES * TILE_S
"""Repeat length of the texture along the road (51.2 m)."""
HALF_WIDTH = 40.0
"""The tile covers ``-HALF_WIDTH <= l < HALF_WIDTH``."""
TILE_L = int(round(2 * HALF_WIDTH / RES))

_SURFACE_RGB = {
    "lane": (0.30, 0.30, 0.31),
    "bike": (0.50, 0.24, 0.20),
    "parking": (0.35, 0.35, 0.36),
    "curb": (0.66, 0.65, 0.62),
    "sidewalk": (0.60, 0.58, 0.55),
    "grass": (0.27, 0.40, 0.18),
}
_SURFACE_INTENSITY = {"lane": 8.0, "bike": 12.0, "parking": 9.0, "curb": 25.0, "sidewalk": 20.0, "grass": 4.0}
_WHITE = (0.88, 0.88, 0.85)
_YELLOW = (0.85, 0.70, 0.20)
_MARKING_INTENSITY = 90.0

MAP_RES = 1.0
"""Map PNG resolution, metres per pixel."""
MAP_SIZE = 1400
"""Map PNG side, pixels; pixel (row r, column c) covers global x in [c, c + 1), y in [S - r - 1, S - r)."""


class GroundTexture:
    """The ground of one scene as a texture tile.

    Attributes:
        rgb: (TILE_L * TILE_S, 3) uint8 colours, row-major over (l index, s index).
        intensity: (TILE_L * TILE_S,) float32 LiDAR intensities.
    """

    def __init__(self, road: Road, seed: int, gain: float = 1.0) -> None:
        rng = np.random.default_rng(seed)
        lat = -HALF_WIDTH + (np.arange(TILE_L) + 0.5) * RES  # (TILE_L,) texel centres across
        s = (np.arange(TILE_S) + 0.5) * RES  # (TILE_S,) texel centres along

        surface = np.full(TILE_L, "grass", dtype=object)
        for band in road.bands:
            surface[(lat >= band.l_min) & (lat < band.l_max)] = band.surface
        base = np.array([_SURFACE_RGB[k] for k in surface], dtype=np.float32)  # (TILE_L, 3)
        inten = np.array([_SURFACE_INTENSITY[k] for k in surface], dtype=np.float32)

        # Noise: coarse blotches (0.8 m, wrapping along s) plus per-texel grain; stronger on grass.
        coarse = rng.normal(size=(TILE_L // 16 + 1, TILE_S // 16)).astype(np.float32)
        coarse = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:TILE_L]
        grain = rng.normal(size=(TILE_L, TILE_S)).astype(np.float32)
        is_grass = (surface == "grass")[:, None]
        amp_coarse = np.where(is_grass, 0.10, 0.05).astype(np.float32)
        amp_grain = np.where(is_grass, 0.12, 0.06).astype(np.float32)
        shade = 1.0 + amp_coarse * coarse + amp_grain * grain  # (TILE_L, TILE_S)

        rgb = base[:, None, :] * shade[..., None]
        marking = np.zeros((TILE_L, TILE_S), dtype=bool)
        yellow = np.zeros((TILE_L, TILE_S), dtype=bool)
        lat2 = lat[:, None]
        s2 = s[None, :]
        # Double centre line.
        yellow |= ((np.abs(lat2) > 0.06) & (np.abs(lat2) < 0.2)) & np.ones_like(s2, dtype=bool)
        bands = list(road.bands)
        for a, b in zip(bands[:-1], bands[1:]):
            edge = b.l_min  # boundary between consecutive bands
            near = np.abs(lat2 - edge) < 0.075
            if a.surface == "lane" and b.surface == "lane" and a.side == b.side:
                marking |= near & ((s2 % 12.8) < 4.0)  # dashed divider between same-direction lanes
            elif a.surface != b.surface and {a.surface, b.surface} <= {"lane", "bike", "parking"}:
                marking |= near & np.ones_like(s2, dtype=bool)  # solid line between carriageway parts
        for band in bands:
            inside = (lat2 >= band.l_min) & (lat2 < band.l_max)
            if band.surface == "parking":
                marking |= inside & ((s2 % 6.4) < 0.1)  # bay separators
            elif band.surface == "sidewalk":
                joints = ((s2 % 1.6) < 0.04) | (((lat2 - band.l_min) % 1.4) < 0.04)
                rgb[inside & joints] *= 0.8
        rgb[marking] = np.asarray(_WHITE, dtype=np.float32) * (0.95 + 0.05 * shade[marking, None])
        rgb[yellow] = np.asarray(_YELLOW, dtype=np.float32) * (0.95 + 0.05 * shade[yellow, None])
        rgb = np.clip(rgb * (255.0 * gain), 0, 255).astype(np.uint8)

        inten_map = inten[:, None] * (1.0 + 0.3 * grain)
        inten_map[marking | yellow] = _MARKING_INTENSITY
        self.rgb = np.ascontiguousarray(rgb.reshape(-1, 3))
        self.intensity = np.clip(inten_map, 0, 255).astype(np.float32).reshape(-1)

    @staticmethod
    def index(s: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Flat texel index of road coordinates (any shape; ``s`` must be >= 0, any magnitude)."""
        si = (s * (1.0 / RES)).astype(np.int64) & (TILE_S - 1)
        li = np.clip(((lat + HALF_WIDTH) * (1.0 / RES)).astype(np.int64), 0, TILE_L - 1)
        return li * TILE_S + si


def map_png(road: Road) -> bytes:
    """A small semantic map of the road as PNG bytes.

    Grey levels: 255 drivable (lanes, bike lanes, parking), 128 kerb and sidewalk, 0 elsewhere.
    The image covers global x, y in ``[0, MAP_SIZE * MAP_RES)`` with row 0 at the top (largest y).
    """
    centres = (np.arange(MAP_SIZE) + 0.5) * MAP_RES
    gx = centres[None, :]
    gy = centres[::-1, None]
    lat = (gx - road.origin[0]) * road.left[0] + (gy - road.origin[1]) * road.left[1]
    out = np.zeros((MAP_SIZE, MAP_SIZE), dtype=np.uint8)
    for band in road.bands:
        value = 255 if band.surface in ("lane", "bike", "parking") else 128
        out[(lat >= band.l_min) & (lat < band.l_max)] = value
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


__all__ = ["HALF_WIDTH", "PERIOD", "RES", "TILE_L", "TILE_S", "GroundTexture", "map_png"]
