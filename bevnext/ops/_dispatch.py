"""Per-call choice between an op's pure-PyTorch reference and a device fast path.

Rules (DESIGN principle 3):
* The reference runs on every device and is the ground truth.
* A fast path is chosen by the input tensor's ``device.type`` at call time: ``npu`` -> ``mx_driving``
  (Ascend DrivingSDK), ``cuda`` -> an optional kernel module. Importing ``mx_driving`` on a machine
  without an NPU fails (it imports torch_npu), so it is imported lazily, only for NPU tensors.
* ``BEVNEXT_OPS=reference`` forces the reference everywhere (the first thing to try when a fast path
  is suspected).
* A missing or failing fast path logs once per (op, reason) and falls back; it never breaks import.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

logger = logging.getLogger(__name__)

_ENV = "BEVNEXT_OPS"
_MODULE_FOR_DEVICE = {"npu": "mx_driving"}
_import_cache: dict[str, ModuleType | None] = {}
_warned: set[tuple[str, str]] = set()


def reference_forced() -> bool:
    """True when ``BEVNEXT_OPS=reference`` asks for the reference implementation everywhere."""
    value = os.environ.get(_ENV, "").strip().lower()
    if value not in ("", "auto", "reference"):
        warn_once("dispatch", f"{_ENV}={value!r} is not understood (use 'reference' or 'auto'); using auto")
    return value == "reference"


def warn_once(op: str, reason: str) -> None:
    """Log ``reason`` for ``op`` once per process."""
    key = (op, reason)
    if key not in _warned:
        _warned.add(key)
        logger.warning("bevnext.ops.%s: %s", op, reason)


def fast_module(op: str, device_type: str) -> ModuleType | None:
    """The fast-path module for tensors on ``device_type``, or None when the reference must run.

    Args:
        op: op name, for the one-time log line.
        device_type: ``tensor.device.type`` of the op's input.
    """
    if reference_forced():
        return None
    name = _MODULE_FOR_DEVICE.get(device_type)
    if name is None:
        return None
    if name not in _import_cache:
        try:
            _import_cache[name] = importlib.import_module(name)
        except Exception as err:  # any import failure means: no fast path here
            _import_cache[name] = None
            warn_once(op, f"{name} is not usable ({type(err).__name__}: {err}); using the PyTorch reference")
    return _import_cache[name]
