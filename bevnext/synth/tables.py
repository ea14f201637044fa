"""The 13 nuScenes v1.0 tables: records with exactly the devkit's fields, deterministic tokens, writing.

Tokens are 32 lowercase hex characters, the MD5 of a descriptive string. Tables that describe the
schema (category, attribute, visibility, sensor) get seed-independent tokens, like nuScenes whose
category tokens are the same in every release; everything else includes the dataset seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

TABLE_NAMES: tuple[str, ...] = (
    "attribute",
    "calibrated_sensor",
    "category",
    "ego_pose",
    "instance",
    "log",
    "map",
    "sample",
    "sample_annotation",
    "sample_data",
    "scene",
    "sensor",
    "visibility",
)
"""The tables of a nuScenes v1.0 release (without lidarseg/panoptic)."""

# The nuScenes v1.0 category list; descriptions are our own short wording.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("animal", "Any animal."),
    ("human.pedestrian.adult", "An adult pedestrian."),
    ("human.pedestrian.child", "A child pedestrian."),
    ("human.pedestrian.construction_worker", "A person at work on a construction site."),
    ("human.pedestrian.personal_mobility", "A person on a scooter, skateboard, segway or similar."),
    ("human.pedestrian.police_officer", "A police officer on foot."),
    ("human.pedestrian.stroller", "A stroller or pram, with or without its pusher."),
    ("human.pedestrian.wheelchair", "A wheelchair, with or without its user."),
    ("movable_object.barrier", "A temporary barrier that blocks or guides traffic."),
    ("movable_object.debris", "Debris on the road that a vehicle could drive over or around."),
    ("movable_object.pushable_pullable", "A cart, bin or similar object pushed or pulled by a person."),
    ("movable_object.trafficcone", "A traffic cone."),
    ("static_object.bicycle_rack", "A rack or area where bicycles are parked."),
    ("vehicle.bicycle", "A bicycle, with or without its rider."),
    ("vehicle.bus.bendy", "An articulated bus."),
    ("vehicle.bus.rigid", "A single-body bus."),
    ("vehicle.car", "A passenger car, van or pickup."),
    ("vehicle.construction", "A vehicle built for construction work: excavator, crane, loader, ..."),
    ("vehicle.emergency.ambulance", "An ambulance."),
    ("vehicle.emergency.police", "A police car or motorcycle."),
    ("vehicle.motorcycle", "A motorcycle or scooter, with or without its rider."),
    ("vehicle.trailer", "A trailer pulled by another vehicle, or parked on its own."),
    ("vehicle.truck", "A truck for goods: pickup-sized or larger, rigid or the cab of a semi."),
)

ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("vehicle.moving", "The vehicle is moving."),
    ("vehicle.stopped", "The vehicle has stopped briefly in traffic, with a driver, and will move again."),
    ("vehicle.parked", "The vehicle is parked."),
    ("cycle.with_rider", "Somebody rides the bicycle or motorcycle."),
    ("cycle.without_rider", "Nobody rides the bicycle or motorcycle."),
    ("pedestrian.sitting_lying_down", "The person sits or lies down."),
    ("pedestrian.standing", "The person stands."),
    ("pedestrian.moving", "The person walks or runs."),
)

VISIBILITY_LEVELS: tuple[tuple[str, str, str], ...] = (
    ("1", "v0-40", "visibility of the whole object is between 0 and 40%"),
    ("2", "v40-60", "visibility of the whole object is between 40 and 60%"),
    ("3", "v60-80", "visibility of the whole object is between 60 and 80%"),
    ("4", "v80-100", "visibility of the whole object is between 80 and 100%"),
)


def make_token(*parts: object) -> str:
    """A deterministic 32-hex-character token for a descriptive key."""
    key = "bevnext-synth/" + "/".join(str(p) for p in parts)
    return hashlib.md5(key.encode("utf-8")).hexdigest()


def visibility_token(fraction: float) -> str:
    """Visibility token ``"1"``..``"4"`` of a visible fraction in [0, 1]."""
    if fraction >= 0.8:
        return "4"
    if fraction >= 0.6:
        return "3"
    if fraction >= 0.4:
        return "2"
    return "1"


def floats(values: np.ndarray | list[float]) -> list[float]:
    """Plain Python floats (JSON writes them with ``repr``, so they round-trip exactly)."""
    return [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


class Tables:
    """Accumulates the records of all 13 tables; ``write`` saves them as the devkit expects."""

    def __init__(self) -> None:
        self.records: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLE_NAMES}
        for name, description in CATEGORIES:
            self.add("category", token=make_token("category", name), name=name, description=description)
        for name, description in ATTRIBUTES:
            self.add("attribute", token=make_token("attribute", name), name=name, description=description)
        for token, level, description in VISIBILITY_LEVELS:
            self.add("visibility", description=description, token=token, level=level)

    def add(self, table: str, **fields: Any) -> dict[str, Any]:
        """Append a record (fields in the given order) and return it, so links can be filled later."""
        record = dict(fields)
        self.records[table].append(record)
        return record

    def category_token(self, name: str) -> str:
        return make_token("category", name)

    def attribute_token(self, name: str) -> str:
        return make_token("attribute", name)

    def write(self, table_dir: Path) -> None:
        """Write ``<table>.json`` for every table into ``table_dir`` (created if missing)."""
        table_dir.mkdir(parents=True, exist_ok=True)
        for name in TABLE_NAMES:
            text = json.dumps(self.records[name], indent=0, allow_nan=False)
            (table_dir / f"{name}.json").write_text(text + "\n", encoding="utf-8")


__all__ = [
    "ATTRIBUTES",
    "CATEGORIES",
    "TABLE_NAMES",
    "VISIBILITY_LEVELS",
    "Tables",
    "floats",
    "make_token",
    "visibility_token",
]
