"""Synthetic driving scenes: a straight road, the ego car's path, object tracks and the timeline.

Coordinates. Everything is in the nuScenes *global* frame (metres, z up, ground plane z = 0) unless
named otherwise. Each scene has one straight road; *road coordinates* ``(s, l)`` measure a point
along the road's heading (``s``) and to its left (``l``) from ``Road.origin``. Traffic drives on
the right: lanes with ``l < 0`` carry traffic along +s, lanes with ``l > 0`` against it.

Non-overlap by construction. The road's cross-section is cut into lateral *strips* that do not
overlap (lanes, bike lanes, parking strips, sidewalk sub-lanes). Every object stays inside one
strip for the whole scene, keeps a margin to the strip's edges, and all objects of one strip share
one velocity along the road; so the gaps between them never change and no two objects ever
overlap. The ego drives in its own lane with a gentle lateral weave that stays inside the lane, and
vehicles in the ego lane move at the ego's speed with a reserved gap around the ego.

Motion. Moving objects travel on straight lines at constant velocity (``centre(t) = p0 + v t``),
so a finite difference of two annotations (what ``NuScenes.box_velocity`` computes) returns the
true velocity; static objects have velocity exactly zero. Object yaws never change.

Time. ``t`` in seconds is measured from the scene's ``start_us`` (microseconds since the epoch);
key frames (the LiDAR key sweeps) are 0.5 s apart, each camera fires a few tens of milliseconds
before or after the key time, and ``lidar_sweeps_per_sample`` non-key LiDAR sweeps are spaced
evenly between consecutive key frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bevnext.structures.boxes import CLASSES
from bevnext.structures.transforms import RigidTransform, quat_to_rotmat, yaw_to_quat
from bevnext.synth.camera_rig import Rig, make_rig

KEY_INTERVAL_US = 500_000
"""Key frames at 2 Hz."""

BOX_GROUND_GAP = 0.02
"""Boxes float this far (m) above the ground, so ground returns never fall inside a box enlarged by 1 cm."""

LANE_WIDTH = 3.5
BIKE_WIDTH = 1.6
PARKING_WIDTH = 3.0
CURB_WIDTH = 0.25
SIDEWALK_WIDTH = 4.2
STRIP_MARGIN = 0.06
"""Minimum clearance (m) between an object and its strip's lateral edges."""
MIN_GAP = 0.3
"""Minimum clearance (m) along the strip between objects of different groups."""
WINDOW = 90.0
"""Objects are placed only where they come within this far (along the road) of the ego."""

EGO_REAR = 1.0
EGO_FRONT = 3.9
"""Extent (m) of the ego body behind/ahead of its origin (rear axle)."""
EGO_CLEARANCE = 7.0
"""Free road (m) kept in the ego lane in front of and behind the ego body."""


# ------------------------------------------------------------------------------------------------
# Classes, sizes and looks
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SizeSpec:
    mean: tuple[float, float, float]  # (l, w, h)
    std: tuple[float, float, float]
    low: tuple[float, float, float]
    high: tuple[float, float, float]


# nuScenes-like box sizes (length, width, height in metres) with some spread.
_SIZES: dict[str, _SizeSpec] = {
    "car": _SizeSpec((4.62, 1.95, 1.72), (0.35, 0.10, 0.16), (3.6, 1.65, 1.40), (5.4, 2.15, 2.10)),
    "truck": _SizeSpec((7.20, 2.48, 2.90), (1.20, 0.08, 0.30), (5.2, 2.20, 2.20), (10.0, 2.60, 3.80)),
    "bus": _SizeSpec((11.2, 2.92, 3.45), (0.80, 0.04, 0.15), (9.5, 2.80, 3.00), (12.8, 2.98, 3.90)),
    "trailer": _SizeSpec((10.5, 2.85, 3.60), (1.80, 0.06, 0.30), (6.0, 2.50, 2.50), (13.5, 2.93, 4.20)),
    "construction_vehicle": _SizeSpec((6.40, 2.75, 3.20), (0.90, 0.08, 0.35), (4.5, 2.30, 2.40),
                                      (8.5, 2.90, 4.00)),
    "pedestrian": _SizeSpec((0.72, 0.66, 1.75), (0.07, 0.06, 0.10), (0.55, 0.50, 1.45), (0.85, 0.78, 2.00)),
    "child": _SizeSpec((0.52, 0.50, 1.20), (0.05, 0.05, 0.10), (0.40, 0.40, 0.95), (0.62, 0.60, 1.45)),
    "motorcycle": _SizeSpec((2.10, 0.78, 1.45), (0.18, 0.06, 0.10), (1.7, 0.62, 1.15), (2.5, 0.92, 1.75)),
    "bicycle": _SizeSpec((1.72, 0.60, 1.30), (0.10, 0.06, 0.08), (1.45, 0.48, 1.05), (1.95, 0.75, 1.55)),
    "barrier": _SizeSpec((0.50, 2.45, 0.98), (0.05, 0.25, 0.05), (0.38, 1.80, 0.85), (0.62, 2.90, 1.15)),
    "traffic_cone": _SizeSpec((0.41, 0.41, 1.05), (0.04, 0.04, 0.10), (0.30, 0.30, 0.70), (0.52, 0.52, 1.30)),
}

