"""Shared pytest setup.

``TORCH_DEVICE=cuda`` (or ``npu``) runs the device-parametrised tests on that accelerator as well as
on the CPU; by default everything runs on the CPU.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import torch


def accelerator_device() -> str | None:
    """The accelerator named by ``TORCH_DEVICE`` when it is usable here, else None."""
    name = os.environ.get("TORCH_DEVICE", "").strip().lower()
    if name.startswith("cuda") and torch.cuda.is_available():
        return name
    if name.startswith("npu"):
        try:
            import torch_npu  # noqa: F401

            return name if torch.npu.is_available() else None
        except ImportError:
            return None
    return None


def test_devices() -> list[str]:
    """Devices that device-parametrised tests run on: the CPU plus the ``TORCH_DEVICE`` accelerator."""
    extra = accelerator_device()
    return ["cpu"] + ([extra] if extra else [])


test_devices.__test__ = False  # a helper, not a test


@pytest.fixture(params=test_devices())
def device(request) -> torch.device:
    """Parametrised over ``test_devices()``."""
    return torch.device(request.param)


TINY_SYNTH_ARGS: dict[str, Any] = {"scenes": 2, "samples_per_scene": 4, "image_size": (400, 225), "seed": 0}
"""``generate_dataset`` arguments of ``tiny_synth_root``; the other arguments keep their defaults.

The training tests (tests/engine) rely on its 4 ``synth_train`` samples: keep them when changing it.
"""


@pytest.fixture(scope="session")
def tiny_synth_args() -> Mapping[str, Any]:
    """``TINY_SYNTH_ARGS`` read-only, for tests that regenerate ``tiny_synth_root`` or rebuild its worlds."""
    return MappingProxyType(TINY_SYNTH_ARGS)


@pytest.fixture(scope="session")
def tiny_synth_root(tmp_path_factory):
    """The data root of a small synthetic nuScenes dataset with its info files, shared by a session (~2 s).

    2 scenes x 4 samples at 400x225 (one scene ``synth_train``, one ``synth_val``), seed 0. Point a tiny run
    at it with ``data.data_root=<root> data.src_size=[400,225]``. Read-only: a test that writes into a data
    root works on a ``shutil.copytree`` of it.
    """
    from bevnext.data.infos import create_infos
    from bevnext.synth import VERSION, generate_dataset

    root = tmp_path_factory.mktemp("synth") / "data"
    generate_dataset(root, **TINY_SYNTH_ARGS, progress=False)
    create_infos(root, VERSION, progress=False)
    return root


REPO_ROOT = Path(__file__).resolve().parents[1]

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
               "ROLE_RANK", "TORCHELASTIC_RUN_ID", "TORCH_DEVICE")
"""Variables of a torchrun launch: a test's child process must not inherit the caller's."""


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(drop_prefixes: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """The environment for a ``bevnext`` child process: no inherited launch variables (nor variables
    starting with ``drop_prefixes``), the checkout on ``PYTHONPATH``, gloo on the loopback interface, plus
    ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not (drop_prefixes and k.startswith(drop_prefixes))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    if sys.platform.startswith("linux"):
        # Gloo otherwise picks the interface its hostname resolves to, which in containers may not exist.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.update(extra)
    return env
