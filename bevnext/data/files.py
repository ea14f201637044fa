"""Cheap integrity checks of the data files a nuScenes sample references.

A real nuScenes download is ~300 GB in many archives; a missing archive or an interrupted copy
shows up as missing or truncated files. These checks find that without decoding anything: they
``stat`` the file and read at most a few bytes from each end, so checking every camera image and
LiDAR sweep of a split costs seconds, not the hours a full decode would.

Each check returns ``None`` for a good file or a short description of the problem (no path: the
caller knows which file and which sample it belongs to and builds the full message).
"""

from __future__ import annotations

from pathlib import Path

JPEG_START = b"\xff\xd8"
"""Start-of-image marker every JPEG file begins with."""
JPEG_END = b"\xff\xd9"
"""End-of-image marker every complete JPEG file ends with."""
LIDAR_COLUMNS = 5
"""Columns of a nuScenes ``.pcd.bin`` point: x, y, z, intensity, ring index."""
LIDAR_POINT_BYTES = 4 * LIDAR_COLUMNS
"""Bytes per LiDAR point (float32 x 5 columns)."""

# Some encoders pad a JPEG after its end-of-image marker with zero bytes; looking at a short tail
# (rather than the last two bytes only) accepts that padding while still catching truncation,
# which cuts the file inside the entropy-coded data, before the marker.
_JPEG_TAIL_BYTES = 16


def _size_or_problem(path: Path, expected: str) -> int | str:
    """File size in bytes, or a problem description when it is missing or not a regular file."""
    try:
        if not path.exists():
            return f"missing (expected {expected})"
        if not path.is_file():
            return f"not a regular file (expected {expected})"
        return path.stat().st_size
    except OSError as err:
        return f"cannot be read ({err.strerror or err}); expected {expected}"


def jpeg_problem(path: str | Path) -> str | None:
    """Check that ``path`` looks like a complete JPEG file, reading only its first and last bytes.

    Args:
        path: image file.

    Returns:
        None when the file starts with the start-of-image marker ``FF D8`` and ends with the
        end-of-image marker ``FF D9`` (trailing zero padding allowed); otherwise what is wrong.
    """
    path = Path(path)
    size = _size_or_problem(path, "a JPEG image")
    if isinstance(size, str):
        return size
    if size < len(JPEG_START) + len(JPEG_END):
        return f"{size} bytes is too short to be a JPEG image — truncated?"
    try:
        with path.open("rb") as handle:
            head = handle.read(len(JPEG_START))
            handle.seek(max(0, size - _JPEG_TAIL_BYTES))
            tail = handle.read()
    except OSError as err:
        return f"cannot be read ({err.strerror or err}); expected a JPEG image"
    if head != JPEG_START:
        return "not a JPEG image (does not start with the start-of-image marker FF D8)"
    if not tail.rstrip(b"\x00").endswith(JPEG_END):
        return "not a complete JPEG (missing end-of-image marker FF D9) — truncated?"
    return None


def lidar_bin_problem(path: str | Path) -> str | None:
    """Check that ``path`` has the size of a nuScenes LiDAR point file (float32 x 5 columns).

    Args:
        path: ``.pcd.bin`` file.

    Returns:
        None when the file size is a positive multiple of ``LIDAR_POINT_BYTES``; otherwise what
        is wrong.
    """
    path = Path(path)
    size = _size_or_problem(path, f"a LiDAR point file of float32 x {LIDAR_COLUMNS} columns")
    if isinstance(size, str):
        return size
    if size == 0:
        return f"empty (expected float32 x {LIDAR_COLUMNS} columns per point) — truncated?"
    if size % LIDAR_POINT_BYTES:
        return (
            f"{size} bytes is not a multiple of {LIDAR_POINT_BYTES} (float32 x {LIDAR_COLUMNS} columns) "
            "— truncated?"
        )
    return None


__all__ = [
    "JPEG_END",
    "JPEG_START",
    "LIDAR_COLUMNS",
    "LIDAR_POINT_BYTES",
    "jpeg_problem",
    "lidar_bin_problem",
]
