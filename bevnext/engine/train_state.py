"""What a training run saves to continue exactly, and how it finds it again.

Every full checkpoint (``last.pth``, ``epoch_N.pth``) has the reference's top-level layout — mmcv's
``{"meta", "state_dict", "optimizer"}``, so the reference implementation loads our files — plus a
``train_state`` entry with everything else an exact continuation needs: EMA, loss scaler, the position in
the epoch's sampler order, every rank's RNG states, the resolved config and the environment. Any of them can
be resumed from; ``find_resumable`` picks ``last.pth`` or, when that is unreadable, the newest readable one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bevnext import __version__
from bevnext.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bevnext.errors import BevnextError
from bevnext.io import atomic_open
from bevnext.structures import CLASSES

logger = logging.getLogger("bevnext.train")

TRAIN_STATE_FORMAT = "bevnext-train-state"
"""``train_state["format"]``, checked on resume."""
TRAIN_STATE_VERSION = 1

_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pth$")


class ResumeError(BevnextError):
    """No checkpoint to continue from, or one that does not fit the run."""


@dataclass(frozen=True)
class Position:
    """Where a run is: ``epoch`` (0-based, the epoch in progress or the next one), optimizer steps already
    taken in it (``step_in_epoch``) and in total (``global_step``)."""

    epoch: int
    step_in_epoch: int
    global_step: int


def full_checkpoint(*, model_state: dict, optimizer_state: dict, ema_state: dict | None, scaler_state: dict,
                    base_lrs: list[float], position: Position, rngs: list[dict], config: dict,
                    environment: dict, bad_steps: int) -> dict[str, Any]:
    """The payload of ``last.pth`` / ``epoch_N.pth`` (see the module docstring)."""
    meta = {"epoch": position.epoch if position.step_in_epoch == 0 else position.epoch + 1,
            "iter": position.global_step, "bevnext_version": __version__, "CLASSES": list(CLASSES),
            "config": json.dumps(config)}
    return {
        "meta": meta,
        "state_dict": model_state,
        "optimizer": optimizer_state,
        "train_state": {
            "format": TRAIN_STATE_FORMAT,
            "version": TRAIN_STATE_VERSION,
            "ema": ema_state,
            "scaler": scaler_state,
            "base_lrs": base_lrs,
            "epoch": position.epoch,
            "step_in_epoch": position.step_in_epoch,
            "global_step": position.global_step,
            "bad_steps": bad_steps,
            "rng": rngs,
            "config": config,
            "environment": environment,
        },
    }


def ema_checkpoint(ema_state: dict, epoch: int) -> dict[str, Any]:
    """The reference EMA hook's ``epoch_N_ema.pth`` layout: ``{state_dict, epoch, updates}``."""
    return {"state_dict": ema_state["state_dict"], "epoch": epoch, "updates": ema_state["updates"]}


def check_resumable(ckpt: dict[str, Any], path: Path, model_config: dict[str, Any]) -> dict[str, Any]:
    """``ckpt``'s ``train_state`` after checking that it is ours and fits ``model_config``.

    Raises:
        ResumeError: not a training state (e.g. an EMA file or a reference checkpoint), or saved for another
            model configuration.
    """
    state = ckpt.get("train_state")
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT or "state_dict" not in ckpt:
        raise ResumeError(f"{path}: not a bevnext training checkpoint (expected a 'train_state' entry of format "
                          f"{TRAIN_STATE_FORMAT!r}; to start from its weights use --load-from)")
    if state.get("version") != TRAIN_STATE_VERSION:
        raise ResumeError(f"{path}: training state version {state.get('version')}, this bevnext reads version "
                          f"{TRAIN_STATE_VERSION}")
    if state.get("config", {}).get("model") != model_config:
        raise ResumeError(f"{path}: saved for another model configuration; resume with the config.json of its "
                          "run")
    return state


