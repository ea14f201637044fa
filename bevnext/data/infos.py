"""nuScenes (real or synthetic) -> bevnext info files: one JSON file per split, one record per key sample.

This is ``bevnext create-data``. It plays the role of the reference's two-step converter
(``reference/bevnext-model.md`` §4.1): per key sample it records the LiDAR and six camera files with
their calibration and ego poses, the previous key samples of the scene, and the ground truth already
in the frame the model works in — the ego frame at the key sample's CAM_FRONT timestamp (§1.1).

Reading: the official devkit's ``NuScenes`` class reads the tables (it is the reference reader, and
its ``box_velocity`` defines the ground-truth velocities the official evaluation compares against).
Before it runs, every input is validated here, so a wrong path or a broken download produces one
``DataError`` line naming the file and what was expected instead of a devkit traceback.

Writing: info files are JSON, never pickle, so loading one cannot execute code; each is written
atomically, and only after every split has been built and its files checked, so a failure leaves
no half-written or partially updated info file behind.

Info file layout (``INFO_FORMAT_VERSION`` 1)::

    {"format": "bevnext-infos", "format_version": 1, "version": ..., "split": ...,
     "classes": [10 class names], "created_by": "bevnext <version>", "infos": [info, ...]}

Each ``info`` (sorted by timestamp) has ``token``, ``scene_token``, ``scene_name``, ``timestamp``
(LIDAR_TOP key sample_data, µs), ``prev_tokens`` (earlier key samples of the scene, nearest first),
``lidar`` and ``cams`` (per camera: ``path`` relative to the data root, ``sample_data_token``,
``timestamp``, ``sensor2ego`` and ``ego2global`` poses as nuScenes ``translation`` + ``rotation``
``[w, x, y, z]``, cameras also ``width``, ``height``, ``intrinsic`` 3x3), and the ground truth in
the key frame: ``gt_boxes`` (N, 9) ``[x, y, z, l, w, h, yaw, vx, vy]``, ``gt_labels``,
``gt_num_lidar_pts``, ``gt_num_radar_pts``, ``gt_instance_tokens``, plus ``all_labels``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bevnext import __version__
from bevnext.data.files import jpeg_problem, lidar_bin_problem
from bevnext.data.info_record import InfoRecord
from bevnext.errors import DataError
from bevnext.io import atomic_write_json
from bevnext.structures.boxes import CATEGORY_TO_CLASS, CLASSES, global_boxes_to_ego
from bevnext.structures.sensors import CAMERAS, KEY_CAMERA, LIDAR
from bevnext.structures.transforms import RigidTransform

logger = logging.getLogger(__name__)

INFO_FORMAT = "bevnext-infos"
"""Value of the ``format`` key that marks a bevnext info file."""
INFO_FORMAT_VERSION = 1
"""Layout version; bumped whenever the info layout changes, so stale files are rejected by ``load_infos``."""



TABLE_FIELDS: dict[str, tuple[str, ...]] = {
    "attribute": ("token", "name"),
    "calibrated_sensor": ("token", "sensor_token", "translation", "rotation", "camera_intrinsic"),
    "category": ("token", "name"),
    "ego_pose": ("token", "timestamp", "translation", "rotation"),
    "instance": ("token", "category_token"),
    "log": ("token",),
    "map": ("token", "log_tokens", "filename"),
    "sample": ("token", "timestamp", "scene_token", "prev", "next"),
    "sample_annotation": (
        "token", "sample_token", "instance_token", "translation", "size", "rotation", "prev", "next",
        "num_lidar_pts", "num_radar_pts",
    ),
    "sample_data": (
        "token", "sample_token", "ego_pose_token", "calibrated_sensor_token", "timestamp", "is_key_frame",
        "filename", "width", "height",
    ),
    "scene": ("token", "name"),
    "sensor": ("token", "channel", "modality"),
    "visibility": ("token",),
}
"""The 13 nuScenes tables and the fields of each that the devkit's reader and this module use."""

STANDARD_SPLITS: dict[str, tuple[str, ...]] = {
    "v1.0-trainval": ("train", "val"),
    "v1.0-mini": ("mini_train", "mini_val"),
    "v1.0-test": ("test",),
}
"""Official nuScenes versions and the devkit splits an info file is written for; any other version
needs a ``splits.json`` in its table folder."""

