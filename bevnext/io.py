"""Atomic file writes: a reader never sees a half-written file, a crash never leaves one behind.

Each writer writes to a temporary file in the destination's folder (same file system) and
renames it over the destination with ``os.replace``, which is atomic on POSIX and Windows.
``to_jsonable`` turns nested containers with numpy scalars into what ``json.dumps`` accepts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before any other thread exists.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``path`` for writing through a temporary file that replaces it on success.

    On an exception the temporary file is removed and ``path`` is left untouched.

    Args:
        path: destination file; its parent folder is created if missing.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', got {mode!r}")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        # mkstemp creates the file owner-only; give it the permissions a plain open() would.
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = None) -> None:
    """Serialise ``obj`` as JSON to ``path`` atomically (NaN/inf are rejected: they are not JSON)."""
    text = json.dumps(obj, indent=indent, allow_nan=False)
    atomic_write_text(path, text)


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` in plain JSON types: dicts with string keys, lists, Python scalars.

    Dicts (``defaultdict`` included) become ``dict`` with ``str(key)`` keys, tuples and lists become
    lists, numpy scalars become the Python scalar of the same value; anything else is kept as is.
    Used for dataclass dumps (``dataclasses.asdict``: tuples) and the nuScenes devkit's metrics
    (nested defaultdicts of numpy floats).
    """
    if isinstance(obj, dict):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


@contextlib.contextmanager
def staging_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a whole folder next to ``dest`` and move it into place only when complete.

    Yields a temporary sibling folder; on success it is renamed to ``dest`` (which must not exist
    or be empty), on failure it is deleted, so ``dest`` is never left half-written.
    """
    dest_path = Path(dest)
    if dest_path.exists() and (not dest_path.is_dir() or any(dest_path.iterdir())):
        raise FileExistsError(f"{dest_path}: already exists and is not an empty folder")
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_path.name}.", suffix=".partial", dir=dest_path.parent))
    try:
        yield tmp
        if dest_path.exists():
            dest_path.rmdir()
        os.replace(tmp, dest_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
