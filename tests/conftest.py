"""Shared pytest setup.

``TORCH_DEVICE=cuda`` (or ``npu``) runs the device-parametrised tests on that accelerator as well as
on the CPU; by default everything runs on the CPU.
"""

from __future__ import annotations

import os

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


@pytest.fixture(scope="session")
def tiny_synth_root(tmp_path_factory):
    """The data root of a small synthetic nuScenes dataset with its info files, shared by a session (~5 s).

    2 scenes x 4 samples at 400x225 (one scene ``synth_train``, one ``synth_val``), seed 0. Point a tiny run
    at it with ``data.data_root=<root> data.src_size=[400,225]``.
    """
    from bevnext.data.infos import create_infos
    from bevnext.data.synth import VERSION, generate_dataset

    root = tmp_path_factory.mktemp("synth") / "data"
    generate_dataset(root, scenes=2, samples_per_scene=4, image_size=(400, 225), seed=0, progress=False)
    create_infos(root, VERSION, progress=False)
    return root
