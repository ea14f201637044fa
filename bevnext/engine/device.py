"""Which device we run on, and the few device-generic helpers everything else uses.

This module is the only place (besides the op dispatch in ``bevnext.ops``) that names a device type.
The rest of the code asks it for a device type, a collective backend, an autocast context, memory
statistics or a synchronisation, and never calls ``torch.cuda`` / ``torch.npu`` itself.

Choice of device (``resolve_device_type``): Ascend NPU (``torch_npu`` importable and a device
present) > CUDA > CPU, unless the caller names one. ``torch_npu`` is only imported when the NPU is
asked for, or when automatic selection probes for it; the probe first checks
``importlib.util.find_spec`` so that machines without ``torch_npu`` pay nothing and see no log noise.

Works with torch >= 2.1 (CANN 8.0 ships torch 2.1 + torch_npu); newer APIs are used only behind a guard.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import random
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np
import torch

from bevnext.errors import BevnextError, one_line

__all__ = [
    "DEVICE_TYPES",
    "PRECISIONS",
    "DeviceError",
    "autocast",
    "autocast_dtype",
    "backend_for",
    "choose_num_threads",
    "device_module",
    "grad_scaler",
    "memory_stats",
    "reset_peak_memory",
    "resolve_device_type",
    "seed_everything",
    "synchronize",
]

logger = logging.getLogger(__name__)

#: Device types we support, in order of preference for automatic selection.
DEVICE_TYPES: tuple[str, ...] = ("npu", "cuda", "cpu")
#: Mixed-precision modes accepted by :func:`autocast_dtype` / :func:`autocast`.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")

_BACKENDS: dict[str, str] = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
_AUTOCAST_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
_MB = float(2**20)

# Set once a probe of a present-but-broken torch_npu has warned, so repeated automatic selection
# (every rank, every call) does not repeat the same warning.
_npu_probe_warned = False


class DeviceError(BevnextError, RuntimeError):
    """The requested device (or precision on it) is unknown, unsupported or not available here.

    A ``BevnextError`` so that the ``bevnext`` command reports it as one line without a traceback;
    a ``RuntimeError`` so that generic callers can catch it as the usual "can't run here" error.
    """


def _torch_npu_installed() -> bool:
    """Whether ``torch_npu`` can be imported, without importing it."""
    if "torch_npu" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("torch_npu") is not None
    except (ImportError, ValueError):
        # ValueError: a module object without __spec__ was put in sys.modules under that name.
        return False


def _import_torch_npu() -> ModuleType:
    """Import ``torch_npu``, which registers ``torch.npu`` and the ``npu`` device with torch.

    Raises:
        DeviceError: ``torch_npu`` is not installed or fails to import (e.g. CANN not set up).
    """
    if not _torch_npu_installed():
        raise DeviceError(
            "device 'npu' requested but torch_npu is not installed "
            "(install the torch_npu build matching your torch and CANN, see the [npu] extra)"
        )
    try:
        return importlib.import_module("torch_npu")
    except Exception as exc:  # any failure inside torch_npu (missing CANN libs, ...) means "no NPU"
        raise DeviceError(
            f"device 'npu' requested but importing torch_npu failed ({one_line(exc, with_type=True)}); "
            "is CANN set up (source <cann>/set_env.sh)?"
        ) from exc


def _npu_device_count() -> int:
    """Number of visible NPUs; 0 when ``torch.npu`` is missing or the runtime reports none."""
    npu = getattr(torch, "npu", None)
    if npu is None:
        return 0
    try:
        return int(npu.device_count()) if npu.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken driver is the same as no device for our purpose
        return 0


def _probe_npu() -> bool:
    """Automatic selection: is an NPU usable? Never raises; warns once if torch_npu is broken."""
    global _npu_probe_warned
    if not _torch_npu_installed():
        return False
    try:
        importlib.import_module("torch_npu")
    except Exception as exc:  # noqa: BLE001 - fall back to CUDA/CPU whatever went wrong
        if not _npu_probe_warned:
            _npu_probe_warned = True
            logger.warning(
                "torch_npu is installed but failed to import (%s); not using the NPU", one_line(exc, with_type=True)
            )
        return False
    return _npu_device_count() > 0


def resolve_device_type(requested: str | None = None) -> str:
    """Decide which device type to run on.

    Args:
        requested: ``"npu"``, ``"cuda"``, ``"cpu"``, or ``None`` / ``"auto"`` to pick the best
            available one (NPU if ``torch_npu`` imports and a device is present, else CUDA if
            available, else CPU). Case and surrounding spaces are ignored.

    Returns:
        One of ``"npu"``, ``"cuda"``, ``"cpu"``.

    Raises:
        DeviceError: an unknown name, or an explicitly requested device that is not available.
    """
    name = "auto" if requested is None else str(requested).strip().lower()
    if name == "auto":
        if _probe_npu():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "npu":
        _import_torch_npu()
        if _npu_device_count() == 0:
            raise DeviceError(
                "device 'npu' requested but torch_npu reports no NPU device "
                "(check the driver, npu-smi and ASCEND_RT_VISIBLE_DEVICES)"
            )
        return "npu"
    if name == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda
            how = f"built with CUDA {built}" if built else "built without CUDA"
            raise DeviceError(
                f"device 'cuda' requested but torch.cuda.is_available() is False "
                f"(torch {torch.__version__} {how}; check the driver and CUDA_VISIBLE_DEVICES)"
            )
        return "cuda"
    if name == "cpu":
        return "cpu"
    raise DeviceError(f"unknown device {requested!r}; choose one of auto, {', '.join(DEVICE_TYPES)}")


def backend_for(device_type: str) -> str:
    """The ``torch.distributed`` backend for a device type: npu->hccl, cuda->nccl, cpu->gloo.

    Raises:
        DeviceError: ``device_type`` is not one of :data:`DEVICE_TYPES`.
    """
    try:
        return _BACKENDS[device_type]
    except KeyError:
        raise DeviceError(
            f"unknown device type {device_type!r}; choose one of {', '.join(DEVICE_TYPES)}"
        ) from None


def _device_type_of(device: torch.device | str) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def device_module(device: torch.device | str) -> Any | None:
    """The torch device module (``torch.npu`` / ``torch.cuda``) for a device, or ``None`` for CPU.

    Args:
        device: a device type (``"cuda"``), a device string (``"npu:1"``) or a ``torch.device``.

    Raises:
        DeviceError: an unsupported device type, or ``torch_npu`` unavailable for ``"npu"``.
    """
    kind = _device_type_of(device)
    if kind == "cpu":
        return None
    if kind == "cuda":
        return torch.cuda
    if kind == "npu":
        # Asking for the NPU module counts as asking for the NPU: import torch_npu if needed.
        if getattr(torch, "npu", None) is None:
            _import_torch_npu()
        return torch.npu  # type: ignore[attr-defined]
    raise DeviceError(f"unsupported device type {kind!r}; choose one of {', '.join(DEVICE_TYPES)}")


def _as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def synchronize(device: torch.device | str) -> None:
    """Wait for all queued work on ``device`` to finish (needed for honest timings); no-op on CPU."""
    dev = _as_device(device)
    module = device_module(dev)
    if module is not None:
        module.synchronize(dev)


def _peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MiB, or ``None`` where ``resource`` is missing."""
    try:
        import resource  # POSIX only; absent on Windows
    except ImportError:
        return None
    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    # ru_maxrss is in bytes on macOS but in KiB on Linux and the BSDs.
    return peak / _MB if sys.platform == "darwin" else peak / 1024.0


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Memory use of this process on ``device``, in MiB.

    Keys on NPU/CUDA: ``allocated_mb`` and ``max_allocated_mb`` (tensors held by the caching
    allocator, now and peak since the last :func:`reset_peak_memory`), ``reserved_mb`` and
    ``max_reserved_mb`` (memory the allocator holds from the driver).

    On CPU there is no allocator to ask, so ``allocated_mb`` and ``max_allocated_mb`` are 0 and
    ``max_rss_mb`` reports the peak resident set size of the whole process (all of Python, not only
    tensors; it cannot be reset). ``max_rss_mb`` is also included on NPU/CUDA, since host memory
    (data loading) matters there too. It is omitted where ``resource`` is unavailable (Windows).
    """
    dev = _as_device(device)
    module = device_module(dev)
    stats: dict[str, float] = {"allocated_mb": 0.0, "max_allocated_mb": 0.0}
    if module is not None:
        for key, fn_name in (
            ("allocated_mb", "memory_allocated"),
            ("max_allocated_mb", "max_memory_allocated"),
            ("reserved_mb", "memory_reserved"),
            ("max_reserved_mb", "max_memory_reserved"),
        ):
            fn = getattr(module, fn_name, None)
            if fn is not None:
                stats[key] = float(fn(dev)) / _MB
    rss = _peak_rss_mb()
    if rss is not None:
        stats["max_rss_mb"] = rss
    return stats


@contextlib.contextmanager
def saved_for_backward() -> Iterator[dict[int, int]]:
    """Record what autograd keeps for the backward of the operations run inside the block.

    Yields a dict ``{storage data pointer: bytes}`` filled as the block runs, each storage once (custom
    autograd Functions' saved tensors included). Its sum is the activation memory the block holds until its
    backward, the same on every device.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages


def reset_peak_memory(device: torch.device | str) -> None:
    """Restart the peak counters of :func:`memory_stats` on ``device``; no-op on CPU (RSS can't reset)."""
    dev = _as_device(device)
    module = device_module(dev)
    if module is not None:
        reset = getattr(module, "reset_peak_memory_stats", None)
        if reset is not None:
            reset(dev)


def autocast_dtype(device_type: str, precision: str) -> torch.dtype | None:
    """The autocast dtype for a precision mode on a device type.

    Args:
        device_type: ``"npu"``, ``"cuda"`` or ``"cpu"``.
        precision: ``"fp32"`` (no autocast), ``"fp16"`` or ``"bf16"``.

    Returns:
        ``None`` for fp32, else ``torch.float16`` / ``torch.bfloat16``.

    Raises:
        DeviceError: unknown precision or device type, or a combination the device can't run
            (fp16 autocast on CPU; bf16 on a CUDA GPU without bf16 support).
    """
    backend_for(device_type)  # validates the device type with the standard message
    mode = str(precision).strip().lower()
    if mode not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if mode == "fp32":
        return None
    if mode == "fp16" and device_type == "cpu":
        raise DeviceError("precision 'fp16' is not supported on cpu; use 'bf16' or 'fp32'")
    if (
        mode == "bf16"
        and device_type == "cuda"
        and torch.cuda.is_available()
        and not torch.cuda.is_bf16_supported()
    ):
        # torch.autocast would only warn and silently run in fp32; say so up front instead.
        raise DeviceError("precision 'bf16' is not supported by this CUDA GPU; use 'fp16' or 'fp32'")
    return _AUTOCAST_DTYPES[mode]


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """A context manager running the enclosed forward pass at ``precision`` on ``device``.

    Returns ``torch.autocast(device_type=..., dtype=...)`` for fp16/bf16 and a
    ``contextlib.nullcontext()`` for fp32, so callers can always write ``with autocast(dev, p):``.

    Raises:
        DeviceError: see :func:`autocast_dtype`.
    """
    kind = _device_type_of(device)
    dtype = autocast_dtype(kind, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=kind, dtype=dtype)


def grad_scaler(device: torch.device | str, precision: str) -> Any:
    """A gradient scaler for ``precision`` on ``device``, enabled only for fp16.

    bf16 and fp32 keep the fp32 exponent range and need no loss scaling, so the scaler is returned
    disabled (its ``scale``/``step``/``update`` pass through) and the training loop needs no branch.

    ``torch.amp.GradScaler(device_type)`` only exists from torch 2.3; before that the CUDA scaler
    is ``torch.cuda.amp.GradScaler``. On the NPU we use ``torch_npu.npu.amp.GradScaler``, which all
    torch_npu releases provide.

    Raises:
        DeviceError: see :func:`autocast_dtype`.
    """
    kind = _device_type_of(device)
    enabled = autocast_dtype(kind, precision) == torch.float16
    if kind == "npu":
        torch_npu = _import_torch_npu()
        return torch_npu.npu.amp.GradScaler(enabled=enabled)
    amp_scaler = getattr(torch.amp, "GradScaler", None)
    if amp_scaler is not None:
        return amp_scaler(kind, enabled=enabled)
    # torch < 2.3. On CPU the scaler is always disabled (no fp16 on CPU), so the CUDA class is fine.
    return torch.cuda.amp.GradScaler(enabled=enabled)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose_num_threads(requested: int, local_world_size: int, num_workers: int) -> int:
    """CPU threads for one training process, so that processes and loader workers do not oversubscribe.

    Each of the ``local_world_size`` processes on this node gets an equal share of the cores; its loader
    workers (one thread each) take their cores out of that share first. Oversubscription is expensive:
    on a 2-core machine the chunked ``bev_pool`` reference runs 5x slower when one other busy process
    shares the cores, much worse than running it on a single thread.

    Args:
        requested: a user's explicit choice (> 0 is returned as is); 0 = choose.
        local_world_size: training processes on this node.
        num_workers: loader workers per process.
    """
    if requested > 0:
        return requested
    share = max(1, available_cores() // max(1, local_world_size))
    return max(1, share - num_workers)


def seed_everything(base_seed: int, rank: int = 0, deterministic: bool = False) -> int:
    """Seed Python ``random``, NumPy and torch (CPU and accelerators) with ``base_seed + rank``.

    Each rank gets its own seed so that random augmentations differ across ranks while a rerun with
    the same seed reproduces them. Call it after :func:`resolve_device_type`, so that ``torch_npu``
    (if used) is already imported and its generators get seeded too.

    Args:
        base_seed: the run's seed.
        rank: the global rank of this process.
        deterministic: also make torch use deterministic kernels (``use_deterministic_algorithms``
            with ``warn_only=True``, so ops without a deterministic version warn rather than fail) and
            turn off cuDNN autotuning. ``False`` leaves those global flags as they are.

    Returns:
        The seed actually used, ``base_seed + rank``.

    Raises:
        ValueError: the seed is outside ``[0, 2**32)`` (NumPy's legacy seeding range).
    """
    seed = int(base_seed) + int(rank)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed base_seed + rank = {seed} must be in [0, 2**32)")
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - augmentations draw from the legacy global generator
    # Seeds the CPU generator and, lazily, every CUDA device.
    torch.manual_seed(seed)
    npu = getattr(torch, "npu", None) if "torch_npu" in sys.modules else None
    if npu is not None and hasattr(npu, "manual_seed_all"):
        # torch 2.1's manual_seed does not reach out-of-tree (privateuse1) devices reliably.
        npu.manual_seed_all(seed)
    if deterministic:
        # cuBLAS needs this workspace setting to be deterministic; it must be set before its first use,
        # and is harmless on machines without CUDA. setdefault keeps a user's own choice.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        cudnn = getattr(torch.backends, "cudnn", None)
        if cudnn is not None:
            cudnn.deterministic = True
            cudnn.benchmark = False
    return seed