def _candidates(work_dir: Path) -> list[Path]:
    """``last.pth`` first, then ``epoch_N.pth`` newest epoch first."""
    epochs = sorted(((int(m.group(1)), p) for p in work_dir.glob("epoch_*.pth") if (m := _EPOCH_FILE.match(p.name))),
                    reverse=True)
    last = work_dir / "last.pth"
    return ([last] if last.exists() else []) + [p for _, p in epochs]


def find_resumable(work_dir: Path, model_config: dict[str, Any]) -> tuple[Path, dict[str, Any], str]:
    """The checkpoint an automatic resume continues from, loaded, with the reason it was chosen.

    ``last.pth`` when it loads and fits the run; otherwise the newest ``epoch_N.pth`` that does (each file that
    was passed over is named with its problem in the reason).

    Raises:
        ResumeError: nothing in ``work_dir`` can be resumed from.
    """
    problems: list[str] = []
    for path in _candidates(work_dir):
        try:
            ckpt = load_checkpoint(path)
            check_resumable(ckpt, path, model_config)
        except (CheckpointError, ResumeError) as err:
            problems.append(str(err))
            continue
        why = "the latest state" if not problems else "the newest readable checkpoint; passed over: " + "; ".join(
            problems)
        return path, ckpt, why
    if problems:
        raise ResumeError(f"{work_dir}: no checkpoint to resume from; " + "; ".join(problems))
    raise ResumeError(f"{work_dir}: no checkpoint to resume from (no last.pth or epoch_N.pth)")


def save_epoch_files(work_dir: Path, payload: dict[str, Any], ema_state: dict | None, epoch: int,
                     keep: int) -> list[Path]:
    """Write ``epoch_N.pth`` (+ ``epoch_N_ema.pth``), make ``last.pth`` a copy of it, prune old epochs.

    ``last.pth`` is replaced atomically by a byte copy (not a second serialisation): two independent files,
    so that a damaged ``last.pth`` still leaves ``epoch_N.pth`` to resume from.

    Returns:
        the files written.

    Raises:
        CheckpointError: a write failed; files already in place are intact.
    """
    epoch_path = work_dir / f"epoch_{epoch}.pth"
    save_checkpoint(epoch_path, payload)
    written = [epoch_path]
    if ema_state is not None:
        ema_path = work_dir / f"epoch_{epoch}_ema.pth"
        save_checkpoint(ema_path, ema_checkpoint(ema_state, epoch))
        written.append(ema_path)
    _copy_to_last(work_dir, epoch_path)
    written.append(work_dir / "last.pth")
    if keep > 0:
        prune_epoch_files(work_dir, keep)
    return written


def _copy_to_last(work_dir: Path, source: Path) -> None:
    """Atomically replace ``last.pth`` with a copy of ``source`` (a copy, not a link: a damaged file must not
    take its fallback with it)."""
    try:
        with open(source, "rb") as src, atomic_open(work_dir / "last.pth", "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 * 2**20)
    except OSError as err:
        raise CheckpointError(f"could not save checkpoint {work_dir / 'last.pth'}: {err.strerror or err}") from None


def prune_epoch_files(work_dir: Path, keep: int) -> None:
    """Delete ``epoch_N.pth`` / ``epoch_N_ema.pth`` of all but the ``keep`` newest epochs."""
    epochs = sorted({int(m.group(1)) for p in work_dir.glob("epoch_*.pth") if (m := _EPOCH_FILE.match(p.name))})
    for n in epochs[:-keep]:
        for name in (f"epoch_{n}.pth", f"epoch_{n}_ema.pth"):
            (work_dir / name).unlink(missing_ok=True)


__all__ = [
    "TRAIN_STATE_FORMAT",
    "TRAIN_STATE_VERSION",
    "Position",
    "ResumeError",
    "check_resumable",
    "ema_checkpoint",
    "find_resumable",
    "full_checkpoint",
    "prune_epoch_files",
    "save_epoch_files",
]