CLASS_CATEGORY: dict[str, str] = {
    "car": "vehicle.car",
    "truck": "vehicle.truck",
    "construction_vehicle": "vehicle.construction",
    "bus": "vehicle.bus.rigid",
    "trailer": "vehicle.trailer",
    "barrier": "movable_object.barrier",
    "motorcycle": "vehicle.motorcycle",
    "bicycle": "vehicle.bicycle",
    "pedestrian": "human.pedestrian.adult",
    "traffic_cone": "movable_object.trafficcone",
}
"""nuScenes category written for each detection class (children use ``human.pedestrian.child``)."""

# Pattern codes the renderer understands (see render._object_colours).
PATTERN_CAR, PATTERN_TRUCK, PATTERN_BUS, PATTERN_PLAIN, PATTERN_PEDESTRIAN, PATTERN_CYCLE = range(6)
PATTERN_BARRIER, PATTERN_CONE = 6, 7

_PATTERN = {
    "car": PATTERN_CAR,
    "truck": PATTERN_TRUCK,
    "construction_vehicle": PATTERN_TRUCK,
    "bus": PATTERN_BUS,
    "trailer": PATTERN_PLAIN,
    "pedestrian": PATTERN_PEDESTRIAN,
    "motorcycle": PATTERN_CYCLE,
    "bicycle": PATTERN_CYCLE,
    "barrier": PATTERN_BARRIER,
    "traffic_cone": PATTERN_CONE,
}

_GLASS = (0.07, 0.09, 0.11)
_PALETTES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "car": ((0.86, 0.86, 0.87), (0.09, 0.09, 0.10), (0.60, 0.62, 0.65), (0.40, 0.41, 0.43),
            (0.66, 0.10, 0.10), (0.13, 0.23, 0.56), (0.12, 0.32, 0.22), (0.74, 0.67, 0.50)),
    "truck": ((0.90, 0.90, 0.88), (0.88, 0.74, 0.16), (0.18, 0.30, 0.62), (0.70, 0.16, 0.12)),
    "bus": ((0.78, 0.13, 0.11), (0.90, 0.90, 0.90), (0.16, 0.50, 0.28)),
    "trailer": ((0.72, 0.73, 0.74), (0.92, 0.92, 0.92), (0.45, 0.47, 0.50)),
    "construction_vehicle": ((0.93, 0.70, 0.08), (0.95, 0.48, 0.08)),
    "motorcycle": ((0.08, 0.08, 0.09), (0.70, 0.08, 0.08), (0.15, 0.25, 0.60)),
    "bicycle": ((0.15, 0.55, 0.55), (0.10, 0.10, 0.10), (0.85, 0.85, 0.20)),
    "barrier": ((0.82, 0.10, 0.10), (0.95, 0.50, 0.05)),
    "traffic_cone": ((0.97, 0.45, 0.05),),
}
_LIDAR_INTENSITY = {
    "car": 35.0, "truck": 40.0, "construction_vehicle": 55.0, "bus": 38.0, "trailer": 45.0,
    "barrier": 75.0, "motorcycle": 30.0, "bicycle": 25.0, "pedestrian": 18.0, "traffic_cone": 90.0,
}


# ------------------------------------------------------------------------------------------------
# Road and strips
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Band:
    """A lateral band of the road surface, ``l_min <= l < l_max``.

    ``surface`` is one of ``lane``, ``bike``, ``parking``, ``curb``, ``sidewalk``; ``side`` is -1
    for the right half (traffic along +s) and +1 for the left half.
    """

    l_min: float
    l_max: float
    surface: str
    side: int