# Split names become part of a file name (bevnext_infos_<split>.json); keep them plain.
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class InfoFile:
    """A loaded info file.

    Attributes:
        version: nuScenes version the infos were made from, e.g. ``v1.0-trainval``.
        split: split name, e.g. ``train``.
        classes: the detection class names; ``gt_labels`` index into this list.
        infos: one dict per key sample, sorted by timestamp (layout in the module docstring).
        created_by: ``"bevnext <version>"`` of the writer.
    """

    version: str
    split: str
    classes: list[str]
    infos: list[InfoRecord]
    created_by: str = ""


class _SampleProblem(Exception):
    """A sample cannot be used (missing or corrupt files, a missing channel); skippable.

    Attributes:
        problems: one full message per problem, each naming the file (or channel) and the sample.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def info_path(data_root: str | Path, split: str) -> Path:
    """The info file of ``split``: ``data_root / f"bevnext_infos_{split}.json"``."""
    return Path(data_root) / f"bevnext_infos_{split}.json"


# --------------------------------------------------------------------------------------------------
# Validation of the input, before the devkit sees it.


def _check_folders(data_root: str | Path, version: str) -> tuple[Path, Path]:
    """(data root, table folder), both checked to exist."""
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(
            f"{root}: data root not found (expected a nuScenes folder holding {version}/, samples/ and maps/)"
        )
    table_root = root / version
    if not table_root.is_dir():
        present = sorted(p.parent.name for p in root.glob("*/scene.json"))
        hint = f"; versions found there: {', '.join(present)}" if present else ""
        raise DataError(
            f"{table_root}: version folder not found "
            f"(expected the nuScenes tables of version {version!r}{hint})"
        )
    return root, table_root


def _read_table(table_root: Path, name: str) -> list[dict[str, Any]]:
    """Parse one table and check that each record has the fields this module and the devkit use."""
    path = table_root / f"{name}.json"
    expected = f"the nuScenes {name!r} table, a JSON list of records"
    if not path.is_file():
        raise DataError(f"{path}: table file missing (expected {expected})")
    try:
        with path.open("rb") as handle:
            records = json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}; expected {expected})"
        ) from err
    except (ValueError, RecursionError) as err:  # bad encoding, absurd nesting
        raise DataError(f"{path}: not valid JSON ({err}; expected {expected})") from err
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err}; expected {expected})") from err
    if not isinstance(records, list):
        raise DataError(f"{path}: holds a JSON {type(records).__name__}, expected {expected}")
    required = frozenset(TABLE_FIELDS[name])
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {index} is a JSON {type(record).__name__}, expected an object")
        if not required <= record.keys():
            missing = sorted(required - record.keys())
            raise DataError(f"{path}: record {index} lacks field(s) {', '.join(missing)}")
    return records


def _check_table_files(table_root: Path) -> None:
    """All 13 table files exist: checked before parsing any, as trainval's take a minute to parse."""
    missing = [table_root / f"{name}.json" for name in sorted(TABLE_FIELDS)]
    missing = [path for path in missing if not path.is_file()]
    if missing:
        also = f"; also missing: {', '.join(path.name for path in missing[1:])}" if len(missing) > 1 else ""
        raise DataError(
            f"{missing[0]}: table file missing (expected the nuScenes {missing[0].stem!r} table, "
            f"one of the {len(TABLE_FIELDS)} JSON tables of a nuScenes version{also})"
        )


