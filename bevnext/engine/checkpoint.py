"""Checkpoint files: atomic saving, safe loading, weight initialisation and random-generator state.

Every checkpoint is read with ``torch.load(weights_only=True)``: a file can hold tensors, numbers,
strings, lists, tuples, dicts, ``None`` and bools, but nothing that needs code to be run to unpickle it.
Writes go through :func:`bevnext.io.atomic_open`, so a crash or a full disk never leaves a half-written
``last.pth`` behind, and the previous file stays usable.

Problems the user can fix (a missing, truncated or foreign file; a full disk) raise
:class:`CheckpointError` with a one-line message that names the file.
"""

from __future__ import annotations

import random
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bevnext.engine.dist import unwrap_model
from bevnext.errors import BevnextError
from bevnext.io import atomic_open

__all__ = [
    "CheckpointError",
    "LoadReport",
    "extract_state_dict",
    "load_checkpoint",
    "load_weights",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

# Wrappers prepend these to every key of a model's state dict: DistributedDataParallel adds ``module.``
# and torch.compile's OptimizedModule adds ``_orig_mod.``. The bare model never has them.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# How torch words a weights_only refusal of something that would run code, across torch 2.1 .. current
# (2.1 says "Unsupported class X", later versions "GLOBAL X was not an allowed global"). The first group,
# where present, names the refused class or function.
_NEEDS_CODE_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"Unsupported class (\S+)"),
    re.compile(r"unsupported GLOBAL (\S+)"),
    re.compile(r"instantiate unsupported class (\S+)"),
    re.compile(r"Can only create new object .* but got (\S+)"),
    re.compile(r"reduce for unrecognized function (\S+)"),
    re.compile(r"Can only build Tensor"),
)
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_MAX_DETAIL_CHARS = 200


class CheckpointError(BevnextError):
    """A checkpoint file is missing, unreadable, unsafe, of the wrong layout, or could not be written."""


def _first_line(exc: BaseException) -> str:
    """The informative first line of an exception raised by torch, as ``Type: message``.

    torch's weights_only errors are paragraphs of advice with the actual reason after
    ``WeightsUnpickler error:``; only that reason is kept, without terminal colour codes.
    """
    text = _ANSI_ESCAPE.sub("", str(exc))
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = lines[0] if lines else ""
    if len(detail) > _MAX_DETAIL_CHARS:
        detail = detail[: _MAX_DETAIL_CHARS - 3] + "..."
    name = type(exc).__name__
    return f"{name}: {detail}" if detail else name


