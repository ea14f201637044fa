"""Training-log plumbing: smoothed meters, ETA formatting, a JSON-lines/TensorBoard writer and logging setup.

No hook framework: the training loop owns a few :class:`SmoothedValue` meters, formats a line every
``log_interval`` iterations and hands the numbers to :class:`MetricWriter`. Only rank 0 writes files;
other ranks get disabled writers and a logger that only reports warnings, so that a multi-process run
prints each line once but still shows problems on any rank.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

__all__ = ["MetricWriter", "SmoothedValue", "format_eta", "setup_logging"]

LOGGER_NAME = "bevnext"
METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tf_logs"  # where the reference's TensorBoard hook writes, under the work dir

_logger = logging.getLogger(__name__)


class SmoothedValue:
    """A series of values with statistics over a sliding window and over the whole series.

    The window statistics (``median``, ``avg``) smooth the noisy per-iteration losses and timings for log
    lines; ``global_avg`` is the average over everything seen, weighted by ``n``.
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._window: deque[float] = deque(maxlen=window)
        self._total = 0.0
        self._count = 0

    def update(self, value: float, n: int = 1) -> None:
        """Add ``value``, counted ``n`` times in the global average (e.g. a batch mean over ``n`` samples)."""
        value = float(value)
        self._window.append(value)
        self._total += value * n
        self._count += n

    @property
    def median(self) -> float:
        """Median of the window (NaN when empty)."""
        return statistics.median(self._window) if self._window else math.nan

    @property
    def avg(self) -> float:
        """Mean of the window (NaN when empty)."""
        return sum(self._window) / len(self._window) if self._window else math.nan

    @property
    def global_avg(self) -> float:
        """Weighted mean of every value seen (NaN when empty)."""
        return self._total / self._count if self._count else math.nan

    @property
    def latest(self) -> float:
        """The most recent value (NaN when empty)."""
        return self._window[-1] if self._window else math.nan

    @property
    def count(self) -> int:
        """Total weight ``n`` of all updates."""
        return self._count


def format_eta(seconds: float) -> str:
    """Seconds as ``H:MM:SS`` with days in front when needed: ``0:05:07``, ``1 day, 2:03:04``.

    Negative values (clock jitter at the very end of a run) show as ``0:00:00``; NaN or infinity (no
    timing yet) as ``unknown``.
    """
    if not math.isfinite(seconds):
        return "unknown"
    return str(timedelta(seconds=max(0, round(seconds))))


def _json_value(value: Any) -> Any:
    """A JSON-safe version of one metric value; non-finite floats become the strings "nan", "inf", "-inf"."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()  # 0-d tensors and numpy scalars
    if isinstance(value, float) and not math.isfinite(value):
        # Strict JSON has no NaN/Infinity literals; strings keep every line parseable by any JSON reader.
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


class MetricWriter:
    """Appends one JSON object per logged step to ``work_dir/metrics.jsonl`` and mirrors scalars to TensorBoard.

    Args:
        work_dir: directory of the run; None writes nothing (e.g. a dry run).
        enabled: False makes every method a no-op; pass ``is_main_process()`` so only rank 0 writes.
        tensorboard: also write TensorBoard events under ``work_dir/tf_logs`` when the optional
            ``tensorboard`` package is installed; without it this is silently skipped.
    """

    def __init__(self, work_dir: Path | None, enabled: bool = True, tensorboard: bool = True) -> None:
        self._file: IO[str] | None = None
        self._tb: Any = None
        if not enabled or work_dir is None:
            return
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        # Append, so that a resumed run continues the same file instead of losing the earlier history.
        self._file = open(work_dir / METRICS_FILENAME, "a", encoding="utf-8")  # closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as exc:  # missing package or a broken protobuf: TensorBoard is optional
                _logger.debug("TensorBoard logging disabled: %s", exc)
            else:
                self._tb = SummaryWriter(log_dir=str(work_dir / TENSORBOARD_DIRNAME))

    @property
    def path(self) -> Path | None:
        """The JSON-lines file, or None when this writer writes nothing."""
        return Path(self._file.name) if self._file is not None else None

    def write(self, step: int, values: dict[str, float | int | str]) -> None:
        """Record ``values`` for iteration ``step``: one line ``{"iteration": step, **values}``."""
        if self._file is None:
            return
        record = {"iteration": int(step), **{key: _json_value(value) for key, value in values.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        # Flush every line: a crash (or a killed job) then loses at most the line being written.
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        """Flush and close the files; further writes are ignored."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def setup_logging(work_dir: Path | None, rank: int, filename: str = "log.txt") -> logging.Logger:
    """Configure and return the ``bevnext`` logger (module loggers ``bevnext.*`` inherit from it).

    Rank 0 logs INFO and above to stdout and, when ``work_dir`` is given, appends to ``work_dir/filename``.
    Other ranks log WARNING and above to stderr, prefixed ``[rank N]``. Calling it again replaces the
    handlers of the previous call instead of adding more, so a line is never written twice.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if getattr(handler, "_bevnext_setup", False):
            logger.removeHandler(handler)
            handler.close()
    # Our handlers print everything; letting records reach the root logger as well would print them twice
    # whenever the application (or a library) has configured the root.
    logger.propagate = False
    datefmt = "%Y-%m-%d %H:%M:%S"
    handlers: list[logging.Handler] = []
    if rank == 0:
        logger.setLevel(logging.INFO)
        formatter = logging.Formatter("%(asctime)s %(message)s", datefmt=datefmt)
        handlers.append(logging.StreamHandler(sys.stdout))
        if work_dir is not None:
            work_dir = Path(work_dir)
            work_dir.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(work_dir / filename, mode="a", encoding="utf-8"))
    else:
        logger.setLevel(logging.WARNING)
        formatter = logging.Formatter(f"[rank {rank}] %(asctime)s %(levelname)s %(message)s", datefmt=datefmt)
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._bevnext_setup = True  # type: ignore[attr-defined] - marks the handlers a later call replaces
        logger.addHandler(handler)
    return logger
