"""Distributed setup for runs launched with ``torchrun`` (one process per device).

``torchrun`` (and ``python -m torch.distributed.launch --use-env``) tells each process who it is
through environment variables: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`init_distributed` reads them, pins the process to its device and creates the
default process group with the backend of that device (hccl / nccl / gloo). Without ``WORLD_SIZE``
(a plain ``python``/``bevnext`` call) or with ``WORLD_SIZE=1`` no group is created and every helper
here degrades to its single-process meaning, so callers never need an ``if distributed`` branch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from bevnext.engine.device import DEVICE_TYPES, backend_for, device_module, resolve_device_type
from bevnext.errors import BevnextError

__all__ = [
    "DistInfo",
    "DistributedError",
    "all_gather_object",
    "all_reduce_mean",
    "barrier",
    "cleanup_distributed",
    "gather_object_to_main",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "unwrap_model",
]


class DistributedError(BevnextError, RuntimeError):
    """The launch environment is inconsistent (missing or malformed torchrun variables, too few devices)."""


@dataclass(frozen=True)
class DistInfo:
    """Who this process is in the run, and where it computes.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        local_rank: rank on this node; also the index of the device this process uses.
        world_size: number of processes in the run (1 when not distributed).
        device: the device this process computes on, e.g. ``npu:3``, ``cuda:0`` or ``cpu``.
        backend: the ``torch.distributed`` backend for ``device`` (``hccl``/``nccl``/``gloo``), also
            reported when no process group exists so that logs show what would be used.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is global rank 0, the process that logs, evaluates and saves checkpoints."""
        return self.rank == 0


# The DistInfo returned by the call that created the process group, so that a second call returns the
# same answer (same device and backend) instead of re-deriving it.
_INFO: DistInfo | None = None


def _is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_int(env: Mapping[str, str], name: str, *, required: bool, default: int = 0) -> int:
    """Read an integer launch variable, with an error naming it if it is missing or malformed."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        if required:
            raise DistributedError(
                f"environment variable {name} is not set although WORLD_SIZE > 1; "
                "launch with torchrun, which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
            )
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def _pin_device(device_type: str, local_rank: int) -> torch.device:
    """The device of this process, made current for the accelerator runtime (nccl/hccl rely on it)."""
    if device_type == "cpu":
        return torch.device("cpu")
    module = device_module(device_type)
    count = int(module.device_count())
    if local_rank >= count:
        raise DistributedError(
            f"LOCAL_RANK={local_rank} but only {count} {device_type} device(s) are visible; start at most "
            f"{count} processes per node (torchrun --nproc_per_node) or check the visible-devices variable"
        )
    module.set_device(local_rank)
    return torch.device(device_type, local_rank)


def init_distributed(device: str | None = None, timeout_s: float = 1800) -> DistInfo:
    """Set up this process from the torchrun environment and return who it is.

    With ``WORLD_SIZE`` unset or 1, no process group is created and the result is rank 0 of 1, on
    ``device:LOCAL_RANK`` when torchrun set ``WORLD_SIZE=1``, else on device index 0. Otherwise the
    device type is resolved, ``device:LOCAL_RANK`` is made current, and the default group is created
    with ``init_method="env://"``. Calling it again once the group exists returns the same information.

    Args:
        device: ``"npu"``, ``"cuda"``, ``"cpu"`` or ``None``/``"auto"``, as for
            :func:`bevnext.engine.device.resolve_device_type`.
        timeout_s: how long collectives (and the initial rendezvous) may wait for the other ranks.

    Returns:
        This process's :class:`DistInfo`.

    Raises:
        DistributedError: a launch variable is missing or malformed, ranks are out of range, there
            are fewer devices than local ranks, or ``torch.distributed`` is unavailable.
        DeviceError: the requested device is unknown or unavailable.
    """
    global _INFO
    if _is_initialized():
        if _INFO is None:
            # Someone else created the group (e.g. a test harness); describe it rather than fail.
            backend = str(dist.get_backend())
            kind = next((k for k in DEVICE_TYPES if backend_for(k) == backend), "cpu")
            local_rank = _env_int(os.environ, "LOCAL_RANK", required=False)
            dev = (
                torch.device("cpu")
                if kind == "cpu"
                else torch.device(kind, device_module(kind).current_device())
            )
            _INFO = DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), dev, backend)
        if device is not None and device.strip().lower() not in ("auto", _INFO.device.type):
            raise DistributedError(
                f"distributed is already initialised on {_INFO.device.type}; cannot switch to {device!r}"
            )
        return _INFO

    env = os.environ
    world_size = _env_int(env, "WORLD_SIZE", required=False, default=1)
    if world_size < 1:
        raise DistributedError(f"environment variable WORLD_SIZE={world_size} must be >= 1")
    distributed = world_size > 1
    # Validate the whole environment before touching any device or network, so that a bad launch fails
    # at once with a message naming the variable rather than after a rendezvous timeout.
    if "WORLD_SIZE" in env:
        rank = _env_int(env, "RANK", required=distributed)
        local_rank = _env_int(env, "LOCAL_RANK", required=distributed)
    else:
        # Not launched by torchrun: a stray RANK/LOCAL_RANK from some other tool must not matter.
        rank = local_rank = 0
    if not 0 <= rank < world_size:
        raise DistributedError(f"environment variable RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    if local_rank < 0:
        raise DistributedError(f"environment variable LOCAL_RANK={local_rank} must be >= 0")
    if distributed:
        if not env.get("MASTER_ADDR", "").strip():
            raise DistributedError(
                "environment variable MASTER_ADDR is not set although WORLD_SIZE > 1; launch with torchrun"
            )
        port = _env_int(env, "MASTER_PORT", required=True)
        if not 0 < port < 65536:
            raise DistributedError(f"environment variable MASTER_PORT={port} is not a valid port")
        if not dist.is_available():
            raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")

    device_type = resolve_device_type(device)
    backend = backend_for(device_type)
    dev = _pin_device(device_type, local_rank)
    info = DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, backend=backend)
    if distributed:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
        _INFO = info
    return info