@dataclass(frozen=True)
class Strip:
    """A lateral strip objects live in; all of its objects share ``speed`` (m/s along +s, signed).

    ``kind`` picks the class mix: ``lane``, ``ego_lane``, ``bike``, ``parking``, ``curbside``,
    ``walk`` (moving pedestrians) or ``sidewalk``.
    """

    kind: str
    l_min: float
    l_max: float
    speed: float
    side: int

    @property
    def width(self) -> float:
        return self.l_max - self.l_min

    @property
    def centre(self) -> float:
        return 0.5 * (self.l_min + self.l_max)


@dataclass(frozen=True)
class Road:
    """One straight road: a heading, an origin and its cross-section.

    Attributes:
        origin: (2,) global xy of road coordinates (0, 0).
        heading: direction of +s, radians about global +z from +x.
        bands: surface bands, ordered by ``l``.
        strips: object strips (disjoint in ``l``).
    """

    origin: np.ndarray
    heading: float
    bands: tuple[Band, ...]
    strips: tuple[Strip, ...]

    @property
    def along(self) -> np.ndarray:
        """(2,) global unit vector of +s."""
        return np.array([np.cos(self.heading), np.sin(self.heading)])

    @property
    def left(self) -> np.ndarray:
        """(2,) global unit vector of +l."""
        return np.array([-np.sin(self.heading), np.cos(self.heading)])

    def to_global(self, s: np.ndarray | float, lat: np.ndarray | float) -> np.ndarray:
        """Road coordinates (...,) -> global xy (..., 2)."""
        s = np.asarray(s, dtype=np.float64)[..., None]
        lat = np.asarray(lat, dtype=np.float64)[..., None]
        return self.origin + s * self.along + lat * self.left

    def to_road(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global xy (..., 2) -> road coordinates ``(s, l)``, each (...,)."""
        d = np.asarray(xy, dtype=np.float64) - self.origin
        return d @ self.along, d @ self.left


def _build_cross_section(rng: np.random.Generator, ego_speed: float) -> tuple[list[Band], list[Strip], float]:
    """Bands and strips of a random cross-section; returns them and the ego lane's centre ``l``."""
    bands: list[Band] = []
    strips: list[Strip] = []
    ego_l = 0.0
    for side in (-1, 1):
        n_lanes = int(rng.integers(1, 3))
        has_bike = bool(rng.random() < 0.5)
        has_parking = side == -1 or bool(rng.random() < 0.75)  # the right side always parks (trailers etc.)
        pos = 0.0  # |l| of the band's inner edge

        def band(width: float, surface: str, _side: int = side) -> tuple[float, float]:
            nonlocal pos
            lo, hi = pos, pos + width
            pos = hi
            l_min, l_max = (-hi, -lo) if _side < 0 else (lo, hi)
            bands.append(Band(l_min, l_max, surface, _side))
            return l_min, l_max

        ego_lane = int(rng.integers(0, n_lanes)) if side < 0 else -1
        for lane in range(n_lanes):
            l_min, l_max = band(LANE_WIDTH, "lane")
            if lane == ego_lane:
                strips.append(Strip("ego_lane", l_min, l_max, ego_speed, side))
                ego_l = 0.5 * (l_min + l_max)
            else:
                speed = -side * rng.uniform(4.5, 12.5)  # right side (side -1) drives along +s
                strips.append(Strip("lane", l_min, l_max, float(speed), side))
        if has_bike:
            l_min, l_max = band(BIKE_WIDTH, "bike")
            strips.append(Strip("bike", l_min, l_max, float(-side * rng.uniform(3.0, 6.0)), side))
        if has_parking:
            l_min, l_max = band(PARKING_WIDTH, "parking")
            strips.append(Strip("parking", l_min, l_max, 0.0, side))
        band(CURB_WIDTH, "curb")
        # Sidewalk sub-lanes from the curb outwards: street furniture, two walking directions, loiterers.
        start = pos
        l_min, l_max = band(SIDEWALK_WIDTH, "sidewalk")
        edges = np.array([0.0, 1.0, 1.95, 2.9, SIDEWALK_WIDTH])
        kinds = ("curbside", "walk", "walk", "sidewalk")
        walk_speed = rng.uniform(0.9, 1.6, size=2) * np.array([1.0, -1.0])
        walk_i = 0
        for kind, lo, hi in zip(kinds, edges[:-1], edges[1:]):
            a, b = start + lo, start + hi
            sub = (-b, -a) if side < 0 else (a, b)
            speed = 0.0
            if kind == "walk":
                speed = float(walk_speed[walk_i])
                walk_i += 1
            strips.append(Strip(kind, sub[0], sub[1], speed, side))
    bands.sort(key=lambda b: b.l_min)
    strips.sort(key=lambda s: s.l_min)
    return bands, strips, ego_l


# ------------------------------------------------------------------------------------------------
# Ego path
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EgoPath:
    """The ego's smooth path: constant speed along the road plus a gentle lane-keeping weave.

    ``s(t) = speed * t``, ``l(t) = lane_l + amplitude * sin(2 pi s / wavelength + phase)``; the
    heading follows the path's tangent. The ego stays on the ground (z = 0, yaw-only pose).
    """

    road: Road
    speed: float
    lane_l: float
    amplitude: float
    wavelength: float
    phase: float

    def s_at(self, t: float | np.ndarray) -> float | np.ndarray:
        """Road coordinate ``s`` of the ego origin at time ``t`` (s)."""
        return self.speed * np.asarray(t, dtype=np.float64)

    def pose_record(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """The ego pose at scene time ``t`` (s) as stored: translation (3,), quaternion ``[w, x, y, z]``."""
        s = float(self.s_at(t))
        k = 2.0 * np.pi / self.wavelength
        lat = self.lane_l + self.amplitude * np.sin(k * s + self.phase)
        slope = self.amplitude * k * np.cos(k * s + self.phase)
        xy = self.road.to_global(s, lat)
        yaw = self.road.heading + float(np.arctan(slope))
        return np.array([xy[0], xy[1], 0.0]), yaw_to_quat(yaw)

    def pose(self, t: float) -> RigidTransform:
        """ego2global at scene time ``t`` (s), rotation rebuilt from its stored quaternion."""
        translation, quat = self.pose_record(t)
        return RigidTransform(quat_to_rotmat(quat), translation)


# ------------------------------------------------------------------------------------------------
# Objects
# ------------------------------------------------------------------------------------------------


@dataclass
class ObjectSet:
    """All objects of a scene (N of them), as arrays.

    Attributes:
        class_names: (N,) detection class of each object.
        categories: (N,) nuScenes category name.
        size: (N, 3) ``(l, w, h)`` in metres.
        yaw: (N,) heading about global +z, radians (constant).
        p0: (N, 3) global gravity centre at scene time 0.
        velocity: (N, 3) global velocity in m/s (z = 0).
        colour: (N, 3) primary RGB in [0, 1].
        colour2: (N, 3) secondary RGB (glass, trousers, stripes, ...).
        pattern: (N,) pattern code for the renderer.
        rider: (N,) cycles carrying a rider (moving cycles).
        intensity: (N,) LiDAR intensity of the object's surface.
        face_shade: (N, 6) sun shading of the faces -x, +x, -y, +y, -z, +z (box frame).
    """

    class_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    size: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    yaw: np.ndarray = field(default_factory=lambda: np.zeros(0))
    p0: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    velocity: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    colour: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    colour2: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    pattern: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rider: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    intensity: np.ndarray = field(default_factory=lambda: np.zeros(0))
    face_shade: np.ndarray = field(default_factory=lambda: np.zeros((0, 6)))

    def __len__(self) -> int:
        return len(self.class_names)

    def centres(self, t: float) -> np.ndarray:
        """(N, 3) global gravity centres at scene time ``t`` (s)."""
        return self.p0 + self.velocity * t

    def boxes(self, t: float) -> np.ndarray:
        """(N, 7) global boxes ``[x, y, z, l, w, h, yaw]`` at scene time ``t`` (s)."""
        return np.concatenate([self.centres(t), self.size, self.yaw[:, None]], axis=1)

    @property
    def speed(self) -> np.ndarray:
        """(N,) planar speeds in m/s."""
        return np.hypot(self.velocity[:, 0], self.velocity[:, 1])


@dataclass(frozen=True)
class _Member:
    class_name: str
    category: str
    size: tuple[float, float, float]
    yaw_rel: float  # relative to the road heading
    rider: bool


def _sample_size(rng: np.random.Generator, key: str) -> tuple[float, float, float]:
    spec = _SIZES[key]
    values = np.clip(rng.normal(spec.mean, spec.std), spec.low, spec.high)
    return float(values[0]), float(values[1]), float(values[2])


def _extent(size: tuple[float, float, float], yaw_rel: float) -> tuple[float, float]:
    """Footprint extent (along the road, across the road) of a box turned by ``yaw_rel``."""
    c, s = abs(np.cos(yaw_rel)), abs(np.sin(yaw_rel))
    length, width = size[0], size[1]
    return length * c + width * s, length * s + width * c


_WEIGHTS: dict[str, dict[str, float]] = {
    "lane": {"car": 0.66, "truck": 0.14, "bus": 0.07, "motorcycle": 0.10, "construction_vehicle": 0.03},
    "ego_lane": {"car": 0.85, "truck": 0.10, "bus": 0.05},
    "bike": {"bicycle": 0.7, "motorcycle": 0.3},
    "parking": {"car": 0.56, "truck": 0.09, "trailer": 0.08, "construction_vehicle": 0.06, "bus": 0.04,
                "motorcycle": 0.05, "barrier": 0.06, "traffic_cone": 0.06},
    "curbside": {"traffic_cone": 0.2, "barrier": 0.15, "bicycle": 0.25, "motorcycle": 0.1, "pedestrian": 0.3},
    "walk": {"pedestrian": 1.0},
    "sidewalk": {"pedestrian": 0.65, "bicycle": 0.35},
}
_GAPS: dict[str, tuple[float, float]] = {
    "lane": (10.0, 60.0),
    "ego_lane": (10.0, 45.0),
    "bike": (15.0, 80.0),
    "parking": (0.8, 8.0),
    "curbside": (10.0, 50.0),
    "walk": (8.0, 50.0),
    "sidewalk": (8.0, 50.0),
}


def _member(rng: np.random.Generator, strip: Strip, class_name: str) -> _Member:
    """One object of ``class_name`` suited to ``strip`` (size, yaw, rider)."""
    moving = strip.speed != 0.0
    key = class_name
    category = CLASS_CATEGORY[class_name]
    if class_name == "pedestrian" and rng.random() < 0.12:
        key, category = "child", "human.pedestrian.child"
    length, width, height = _sample_size(rng, key)
    rider = moving and class_name in ("bicycle", "motorcycle")
    if rider:
        height += 0.35  # the box includes the rider
    room = strip.width - 2.0 * STRIP_MARGIN
    facing = 0.0 if strip.side < 0 else np.pi  # parked things face the traffic direction of their side
    if moving:
        yaw_rel = 0.0 if strip.speed > 0 else np.pi
    elif class_name == "barrier":
        yaw_rel = np.pi / 2 + rng.uniform(-0.05, 0.05)  # long side (width) along the road
    elif class_name in ("pedestrian", "traffic_cone"):
        yaw_rel = rng.uniform(-np.pi, np.pi)
    else:
        yaw_rel = facing + rng.uniform(-0.035, 0.035)
    size = (length, width, height)
    if _extent(size, yaw_rel)[1] > room:
        # Fall back to the aligned orientation, then shrink the across-road dimension if needed.
        yaw_rel = np.pi / 2 if class_name == "barrier" else (0.0 if moving and strip.speed > 0 else facing)
        across_axis = 0 if class_name == "barrier" else 1
        if size[across_axis] > room:
            size = tuple(room if i == across_axis else v for i, v in enumerate(size))  # type: ignore[assignment]
    return _Member(class_name, category, size, float(yaw_rel), rider)


def _group(rng: np.random.Generator, strip: Strip, class_name: str) -> tuple[list[_Member], list[float]]:
    """A group of objects placed back to back along the strip, in increasing ``s`` order.

    Returns the members and the gaps between consecutive members.
    """
    if class_name == "barrier":
        members = [_member(rng, strip, "barrier") for _ in range(int(rng.integers(1, 5)))]
        return members, [float(rng.uniform(0.1, 0.3)) for _ in members[1:]]
    if class_name == "traffic_cone":
        members = [_member(rng, strip, "traffic_cone") for _ in range(int(rng.integers(1, 5)))]
        return members, [float(rng.uniform(1.0, 3.0)) for _ in members[1:]]
    if class_name == "truck" and strip.kind == "lane" and rng.random() < 0.35:
        # A truck towing a trailer: the trailer follows the truck (behind it in the direction of travel).
        truck, trailer = _member(rng, strip, "truck"), _member(rng, strip, "trailer")
        gap = float(rng.uniform(0.4, 0.8))
        return ([trailer, truck] if strip.speed > 0 else [truck, trailer]), [gap]
    return [_member(rng, strip, class_name)], []


class _Occupancy:
    """Occupied intervals of one strip, in strip coordinates at scene time 0."""

    def __init__(self) -> None:
        self.intervals: list[tuple[float, float]] = []

    def blocker(self, lo: float, hi: float) -> float | None:
        """End of the furthest interval overlapping ``[lo - MIN_GAP, hi + MIN_GAP]``, or None if free."""
        ends = [b for a, b in self.intervals if a < hi + MIN_GAP and b > lo - MIN_GAP]
        return max(ends) if ends else None

    def add(self, lo: float, hi: float) -> None:
        self.intervals.append((lo, hi))


@dataclass(frozen=True)
class _Placed:
    strip: Strip
    member: _Member
    s0: float  # centre along the road at time 0
    lat: float  # centre across the road


def _place_group(
    rng: np.random.Generator, strip: Strip, occ: _Occupancy, start: float, members: list[_Member],
    gaps: list[float],
) -> list[_Placed] | None:
    extents = [_extent(m.size, m.yaw_rel) for m in members]
    total = sum(e[0] for e in extents) + sum(gaps)
    if occ.blocker(start, start + total) is not None:
        return None
    occ.add(start, start + total)
    placed = []
    cursor = start
    for i, (member, (along, across)) in enumerate(zip(members, extents)):
        slack = max(0.0, 0.5 * (strip.width - across) - STRIP_MARGIN)
        # Moving things keep to the middle of their lane/sub-lane; parked things scatter a little.
        lat = strip.centre if strip.speed != 0.0 else strip.centre + rng.uniform(-0.8, 0.8) * slack
        placed.append(_Placed(strip, member, cursor + 0.5 * along, float(lat)))
        cursor += along + (gaps[i] if i < len(gaps) else 0.0)
    return placed


def _strip_range(strip: Strip, ego: EgoPath, duration: float) -> tuple[float, float]:
    """Range of time-0 positions from which an object comes within ``WINDOW`` of the ego."""
    rel_change = (strip.speed - ego.speed) * duration  # relative displacement over the scene
    lo = -WINDOW - max(0.0, rel_change)
    hi = WINDOW - min(0.0, rel_change)
    return lo, hi


def _choose(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = sorted(weights)
    p = np.array([weights[n] for n in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _populate(rng: np.random.Generator, road: Road, ego: EgoPath, duration: float) -> list[_Placed]:
    occupancy = {strip: _Occupancy() for strip in road.strips}
    for strip in road.strips:
        if strip.kind == "ego_lane":
            # Vehicles in the ego lane move at the ego's speed; keep the ego's own stretch free.
            occupancy[strip].add(-EGO_REAR - EGO_CLEARANCE, EGO_FRONT + EGO_CLEARANCE)
    placed: list[_Placed] = []

    # Anchors first: one object of every class near the ego at mid-scene, so that even a short
    # scene shows all classes. They are placed before the fill so the fill avoids them.
    t_mid = 0.5 * duration
    s_mid = float(ego.s_at(t_mid))
    for class_name in [CLASSES[i] for i in rng.permutation(len(CLASSES))]:
        hosts = [s for s in road.strips if _WEIGHTS[s.kind].get(class_name, 0.0) > 0.0]
        for _ in range(20):
            strip = hosts[int(rng.integers(len(hosts)))]
            rel = float(rng.choice([-1.0, 1.0]) * rng.uniform(6.0, 26.0))
            members, gaps = [_member(rng, strip, class_name)], []
            start = s_mid + rel - strip.speed * t_mid
            group = _place_group(rng, strip, occupancy[strip], start, members, gaps)
            if group is not None:
                placed.extend(group)
                break

    for strip in road.strips:
        lo, hi = _strip_range(strip, ego, duration)
        gap_lo, gap_hi = _GAPS[strip.kind]
        cursor = lo + rng.uniform(0.0, gap_hi)
        while cursor < hi:
            members, gaps = _group(rng, strip, _choose(rng, _WEIGHTS[strip.kind]))
            group = _place_group(rng, strip, occupancy[strip], cursor, members, gaps)
            if group is None:
                # Jump past whatever blocks this spot (an anchor or the ego's reserved stretch).
                total = sum(_extent(m.size, m.yaw_rel)[0] for m in members) + sum(gaps)
                end = occupancy[strip].blocker(cursor, cursor + total)
                cursor = (end if end is not None else cursor) + MIN_GAP + 0.01
                continue
            placed.extend(group)
            last = group[-1]
            cursor = last.s0 + 0.5 * _extent(last.member.size, last.member.yaw_rel)[0]
            gap = rng.uniform(gap_lo, gap_hi)
            if strip.kind == "parking" and rng.random() < 0.3:
                gap += rng.uniform(10.0, 40.0)  # empty stretches of kerb
            cursor += max(gap, MIN_GAP + 0.01)
    return placed


def _face_shades(yaw: np.ndarray, sun: np.ndarray) -> np.ndarray:
    """(N, 6) Lambert shading of the box faces -x, +x, -y, +y, -z, +z under a sun direction."""
    c, s = np.cos(yaw), np.sin(yaw)
    zeros, ones = np.zeros_like(yaw), np.ones_like(yaw)
    normals = np.stack(
        [
            np.stack([-c, -s, zeros], -1), np.stack([c, s, zeros], -1),
            np.stack([s, -c, zeros], -1), np.stack([-s, c, zeros], -1),
            np.stack([zeros, zeros, -ones], -1), np.stack([zeros, zeros, ones], -1),
        ],
        axis=1,
    )
    return 0.42 + 0.58 * np.clip(normals @ sun, 0.0, None)


def _make_objects(rng: np.random.Generator, road: Road, placed: list[_Placed], sun: np.ndarray) -> ObjectSet:
    objs = ObjectSet()
    n = len(placed)
    objs.size = np.zeros((n, 3))
    objs.yaw = np.zeros(n)
    objs.p0 = np.zeros((n, 3))
    objs.velocity = np.zeros((n, 3))
    objs.colour = np.zeros((n, 3))
    objs.colour2 = np.zeros((n, 3))
    objs.pattern = np.zeros(n, dtype=np.int64)
    objs.rider = np.zeros(n, dtype=bool)
    objs.intensity = np.zeros(n)
    for i, p in enumerate(placed):
        m = p.member
        objs.class_names.append(m.class_name)
        objs.categories.append(m.category)
        objs.size[i] = m.size
        objs.yaw[i] = road.heading + m.yaw_rel
        xy = road.to_global(p.s0, p.lat)
        objs.p0[i] = (xy[0], xy[1], BOX_GROUND_GAP + 0.5 * m.size[2])
        objs.velocity[i, :2] = p.strip.speed * road.along
        palette = _PALETTES.get(m.class_name)
        if m.class_name == "pedestrian":
            shirt = rng.uniform(0.1, 0.9, size=3)
            objs.colour[i] = shirt
            objs.colour2[i] = rng.choice([(0.10, 0.12, 0.25), (0.08, 0.08, 0.08), (0.55, 0.50, 0.38)])
        else:
            assert palette is not None
            objs.colour[i] = palette[int(rng.integers(len(palette)))]
            if m.class_name in ("barrier", "traffic_cone"):
                objs.colour2[i] = (0.95, 0.95, 0.95)
            elif m.class_name in ("bicycle", "motorcycle"):
                objs.colour2[i] = rng.uniform(0.1, 0.9, size=3)  # the rider's jacket
            else:
                objs.colour2[i] = _GLASS
        objs.colour[i] *= rng.uniform(0.9, 1.08)
        objs.pattern[i] = _PATTERN[m.class_name]
        objs.rider[i] = m.rider
        objs.intensity[i] = _LIDAR_INTENSITY[m.class_name] * rng.uniform(0.85, 1.15)
    objs.colour = np.clip(objs.colour, 0.0, 1.0)
    objs.face_shade = _face_shades(objs.yaw, sun)
    return objs


# ------------------------------------------------------------------------------------------------
# Scene
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """All capture times of one scene, microseconds since the epoch.

    Attributes:
        start_us: scene time origin (``t = 0``).
        key_us: (S,) LiDAR key-frame (= sample) timestamps.
        camera_us: (S, 6) camera timestamps, cameras in ``CAMERA_CHANNELS`` order.
        sweep_us: (S, K) non-key LiDAR sweep timestamps; row ``i`` holds the sweeps between key
            frames ``i - 1`` and ``i`` (row 0 is unused: no sweeps before the first key frame).
    """

    start_us: int
    key_us: np.ndarray
    camera_us: np.ndarray
    sweep_us: np.ndarray

    def seconds(self, timestamp_us: int) -> float:
        """Scene time (s) of an absolute timestamp (µs)."""
        return (int(timestamp_us) - self.start_us) * 1e-6


@dataclass(frozen=True)
class SceneWorld:
    """Everything needed to render and annotate one scene, deterministic in (seed, index).

    Attributes:
        index: scene index within the dataset (0-based).
        name: scene name, e.g. ``scene-0001``.
        road: the road.
        ego: the ego path.
        objects: the object tracks.
        rig: this log's calibration.
        timeline: the capture times.
        sun: (3,) global unit vector towards the sun.
        sky_zenith: (3,) RGB in [0, 1] at the zenith.
        sky_horizon: (3,) RGB in [0, 1] at the horizon (also the haze colour).
        ground_gain: brightness factor of the ground texture.
        texture_seed: seed of the ground texture noise.
    """

    index: int
    name: str
    road: Road
    ego: EgoPath
    objects: ObjectSet
    rig: Rig
    timeline: Timeline
    sun: np.ndarray
    sky_zenith: np.ndarray
    sky_horizon: np.ndarray
    ground_gain: float
    texture_seed: int


SCENE_EPOCH_US = 1_532_401_200_000_000
"""2018-07-24 03:00:00 UTC: the first synthetic scene starts near here (like nuScenes' 2018 logs)."""


def scene_name(index: int) -> str:
    """Name of scene ``index`` (0-based): ``scene-0001``, ``scene-0002``, ..."""
    return f"scene-{index + 1:04d}"


def _timeline(rng: np.random.Generator, index: int, rig: Rig, samples: int, sweeps: int) -> Timeline:
    # Scenes an hour apart (plus a few minutes) so that start times are distinct and increasing.
    start_us = SCENE_EPOCH_US + index * 3_600_000_000 + int(rng.integers(0, 600_000_000))
    key = start_us + np.arange(samples, dtype=np.int64) * KEY_INTERVAL_US
    key[1:] += rng.integers(-2000, 2001, size=samples - 1)  # real key frames are not perfectly periodic
    offsets = np.array([cam.time_offset_us for cam in rig.cameras], dtype=np.int64)
    camera = key[:, None] + offsets[None, :] + rng.integers(-800, 801, size=(samples, len(offsets)))
    sweep = np.zeros((samples, sweeps), dtype=np.int64)
    for i in range(1, samples):
        frac = np.arange(1, sweeps + 1) / (sweeps + 1)
        sweep[i] = key[i - 1] + np.round(frac * (key[i] - key[i - 1])).astype(np.int64)
    return Timeline(start_us=int(start_us), key_us=key, camera_us=camera, sweep_us=sweep)


def build_world(
    seed: int, index: int, samples: int, image_size: tuple[int, int], sweeps: int
) -> SceneWorld:
    """Build scene ``index`` of the dataset with ``seed`` (deterministic).

    Args:
        seed: dataset seed.
        index: scene index (0-based).
        samples: key frames in the scene.
        image_size: (width, height) of camera images.
        sweeps: non-key LiDAR sweeps between consecutive key frames.

    Returns:
        The scene.
    """
    rng = np.random.default_rng([seed, index, 0x5EED])
    rig = make_rig(rng, image_size)
    timeline = _timeline(rng, index, rig, samples, sweeps)
    ego_speed = float(rng.uniform(4.0, 10.0))
    bands, strips, ego_l = _build_cross_section(rng, ego_speed)
    road = Road(
        origin=rng.uniform(350.0, 850.0, size=2),
        heading=float(rng.uniform(-np.pi, np.pi)),
        bands=tuple(bands),
        strips=tuple(strips),
    )
    ego = EgoPath(
        road=road,
        speed=ego_speed,
        lane_l=ego_l,
        amplitude=float(rng.uniform(0.1, 0.3)),
        wavelength=float(rng.uniform(40.0, 90.0)),
        phase=float(rng.uniform(0.0, 2.0 * np.pi)),
    )
    sun_az, sun_el = rng.uniform(-np.pi, np.pi), rng.uniform(np.deg2rad(25), np.deg2rad(65))
    sun = np.array([np.cos(sun_el) * np.cos(sun_az), np.cos(sun_el) * np.sin(sun_az), np.sin(sun_el)])
    duration = timeline.seconds(int(timeline.camera_us.max())) + 0.1
    placed = _populate(rng, road, ego, duration)
    objects = _make_objects(rng, road, placed, sun)
    return SceneWorld(
        index=index,
        name=scene_name(index),
        road=road,
        ego=ego,
        objects=objects,
        rig=rig,
        timeline=timeline,
        sun=sun,
        sky_zenith=np.array([0.30, 0.48, 0.78]) * rng.uniform(0.9, 1.05),
        sky_horizon=np.array([0.78, 0.82, 0.86]) * rng.uniform(0.92, 1.02),
        ground_gain=float(rng.uniform(0.85, 1.1)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


__all__ = [
    "BOX_GROUND_GAP",
    "CLASS_CATEGORY",
    "KEY_INTERVAL_US",
    "Band",
    "EgoPath",
    "ObjectSet",
    "Road",
    "SceneWorld",
    "Strip",
    "Timeline",
    "build_world",
    "scene_name",
]
