"""The start of a ``bevnext train`` / ``bevnext eval`` process: process group, work dir, logging, threads."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bevnext.config.run import RunConfig
from bevnext.engine import dist as bdist
from bevnext.engine.device import choose_num_threads
from bevnext.engine.metrics import setup_logging

__all__ = ["start_process"]


def start_process(run: RunConfig, work_dir: Path, log_file: str, loader_workers: int) -> tuple[bdist.DistInfo, int]:
    """Join the torchrun group (or run alone), create ``work_dir`` on rank 0, log there, set the CPU threads.

    Args:
        run: the run (its ``runtime.device`` and ``runtime.num_threads``).
        work_dir: output folder, created by rank 0 before any rank logs into it.
        log_file: the log's name inside ``work_dir`` (rank 0 only).
        loader_workers: data-loading processes per rank, counted when choosing the threads.

    Returns:
        ``(who this process is, CPU threads it uses)``; the threads are chosen so that the processes on this
        node and their loader workers do not oversubscribe the cores.
    """
    info = bdist.init_distributed(None if run.runtime.device == "auto" else run.runtime.device)
    if info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
    bdist.barrier()
    setup_logging(work_dir, info.rank, filename=log_file)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = choose_num_threads(run.runtime.num_threads, local_world, loader_workers)
    torch.set_num_threads(threads)
    return info, threads