def cleanup_distributed() -> None:
    """Destroy the default process group if there is one; safe to call in any state.

    Call it on every rank once communication is over (normally at the end of ``main``). It does not
    synchronise the ranks first, so a rank that fails can call it on its way out without waiting for
    the others.
    """
    global _INFO
    if _is_initialized():
        # Deadlock seen with torch 2.1 + gloo (about 1 run in 4 after an all_gather): a backend worker
        # thread may still be dropping the last finished collective, whose tensors need the GIL to be
        # freed, while destroy_process_group holds the GIL and joins that thread. Sleeping releases the
        # GIL so the workers can finish first; 0.1 s once per run is nothing next to the hang it avoids.
        time.sleep(0.1)
        dist.destroy_process_group()
    _INFO = None


def get_rank() -> int:
    """Global rank of this process; 0 without a process group."""
    return dist.get_rank() if _is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the group; 1 without a process group."""
    return dist.get_world_size() if _is_initialized() else 1


def is_main_process() -> bool:
    """Whether this is global rank 0 (always true without a process group)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait until every rank gets here; no-op without a process group."""
    if not _is_initialized():
        return
    if dist.get_backend() == "nccl":
        # Without device_ids NCCL guesses the device from the rank and warns that it may hang if wrong.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where a tensor must live for a collective: CPU for gloo, this rank's device for nccl/hccl."""
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    if _INFO is not None:
        return _INFO.device
    return tensor.device


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``t`` over all ranks (e.g. to log a loss averaged over the run).

    Without a process group ``t`` itself is returned. Otherwise the result is a new, detached tensor
    on ``t``'s device (the input is not modified); integer and bool inputs are averaged in the default
    float dtype. The tensor is moved to the backend's device for the reduction if needed, so a CPU
    scalar can be passed with nccl/hccl. Every rank must call it with a tensor of the same shape.
    """
    if not _is_initialized() or dist.get_world_size() == 1:
        return t
    work = t.detach()
    if not (work.is_floating_point() or work.is_complex()):
        work = work.to(torch.get_default_dtype())
    work = work.to(_comm_device(work), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    work /= dist.get_world_size()
    return work.to(t.device)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside ``DistributedDataParallel`` and/or ``torch.compile`` wrappers.

    Its state-dict names carry no ``module.`` / ``_orig_mod.`` prefix, which is what checkpoints and the EMA
    are keyed by.
    """
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            # torch.compile's OptimizedModule; checked by attribute because its class lives in a private
            # module whose path differs between torch releases.
            model = model._orig_mod
        else:
            return model


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (e.g. to collect evaluation results on rank 0).

    The object is pickled, so it must be picklable and should hold CPU data. Without a process group
    the result is ``[obj]``.
    """
    if not _is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_object_to_main(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on rank 0, in rank order; ``[]`` on the other ranks.

    Unlike ``all_gather_object`` only rank 0 receives the data (evaluation predictions can be hundreds of MB).
    Without a process group the result is ``[obj]``.
    """
    if not _is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered if gathered is not None else []