def _os_error_in_chain(exc: BaseException) -> OSError | None:
    """The OSError that caused ``exc``, if any, following ``__cause__`` / ``__context__``.

    torch's zip writer turns a failed ``write`` (e.g. ENOSPC) into a RuntimeError ("unexpected pos")
    whose context is the original OSError; its ``strerror`` is what the user needs to see.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _save_error(path: Path, os_error: OSError | None, fallback: str) -> CheckpointError:
    """The one-line error for a failed save, naming the failing folder when it is not the target's own."""
    if os_error is None:
        return CheckpointError(f"could not save checkpoint {path}: {fallback}")
    reason = os_error.strerror or _first_line(os_error)
    failed = Path(os_error.filename) if isinstance(os_error.filename, str) else None
    # A failing temp file sits next to ``path`` and means nothing to the user; a failing parent folder
    # (mkdir over a regular file, say) does.
    if failed is not None and failed != path and failed.parent != path.parent:
        reason = f"{reason} ({failed})"
    return CheckpointError(f"could not save checkpoint {path}: {reason}")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` with ``torch.save``, atomically.

    The file only appears (or replaces an older one) once it is completely written and synced; on any
    failure the previous file at ``path`` is left byte-for-byte as it was and no temp file remains.

    Args:
        path: destination file; missing parent folders are created.
        payload: tensors, numbers, strings, lists, tuples, dicts, ``None`` and bools only, so that
            :func:`load_checkpoint` can read it back with ``weights_only=True``.

    Raises:
        CheckpointError: the file could not be written (disk full, permission denied, parent is a file).
    """
    dest = Path(path)
    try:
        with atomic_open(dest, "wb") as handle:
            torch.save(payload, handle)
    except OSError as exc:
        raise _save_error(dest, exc, "") from None
    except RuntimeError as exc:
        # Only write failures are the user's to fix; any other RuntimeError is a bug and keeps its traceback.
        os_error = _os_error_in_chain(exc)
        if os_error is not None:
            raise _save_error(dest, os_error, "") from None
        if "unexpected pos" in str(exc):
            raise _save_error(dest, None, "write failed (file system full or file too large?)") from None
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU without running any code from the file.

    Args:
        path: a file written by :func:`save_checkpoint`, by ``torch.save`` of a dict, or by mmcv.

    Returns:
        The checkpoint's top-level dict, tensors on the CPU.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, would need code to be run to unpickle
            it, or does not hold a dict.
    """
    src = Path(path)
    try:
        with warnings.catch_warnings():
            # torch 2.1's weights_only unpickler warns about its own use of TypedStorage on every load.
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
            obj = torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{src}: no such checkpoint file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{src}: is a directory, expected a checkpoint file") from None
    except Exception as exc:
        # torch raises many types on a bad file (UnpicklingError, RuntimeError, EOFError, OSError, KeyError,
        # BadZipFile, ValueError, ...) and they differ across versions; the user gets one line either way.
        message = _ANSI_ESCAPE.sub("", str(exc))
        for pattern in _NEEDS_CODE_PATTERNS:
            match = pattern.search(message)
            if match:
                what = f" ({match.group(1).rstrip('.,')})" if match.groups() else ""
                raise CheckpointError(
                    f"{src}: loading it would need to run code{what}, which is refused "
                    "(checkpoints are loaded with weights_only=True; save plain tensors, numbers and containers)"
                ) from None
        raise CheckpointError(
            f"{src}: not a readable checkpoint (truncated, corrupt or not from torch.save?): {_first_line(exc)}"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{src}: checkpoint holds a {type(obj).__name__}, expected a dict")
    return obj


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(key, str) and isinstance(v, Tensor) for key, v in obj.items())


def _strip_wrapper_prefixes(key: str) -> str:
    # Both wrappers can be stacked (compile inside DDP or the other way round), so strip until none is left.
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def extract_state_dict(ckpt: dict[str, Any], path: str | Path) -> dict[str, Tensor]:
    """Find the model weights in a loaded checkpoint.

    Accepted layouts: our training files (``{"model": state_dict, ...}``), our EMA files and the reference
    implementation's mmcv files (``{"state_dict": state_dict, ...}``), and a bare state dict (every value a
    tensor). Leading ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile) are removed
    from every key.

    Args:
        ckpt: the dict returned by :func:`load_checkpoint`.
        path: the file it came from, for error messages.

    Returns:
        Parameter/buffer name -> tensor, in the file's order.

    Raises:
        CheckpointError: no state dict of tensors is found, or two keys collide once prefixes are removed.
    """
    state: dict[str, Tensor] | None = None
    for entry in ("state_dict", "model"):
        if entry in ckpt and _is_tensor_dict(ckpt[entry]):
            state = ckpt[entry]
            break
    # A bare state dict must be non-empty: an empty dict would otherwise pass as "all values are tensors".
    if state is None and ckpt and _is_tensor_dict(ckpt):
        state = ckpt
    if state is None:
        keys = ", ".join(str(key) for key in list(ckpt)[:10]) + (", ..." if len(ckpt) > 10 else "")
        raise CheckpointError(
            f"{path}: not a model checkpoint (expected a 'state_dict' or 'model' entry of tensors; "
            f"found keys: {keys or 'none'})"
        )
    result: dict[str, Tensor] = {}
    for key, value in state.items():
        name = _strip_wrapper_prefixes(key)
        if name in result:
            raise CheckpointError(f"{path}: tensor name {name!r} occurs twice once 'module.'/'_orig_mod.' are removed")
        result[name] = value
    return result


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(size) for size in shape) + "]"


@dataclass
class LoadReport:
    """What :func:`load_weights` did with each tensor name.

    Attributes:
        loaded: names copied from the file into the model.
        mismatched: ``(name, checkpoint shape, model shape)`` for names in both with different shapes;
            the model keeps its initial values for those.
        missing: names the model has and the file does not (left at their initial values).
        unexpected: names the file has and the model does not (ignored).
    """

    loaded: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line of counts, e.g. ``loaded 812 tensors, 4 shape-mismatched, 6 missing, 0 unexpected``."""
        return (
            f"loaded {len(self.loaded)} tensors, {len(self.mismatched)} shape-mismatched, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"
        )

    def table(self, max_rows: int = 20, show_loaded: bool = False) -> str:
        """A plain-text, multi-line report: the summary, then the names of each non-empty category.

        Args:
            max_rows: names listed per category; the rest are counted as ``... and N more``.
            show_loaded: also list the loaded names (off by default: in a healthy load they are
                hundreds of lines that say nothing).
        """
        lines = [self.summary()]

        def section(title: str, rows: list[str]) -> None:
            if not rows:
                return
            lines.append(f"{title} ({len(rows)}):")
            lines.extend(f"  {row}" for row in rows[:max_rows])
            if len(rows) > max_rows:
                lines.append(f"  ... and {len(rows) - max_rows} more")

        if self.mismatched:
            width = max(len(name) for name, _, _ in self.mismatched[:max_rows])
            ckpt_width = max(len(_fmt_shape(shape)) for _, shape, _ in self.mismatched[:max_rows])
            rows = [
                f"{name:<{width}}  checkpoint {_fmt_shape(ckpt_shape):<{ckpt_width}}  model {_fmt_shape(model_shape)}"
                for name, ckpt_shape, model_shape in self.mismatched
            ]
            section("shape-mismatched, kept the model's initial values", rows)
        section("missing from the checkpoint, kept the model's initial values", self.missing)
        section("unexpected in the checkpoint, ignored", self.unexpected)
        if show_loaded:
            section("loaded", self.loaded)
        return "\n".join(lines)


def load_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Initialise ``model`` from the weights in a checkpoint file (``--load-from``), tolerating differences.

    Every tensor (parameters and buffers such as BatchNorm running statistics) whose name exists in the
    model with the same shape is copied, cast to the model's dtype; everything else is reported, not loaded.
    Optimizer state, epochs and random state in the file are ignored.

    Args:
        model: the model, possibly wrapped in DistributedDataParallel or torch.compile.
        path: a checkpoint in any layout :func:`extract_state_dict` accepts.

    Returns:
        What was loaded, shape-mismatched, missing and unexpected.

    Raises:
        CheckpointError: the file cannot be read, holds no weights, or none of its names fits the model.
    """
    state = extract_state_dict(load_checkpoint(path), path)
    target = unwrap_model(model)
    own = target.state_dict()
    report = LoadReport()
    to_load: dict[str, Tensor] = {}
    for name, current in own.items():
        if name not in state:
            report.missing.append(name)
            continue
        value = state[name]
        if tuple(value.shape) != tuple(current.shape):
            report.mismatched.append((name, tuple(value.shape), tuple(current.shape)))
            continue
        to_load[name] = value.to(dtype=current.dtype)
        report.loaded.append(name)
    report.unexpected = [name for name in state if name not in own]
    if not report.loaded:
        raise CheckpointError(f"{path}: no tensor name matches this model (a checkpoint of another model?)")
    # strict=False because the missing names are expected; everything passed in has been checked to fit.
    target.load_state_dict(to_load, strict=False)
    return report


def _npu_module() -> Any | None:
    # Only when torch_npu has already been imported (by the device layer): importing it here would fail
    # on machines without an NPU, and an unimported torch_npu has no generators in use anyway.
    npu = getattr(torch, "npu", None) if "torch_npu" in sys.modules else None
    return npu if npu is not None and hasattr(npu, "get_rng_state_all") else None


def rng_state() -> dict[str, Any]:
    """Capture every random generator a training run draws from, in a form ``weights_only`` can load.

    Returns:
        ``{"python": (version, tuple of ints, gauss_next), "numpy": {...}, "torch": uint8 tensor}`` plus
        ``"cuda"`` / ``"npu"`` (a list of uint8 tensors, one per device) where those devices are in use.
        NumPy's key array is stored as an int64 tensor because weights_only refuses NumPy arrays.
    """
    version, internal, gauss_next = random.getstate()
    # The legacy global generator is what data augmentations (and third-party code) draw from.
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": (int(version), tuple(int(word) for word in internal), gauss_next),
        "numpy": {
            "bit_generator": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    npu = _npu_module()
    if npu is not None:
        state["npu"] = list(npu.get_rng_state_all())
    return state


def _set_device_states(module: Any, states: list[Tensor]) -> None:
    # A run resumed on fewer devices than it was saved on restores the devices it has; extra states are
    # for devices this process cannot see.
    for index, device_state in enumerate(states[: module.device_count()]):
        module.set_rng_state(device_state.to(dtype=torch.uint8, device="cpu"), index)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by :func:`rng_state` (possibly after a round trip through a file).

    Entries for devices that are not available here (e.g. ``"cuda"`` on a CPU-only machine) are skipped.
    """
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((int(version), tuple(int(word) for word in internal), gauss_next))
    if "numpy" in state:
        saved = state["numpy"]
        keys = saved["keys"]
        keys = keys.numpy() if isinstance(keys, Tensor) else np.asarray(keys)
        np.random.set_state(  # noqa: NPY002 - restores the legacy global generator captured above
            (
                saved["bit_generator"],
                keys.astype(np.uint32),
                int(saved["pos"]),
                int(saved["has_gauss"]),
                float(saved["cached_gaussian"]),
            )
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(dtype=torch.uint8, device="cpu"))
    if "cuda" in state and torch.cuda.is_available():
        _set_device_states(torch.cuda, state["cuda"])
    npu = _npu_module()
    if "npu" in state and npu is not None:
        _set_device_states(npu, state["npu"])