def _load_tables(
    root: Path, table_root: Path, already_read: dict[str, list[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """All 13 tables, validated, plus the checks that the devkit would otherwise assert on."""
    tables = {
        name: already_read[name] if name in already_read else _read_table(table_root, name)
        for name in sorted(TABLE_FIELDS)
    }
    map_table = table_root / "map.json"
    if not tables["map"]:
        raise DataError(f"{map_table}: no map records (the devkit needs at least one, with log_tokens)")
    for record in tables["map"]:
        mask = root / str(record["filename"])
        # The devkit opens a MapMask per map record and asserts that its file exists.
        if not mask.is_file():
            raise DataError(
                f"{mask}: map mask file missing (named by {map_table}; it ships in the maps/ folder)"
            )
    return tables


def _resolve_splits(
    root: Path, table_root: Path, version: str, scenes: list[dict[str, Any]]
) -> dict[str, list[str]]:
    """Split name -> scene names for ``version``, checked against the scene table."""
    present = {str(scene["name"]) for scene in scenes}
    scene_table = table_root / "scene.json"
    if version in STANDARD_SPLITS:
        # Imported here: the devkit pulls in matplotlib, OpenCV and scikit-learn (~2 s).
        from nuscenes.utils.splits import create_splits_scenes

        standard = create_splits_scenes()
        splits: dict[str, list[str]] = {}
        for split in STANDARD_SPLITS[version]:
            wanted = standard[split]
            splits[split] = [name for name in wanted if name in present]
            if len(splits[split]) < len(wanted):
                # Like the reference converter, keep the scenes that are there (a partial download).
                logger.warning(
                    "%s: %d of the %d scenes of the standard %s split are missing; using the %d present",
                    scene_table, len(wanted) - len(splits[split]), len(wanted), split, len(splits[split]),
                )
        if not any(splits.values()):
            raise DataError(
                f"{scene_table}: none of the scenes of the standard {version} splits "
                f"({', '.join(STANDARD_SPLITS[version])}) is in this table — is this really {version}?"
            )
        return splits

    splits_file = table_root / "splits.json"
    expected = "a JSON object mapping each split name to a list of scene names"
    if not splits_file.is_file():
        raise DataError(
            f"{splits_file}: missing; {version!r} is not a standard nuScenes version "
            f"({', '.join(STANDARD_SPLITS)}), so it needs {expected}"
        )
    try:
        raw = json.loads(splits_file.read_bytes())
    except (ValueError, RecursionError) as err:
        raise DataError(f"{splits_file}: not valid JSON ({err}); expected {expected}") from err
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{splits_file}: expected {expected}")
    splits = {}
    for split, names in raw.items():
        if not _SPLIT_NAME.match(split):
            raise DataError(f"{splits_file}: split name {split!r} must be letters, digits, '_', '.' or '-'")
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise DataError(f"{splits_file}: split {split!r} must be a list of scene names (strings)")
        unknown = [name for name in names if name not in present]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise DataError(
                f"{splits_file}: split {split!r} names scenes that are not in {scene_table}: {shown}"
            )
        splits[split] = list(names)
    return splits


def splits_for_version(data_root: str | Path, version: str) -> dict[str, list[str]]:
    """The splits an info file is written for, with their scene names.

    Official versions use the devkit's standard splits (``v1.0-trainval``: train, val;
    ``v1.0-mini``: mini_train, mini_val; ``v1.0-test``: test), restricted to the scenes present;
    any other version reads ``DATA_ROOT/VERSION/splits.json``, whose scenes must all exist.

    Args:
        data_root: nuScenes data root.
        version: table folder name, e.g. ``v1.0-trainval`` or ``v1.0-synth``.

    Returns:
        split name -> scene names.

    Raises:
        DataError: missing folders, unreadable scene table or splits.json, unknown scenes.
    """
    root, table_root = _check_folders(data_root, version)
    return _resolve_splits(root, table_root, version, _read_table(table_root, "scene"))


def _open_devkit(root: Path, version: str, tables: dict[str, list[dict[str, Any]]]) -> Any:
    """A devkit ``NuScenes`` over the already parsed and validated tables."""
    from nuscenes.nuscenes import NuScenes

    class _PreloadedNuScenes(NuScenes):
        # The devkit parses each table itself; trainval's tables are over 1 GB of JSON, so rather than
        # parsing them a second time after validation, hand it the records already in memory.
        def __init__(self, preloaded: dict[str, list[dict[str, Any]]]) -> None:
            self._preloaded = preloaded
            super().__init__(version=version, dataroot=str(root), verbose=False)

        def __load_table__(self, table_name: str) -> Any:  # noqa: N802 (devkit's name)
            if table_name in self._preloaded:
                return self._preloaded.pop(table_name)
            return super().__load_table__(table_name)

    try:
        return _PreloadedNuScenes(dict(tables))
    except (KeyError, IndexError, TypeError, ValueError, AssertionError) as err:
        raise DataError(
            f"{root / version}: the tables are inconsistent (the nuScenes devkit failed with "
            f"{type(err).__name__}: {err}) — a record refers to a token that does not exist?"
        ) from err


# --------------------------------------------------------------------------------------------------
# Building infos.


def _pose(record: Mapping[str, Any]) -> dict[str, list[float]]:
    """A calibrated_sensor / ego_pose record as ``{"translation": [3], "rotation": [w, x, y, z]}``."""
    return {
        "translation": [float(v) for v in record["translation"]],
        "rotation": [float(v) for v in record["rotation"]],
    }


def _sensor_entry(nusc: Any, sd_token: str) -> tuple[dict[str, Any], Mapping[str, Any], Mapping[str, Any]]:
    """Common fields of one sample_data, plus its sample_data and calibrated_sensor records."""
    sd = nusc.get("sample_data", sd_token)
    calib = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    entry = {
        "path": str(sd["filename"]),
        "sample_data_token": sd["token"],
        "timestamp": int(sd["timestamp"]),
        "sensor2ego": _pose(calib),
        "ego2global": _pose(nusc.get("ego_pose", sd["ego_pose_token"])),
    }
    return entry, sd, calib


def _ground_truth(nusc: Any, sample: Mapping[str, Any], key_pose: RigidTransform) -> dict[str, list[Any]]:
    """The sample's annotations of the 10 classes as boxes in the key ego frame."""
    labels, all_labels, lidar_pts, radar_pts, instances, ann_tokens = [], [], [], [], [], []
    translation, size, rotation, velocity = [], [], [], []
    for ann_token in sample["anns"]:
        ann = nusc.get("sample_annotation", ann_token)
        class_name = CATEGORY_TO_CLASS.get(ann["category_name"])
        if class_name is None:
            continue
        label = CLASSES.index(class_name)
        # The class-balanced sampler counts every in-class annotation, points or not.
        all_labels.append(label)
        if int(ann["num_lidar_pts"]) + int(ann["num_radar_pts"]) < 1:
            continue  # the reference's valid_flag: a box no sensor saw cannot be learned from
        vel = np.asarray(nusc.box_velocity(ann_token), dtype=np.float64)[:2]
        labels.append(label)
        lidar_pts.append(int(ann["num_lidar_pts"]))
        radar_pts.append(int(ann["num_radar_pts"]))
        instances.append(ann["instance_token"])
        ann_tokens.append(ann_token)
        translation.append(ann["translation"])
        size.append(ann["size"])
        rotation.append(ann["rotation"])
        # The devkit returns NaN when an instance has a single annotation (or its neighbours are too
        # far apart in time); the reference trains those as static.
        velocity.append(np.where(np.isfinite(vel), vel, 0.0))
    if labels:
        boxes = global_boxes_to_ego(
            np.asarray(translation, dtype=np.float64),
            np.asarray(size, dtype=np.float64),
            np.asarray(rotation, dtype=np.float64),
            np.asarray(velocity),
            key_pose,
        )
        bad = np.flatnonzero(~np.isfinite(boxes).all(axis=1))
        if bad.size:
            raise DataError(
                f"sample_annotation {ann_tokens[bad[0]]} (sample {sample['token']}): non-finite box values"
            )
        gt_boxes = boxes.tolist()
    else:
        gt_boxes = []
    return {
        "gt_boxes": gt_boxes,
        "gt_labels": labels,
        "gt_num_lidar_pts": lidar_pts,
        "gt_num_radar_pts": radar_pts,
        "gt_instance_tokens": instances,
        "all_labels": all_labels,
    }


def _sample_info(nusc: Any, table_root: Path, sample: Mapping[str, Any], scene_name: str) -> dict[str, Any]:
    """One info record (``prev_tokens`` still empty; filled in once the split's samples are known)."""
    data = sample["data"]
    missing = [channel for channel in (LIDAR, *CAMERAS) if channel not in data]
    if missing:
        raise _SampleProblem([f"sample {sample['token']}: no key-frame sample_data for {', '.join(missing)}"])
    lidar, lidar_sd, _ = _sensor_entry(nusc, data[LIDAR])
    cams: dict[str, dict[str, Any]] = {}
    for channel in CAMERAS:
        entry, sd, calib = _sensor_entry(nusc, data[channel])
        intrinsic = np.asarray(calib["camera_intrinsic"], dtype=np.float64)
        if intrinsic.shape != (3, 3) or not np.isfinite(intrinsic).all():
            raise DataError(
                f"{table_root / 'calibrated_sensor.json'}: record {calib['token']} ({channel}) has "
                f"camera_intrinsic {calib['camera_intrinsic']!r}, expected a finite 3x3 matrix"
            )
        cams[channel] = {
            "path": entry["path"],
            "sample_data_token": entry["sample_data_token"],
            "timestamp": entry["timestamp"],
            "width": int(sd["width"]),
            "height": int(sd["height"]),
            "intrinsic": intrinsic.tolist(),
            "sensor2ego": entry["sensor2ego"],
            "ego2global": entry["ego2global"],
        }
    key_pose = RigidTransform.from_record(cams[KEY_CAMERA]["ego2global"])
    return {
        "token": sample["token"],
        "scene_token": sample["scene_token"],
        "scene_name": scene_name,
        "timestamp": int(lidar_sd["timestamp"]),
        "prev_tokens": [],
        "lidar": lidar,
        "cams": cams,
        **_ground_truth(nusc, sample, key_pose),
    }


def _file_problems(root: Path, info: Mapping[str, Any]) -> list[str]:
    """Every missing or corrupt file of one info, as full messages naming file and sample."""
    problems = []
    checks = [(cam["path"], jpeg_problem) for cam in info["cams"].values()]
    checks.append((info["lidar"]["path"], lidar_bin_problem))
    for rel_path, check in checks:
        problem = check(root / rel_path)
        if problem is not None:
            problems.append(f"{root / rel_path} (sample {info['token']}): {problem}")
    return problems


def _link_previous(nusc: Any, infos: dict[str, dict[str, Any]]) -> None:
    """Fill ``prev_tokens``: the earlier key samples of the same scene, nearest first.

    The chain stops at the first sample that is not in ``infos`` (a skipped sample), so that
    ``prev_tokens[k]`` is always k + 1 key frames back and multi-frame input never silently
    bridges a gap.
    """
    for token, info in infos.items():
        chain: list[str] = []
        prev = nusc.get("sample", token)["prev"]
        # The length bound guards against a cycle in corrupt prev pointers.
        while prev and prev in infos and len(chain) < len(infos):
            if infos[prev]["scene_token"] != info["scene_token"]:
                break
            chain.append(prev)
            prev = nusc.get("sample", prev)["prev"]
        info["prev_tokens"] = chain


def _build_split(
    nusc: Any,
    root: Path,
    table_root: Path,
    split: str,
    scene_names: list[str],
    skip_missing: bool,
    progress: bool,
) -> tuple[list[dict[str, Any]], int, int]:
    """(infos sorted by timestamp, number of samples, number skipped) of one split."""
    wanted = set(scene_names)
    scene_name_of = {scene["token"]: scene["name"] for scene in nusc.scene if scene["name"] in wanted}
    samples = [sample for sample in nusc.sample if sample["scene_token"] in scene_name_of]
    samples.sort(key=lambda sample: (sample["timestamp"], sample["token"]))
    kept: dict[str, dict[str, Any]] = {}
    skipped = 0
    bar = tqdm(samples, desc=f"infos {split}", unit="sample", disable=not progress, leave=False)
    # While the bar is drawn, route warnings through it so that they do not break its line.
    with bar, logging_redirect_tqdm() if progress else contextlib.nullcontext():
        for sample in bar:
            try:
                try:
                    info = _sample_info(nusc, table_root, sample, scene_name_of[sample["scene_token"]])
                except KeyError as err:
                    raise DataError(
                        f"{table_root}: sample {sample['token']} refers to a record that does not exist "
                        f"({err})"
                    ) from err
                problems = _file_problems(root, info)
                if problems:
                    raise _SampleProblem(problems)
            except _SampleProblem as problem:
                if not skip_missing:
                    # Name the first problem only: one clear line; --skip-missing lists them all.
                    raise DataError(problem.problems[0]) from None
                logger.warning("skipping sample: %s", "; ".join(problem.problems))
                skipped += 1
                continue
            kept[info["token"]] = info
    _link_previous(nusc, kept)
    infos = sorted(kept.values(), key=lambda info: (info["timestamp"], info["token"]))
    return infos, len(samples), skipped


def create_infos(
    data_root: str | Path, version: str, skip_missing: bool = False, progress: bool = True
) -> list[Path]:
    """Write one info file per split of ``version`` next to the data.

    Ground truth is expressed in the ego frame at each sample's CAM_FRONT timestamp; only
    annotations whose category maps into ``CLASSES`` and that have at least one LiDAR or radar
    point become boxes (``all_labels`` also counts the zero-point ones). Velocities are the
    devkit's ``box_velocity`` rotated into that frame, NaN -> 0.

    Args:
        data_root: nuScenes data root (holds ``VERSION/``, ``samples/``, ``maps/``).
        version: table folder, e.g. ``v1.0-trainval``, ``v1.0-mini``, ``v1.0-test`` or a custom
            version with a ``splits.json`` (e.g. the synthetic ``v1.0-synth``).
        skip_missing: when a sample's image or LiDAR file is missing or corrupt, log it, leave
            the sample out and go on (a summary is logged at the end) instead of failing.
        progress: show a progress bar (stderr).

    Returns:
        The written info files (``info_path(data_root, split)``), in split order.

    Raises:
        DataError: bad input; the message names the file and what was expected. No info file is
            written or changed then.
    """
    root, table_root = _check_folders(data_root, version)
    _check_table_files(table_root)
    # The small scene table and splits.json first: a wrong split file fails before the big tables load.
    scenes = _read_table(table_root, "scene")
    splits = _resolve_splits(root, table_root, version, scenes)
    tables = _load_tables(root, table_root, {"scene": scenes})
    nusc = _open_devkit(root, version, tables)

    contents: dict[str, dict[str, Any]] = {}
    total = skipped = 0
    per_split: list[str] = []
    for split, scene_names in splits.items():
        infos, n_samples, n_skipped = _build_split(
            nusc, root, table_root, split, scene_names, skip_missing, progress
        )
        total += n_samples
        skipped += n_skipped
        per_split.append(f"{split}: {n_skipped}")
        if not infos:
            logger.warning("split %s of %s has no usable samples; its info file is empty", split, version)
        contents[split] = {
            "format": INFO_FORMAT,
            "format_version": INFO_FORMAT_VERSION,
            "version": version,
            "split": split,
            "classes": list(CLASSES),
            "created_by": f"bevnext {__version__}",
            "infos": infos,
        }
    if skipped:
        logger.warning(
            "skipped %d of %d samples with missing or corrupt files (%s)",
            skipped,
            total,
            ", ".join(per_split),
        )
        if skipped == total:
            raise DataError(
                f"{root}: every sample of {version} has missing or corrupt files — wrong data root?"
            )

    # Written only now, after every split was built and checked, so a failure changes no file.
    paths = []
    for split, content in contents.items():
        path = info_path(root, split)
        atomic_write_json(path, content)
        paths.append(path)
    return paths


def load_infos(path: str | Path) -> InfoFile:
    """Read an info file written by ``create_infos``; never executes code (JSON only).

    Args:
        path: ``bevnext_infos_<split>.json``.

    Returns:
        The parsed ``InfoFile``.

    Raises:
        DataError: missing file, not a bevnext info file (other JSON, pickle, garbage), another
            format version, or classes that differ from ``CLASSES``.
    """
    path = Path(path)
    rerun = "re-run bevnext create-data"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: info file not found — run bevnext create-data") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the info file ({err.strerror or err})") from None
    if raw[:1] == b"\x80":
        # A pickle (the reference's .pkl infos) starts with the PROTO opcode; say so, never unpickle it.
        raise DataError(
            f"{path}: not a bevnext info file (it looks like a pickle, which bevnext never loads — {rerun})"
        )
    try:
        content = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DataError(f"{path}: not a bevnext info file (not JSON)") from None
    if not isinstance(content, dict) or content.get("format") != INFO_FORMAT:
        raise DataError(f"{path}: not a bevnext info file")
    format_version = content.get("format_version")
    if format_version != INFO_FORMAT_VERSION:
        raise DataError(
            f"{path}: info format version {format_version}, expected {INFO_FORMAT_VERSION} — {rerun}"
        )
    version, split, classes, infos = (content.get(key) for key in ("version", "split", "classes", "infos"))
    if not (
        isinstance(version, str)
        and isinstance(split, str)
        and isinstance(classes, list)
        and isinstance(infos, list)
        and all(isinstance(info, dict) for info in infos)
    ):
        raise DataError(
            f"{path}: damaged bevnext info file (version, split, classes or infos malformed) — {rerun}"
        )
    if classes != list(CLASSES):
        raise DataError(f"{path}: made for classes {classes}, this bevnext uses {list(CLASSES)} — {rerun}")
    created_by = str(content.get("created_by", ""))
    return InfoFile(version=version, split=split, classes=classes, infos=infos, created_by=created_by)


__all__ = [
    "CAMERAS",
    "INFO_FORMAT",
    "INFO_FORMAT_VERSION",
    "InfoFile",
    "create_infos",
    "info_path",
    "load_infos",
    "splits_for_version",
]
