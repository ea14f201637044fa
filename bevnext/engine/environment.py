"""What a run ran on: library versions, platform, source revision, CPU threads.

Logged at the start of every run (and stored next to its results) so that a number can be traced back to
the code and software stack that produced it. Nothing here may fail: every probe degrades to a string
that says what is missing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import bevnext
from bevnext.errors import one_line

__all__ = ["collect_environment", "format_environment"]

GIT_TIMEOUT_S = 5.0


def _module_version(name: str) -> str:
    """The version of an optional module, "not installed", or "unavailable: <reason>" when its import fails."""
    try:
        if importlib.util.find_spec(name) is None:
            return "not installed"
    except Exception:  # a broken parent package or finder; treat as absent
        return "not installed"
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # mx_driving raises arbitrary errors when no NPU/CANN is present
        return f"unavailable: {one_line(exc, with_type=True, first_line_only=True)}"
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(name.replace("_", "-"))
        except Exception:  # installed without distribution metadata
            version = "unknown version"
    return str(version)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            # No index refresh (and so no index.lock): other processes may be using the same checkout.
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None  # git missing, or hanging (e.g. a network file system)
    return out.stdout if out.returncode == 0 else None


def _git_state() -> tuple[str | None, bool | None]:
    """(HEAD revision, dirty) of the checkout bevnext is imported from, or (None, None) if it is not one."""
    source_root = Path(bevnext.__file__).resolve().parent.parent
    out = _git(["rev-parse", "--show-toplevel", "HEAD"], source_root)
    if out is None:
        return None, None
    lines = out.split()
    if len(lines) != 2:
        return None, None
    toplevel, revision = Path(lines[0]).resolve(), lines[1]
    # An installed copy in site-packages can sit inside some unrelated repository (a venv in a project);
    # that repository's revision says nothing about our code.
    inside = source_root.relative_to(toplevel).parts if source_root.is_relative_to(toplevel) else None
    if inside is None or any(part in ("site-packages", "dist-packages") for part in inside):
        return None, None
    status = _git(["status", "--porcelain"], source_root)
    return revision, (bool(status.strip()) if status is not None else None)


def collect_environment() -> dict[str, Any]:
    """Versions, platform and source revision of this process, as a flat JSON-serialisable dict."""
    revision, dirty = _git_state()
    return {
        "python": sys.version.split()[0],
        # str(): torch's version is a TorchVersion object, which weights_only loading refuses.
        "torch": str(torch.__version__),
        "torch_cuda": torch.version.cuda,  # None for CPU/NPU builds
        "torchvision": _module_version("torchvision"),
        "numpy": _module_version("numpy"),
        "bevnext": str(bevnext.__version__),
        "torch_npu": _module_version("torch_npu"),
        "mx_driving": _module_version("mx_driving"),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "git_revision": revision,
        "git_dirty": dirty,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def format_environment(env: dict[str, Any]) -> str:
    """``env`` as an aligned ``key: value`` block, one entry per line."""
    if not env:
        return "(no environment information)"
    width = max(len(key) for key in env)
    return "\n".join(f"{key.ljust(width)} : {value}" for key, value in env.items())
