"""Atomic writes leave either the old file or the new one, never a partial one."""

import dataclasses
import json
from collections import defaultdict

import numpy as np
import pytest

from bevnext.io import atomic_open, atomic_write_json, staging_dir, to_jsonable


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "a" / "x.json"
    atomic_write_json(dest, {"a": 1})
    atomic_write_json(dest, {"a": 2})
    assert json.loads(dest.read_text()) == {"a": 2}
    assert [p.name for p in dest.parent.iterdir()] == ["x.json"]


def test_failed_write_keeps_old_content(tmp_path):
    dest = tmp_path / "x.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(dest, "w") as handle:
            handle.write("new and partial")
            raise RuntimeError("crash mid-write")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_nan_is_not_written_as_json(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"a": float("nan")})
    assert not (tmp_path / "x.json").exists()


def test_staging_dir_moves_complete_folder_and_cleans_failed_one(tmp_path):
    dest = tmp_path / "out"
    with staging_dir(dest) as tmp:
        (tmp / "f.txt").write_text("done")
        assert not dest.exists()
    assert (dest / "f.txt").read_text() == "done"

    dest2 = tmp_path / "out2"
    with pytest.raises(KeyError):
        with staging_dir(dest2) as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyError("boom")
    assert not dest2.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staging_dir_refuses_non_empty_destination(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        with staging_dir(tmp_path / "out"):
            pass
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_devkit_style_metrics_become_plain_python():
    # The devkit's metrics: nested defaultdicts, numpy floats, non-string keys (distance thresholds).
    aps = defaultdict(lambda: defaultdict(float))
    aps["car"][0.5] = np.float64(0.25)
    aps["car"][np.float32(1.0)] = np.float32(0.5)
    metrics = {"label_aps": aps, "count": np.int64(3), "flags": (np.bool_(True), None), "name": "x"}
    plain = to_jsonable(metrics)
    assert plain == {"label_aps": {"car": {"0.5": 0.25, "1.0": 0.5}}, "count": 3, "flags": [True, None],
                     "name": "x"}
    assert type(plain["label_aps"]) is dict and type(plain["label_aps"]["car"]) is dict
    assert type(plain["count"]) is int and type(plain["flags"][0]) is bool
    assert type(plain["label_aps"]["car"]["0.5"]) is float
    assert json.loads(json.dumps(plain)) == plain


def test_dataclass_dump_tuples_become_lists():
    @dataclasses.dataclass
    class Section:
        size: tuple[int, int] = (256, 704)
        ranges: tuple[tuple[float, float], ...] = ((-51.2, 51.2), (1.0, 60.0))

    assert to_jsonable(dataclasses.asdict(Section())) == {"size": [256, 704], "ranges": [[-51.2, 51.2], [1.0, 60.0]]}


def test_input_is_not_modified():
    data = {"a": (1, 2), "b": [np.float64(1.5)]}
    to_jsonable(data)
    assert data == {"a": (1, 2), "b": [np.float64(1.5)]} and type(data["b"][0]) is np.float64
