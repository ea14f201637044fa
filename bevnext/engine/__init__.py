"""Run-time machinery: device and distributed setup (and, later, the training loop, EMA, checkpoints).

Everything device-specific goes through :mod:`bevnext.engine.device`; everything about process
groups through :mod:`bevnext.engine.dist`.
"""

from bevnext.engine.device import (
    DEVICE_TYPES,
    PRECISIONS,
    DeviceError,
    autocast,
    autocast_dtype,
    backend_for,
    device_module,
    grad_scaler,
    memory_stats,
    reset_peak_memory,
    resolve_device_type,
    seed_everything,
    seed_worker,
    synchronize,
)
from bevnext.engine.dist import (
    DistInfo,
    DistributedError,
    all_gather_object,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)

__all__ = [
    "DEVICE_TYPES",
    "PRECISIONS",
    "DeviceError",
    "DistInfo",
    "DistributedError",
    "all_gather_object",
    "all_reduce_mean",
    "autocast",
    "autocast_dtype",
    "backend_for",
    "barrier",
    "cleanup_distributed",
    "device_module",
    "get_rank",
    "get_world_size",
    "grad_scaler",
    "init_distributed",
    "is_main_process",
    "memory_stats",
    "reset_peak_memory",
    "resolve_device_type",
    "seed_everything",
    "seed_worker",
    "synchronize",
]
