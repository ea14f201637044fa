"""Device selection, backend mapping, autocast, memory statistics and seeding."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import random
import sys
import types

import numpy as np
import pytest
import torch

from bevnext.engine import device as device_mod
from bevnext.engine.device import (
    DeviceError,
    autocast,
    autocast_dtype,
    backend_for,
    grad_scaler,
    memory_stats,
    reset_peak_memory,
    resolve_device_type,
    seed_everything,
    synchronize,
)
from bevnext.errors import BevnextError

TORCH_NPU_INSTALLED = importlib.util.find_spec("torch_npu") is not None
needs_no_torch_npu = pytest.mark.skipif(TORCH_NPU_INSTALLED, reason="torch_npu is installed here")


def _cuda_available(monkeypatch, available: bool) -> None:
    """Make ``torch.cuda.is_available()`` answer ``available``, so both branches run on any machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)


# ----------------------------------------------------------------------------------------------- selection
@needs_no_torch_npu
@pytest.mark.parametrize("requested", [None, "auto", " AUTO "])
@pytest.mark.parametrize("cuda", [True, False])
def test_auto_prefers_cuda_to_cpu(monkeypatch, requested, cuda):
    _cuda_available(monkeypatch, cuda)
    assert resolve_device_type(requested) == ("cuda" if cuda else "cpu")


@pytest.mark.parametrize("requested", ["cpu", "CPU", " cpu"])
def test_explicit_cpu(requested):
    assert resolve_device_type(requested) == "cpu"


def test_explicit_cuda_follows_availability(monkeypatch):
    _cuda_available(monkeypatch, True)
    assert resolve_device_type(" CUDA") == "cuda"
    _cuda_available(monkeypatch, False)
    with pytest.raises(DeviceError, match=r"'cuda' requested but torch.cuda.is_available\(\) is False") as err:
        resolve_device_type("cuda")
    assert "\n" not in str(err.value) and f"torch {torch.__version__}" in str(err.value)


@pytest.mark.parametrize("bad", ["gpu", "tpu", "", "cuda:0"])
def test_unknown_device_names_choices(bad):
    with pytest.raises(DeviceError) as err:
        resolve_device_type(bad)
    msg = str(err.value)
    assert "\n" not in msg
    for choice in ("auto", "npu", "cuda", "cpu"):
        assert choice in msg


@pytest.mark.parametrize("caught", [BevnextError, RuntimeError])
def test_device_error_is_a_user_error(caught):
    # The CLI prints BevnextErrors as one line; generic code catches the usual RuntimeError.
    with pytest.raises(caught):
        resolve_device_type("gpu")


@needs_no_torch_npu
def test_npu_without_torch_npu_is_a_clear_error():
    with pytest.raises(DeviceError, match="torch_npu") as err:
        resolve_device_type("npu")
    assert "\n" not in str(err.value)
    assert "torch_npu" not in sys.modules


@needs_no_torch_npu
def test_auto_without_torch_npu_does_not_import_it(caplog):
    with caplog.at_level(logging.DEBUG, logger="bevnext"):
        resolve_device_type("auto")
    assert "torch_npu" not in sys.modules
    assert caplog.records == []


@pytest.fixture
def broken_torch_npu(tmp_path, monkeypatch):
    """A ``torch_npu`` that is installed but fails to import, as when CANN is not set up."""
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise ImportError('libhccl.so: cannot open shared object file\\n(second line)')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(device_mod, "_npu_probe_warned", False)
    yield
    sys.modules.pop("torch_npu", None)


@needs_no_torch_npu
def test_auto_with_broken_torch_npu_warns_once_and_falls_back(broken_torch_npu, caplog):
    with caplog.at_level(logging.WARNING, logger="bevnext.engine.device"):
        first = resolve_device_type("auto")
        second = resolve_device_type(None)
    assert first == second == ("cuda" if torch.cuda.is_available() else "cpu")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "torch_npu" in warnings[0].getMessage()


@needs_no_torch_npu
def test_explicit_npu_with_broken_torch_npu_is_one_line_error(broken_torch_npu):
    with pytest.raises(DeviceError, match="torch_npu") as err:
        resolve_device_type("npu")
    msg = str(err.value)
    assert "libhccl.so" in msg
    assert "\n" not in msg


def _fake_torch_npu(monkeypatch, count: int) -> None:
    """Pretend torch_npu is imported and ``torch.npu`` reports ``count`` devices."""
    fake = types.ModuleType("torch_npu")
    fake.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    npu = types.SimpleNamespace(is_available=lambda: count > 0, device_count=lambda: count)
    monkeypatch.setattr(torch, "npu", npu, raising=False)


@needs_no_torch_npu
def test_auto_prefers_npu_when_present(monkeypatch):
    _fake_torch_npu(monkeypatch, count=2)
    assert resolve_device_type("auto") == "npu"
    assert resolve_device_type("npu") == "npu"


@needs_no_torch_npu
def test_npu_without_device(monkeypatch):
    _fake_torch_npu(monkeypatch, count=0)
    assert resolve_device_type("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="no NPU device"):
        resolve_device_type("npu")


@pytest.mark.parametrize(("kind", "backend"), [("npu", "hccl"), ("cuda", "nccl"), ("cpu", "gloo")])
def test_backend_mapping(kind, backend):
    assert backend_for(kind) == backend


def test_backend_unknown():
    with pytest.raises(DeviceError, match="choose one of"):
        backend_for("mps")


def test_device_module():
    assert device_mod.device_module("cpu") is None
    assert device_mod.device_module(torch.device("cuda", 0)) is torch.cuda
    with pytest.raises(DeviceError):
        device_mod.device_module("meta")


# ------------------------------------------------------------------------------------------------ autocast
def test_autocast_dtypes():
    assert autocast_dtype("cpu", "fp32") is None
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16
    assert autocast_dtype("npu", "fp16") is torch.float16
    assert autocast_dtype("npu", "BF16") is torch.bfloat16


def test_autocast_unknown_precision():
    with pytest.raises(DeviceError, match="fp32, fp16, bf16"):
        autocast_dtype("cpu", "fp8")


def test_autocast_fp32_is_a_no_op(device):
    a = torch.randn(8, 8, device=device)
    with autocast(device, "fp32"):
        out = a @ a
    assert out.dtype == torch.float32
    # A no-op, not "autocast disabled": an enclosing autocast region stays in force.
    outer = torch.bfloat16 if device.type == "cpu" else torch.float16  # what each device type supports
    with torch.autocast(device_type=device.type, dtype=outer), autocast(device, "fp32"):
        assert (a @ a).dtype == outer


def test_autocast_bf16_on_cpu():
    a = torch.randn(8, 8)
    with autocast(torch.device("cpu"), "bf16"):
        out = a @ a
    assert out.dtype == torch.bfloat16
    # Autocast ends with the block.
    assert (a @ a).dtype == torch.float32


def test_autocast_fp16_on_cpu_rejected():
    with pytest.raises(DeviceError, match="fp16"):
        autocast(torch.device("cpu"), "fp16")


def test_autocast_fp16_on_accelerator(device):
    if device.type == "cpu":
        pytest.skip("fp16 autocast needs an accelerator")
    a = torch.randn(8, 8, device=device)
    with autocast(device, "fp16"):
        out = a @ a
    assert out.dtype == torch.float16


def test_grad_scaler_disabled_unless_fp16(device):
    loss = torch.tensor(3.0, device=device)
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    for precision in ("fp32", "bf16") if bf16 else ("fp32",):
        scaler = grad_scaler(device, precision)
        assert not scaler.is_enabled(), precision
        assert scaler.scale(loss) is loss, precision  # passes the loss through: no branch in the loop
    if device.type == "cpu":
        with pytest.raises(DeviceError, match="fp16"):
            grad_scaler(device, "fp16")
    else:
        scaler = grad_scaler(device, "fp16")
        assert scaler.is_enabled()
        assert scaler.scale(loss).item() == 3.0 * scaler.get_scale() and scaler.get_scale() > 1.0


# ---------------------------------------------------------------------------------------- memory / sync
def test_memory_stats_cpu():
    stats = memory_stats(torch.device("cpu"))
    # No allocator to ask on the CPU: tensor counters are 0, no reserved_* keys, the peak RSS stands in.
    rss = {"max_rss_mb"} if sys.platform != "win32" else set()
    assert set(stats) == {"allocated_mb", "max_allocated_mb", *rss}
    assert stats["allocated_mb"] == stats["max_allocated_mb"] == 0.0
    assert all(isinstance(v, float) for v in stats.values())
    reset_peak_memory("cpu")  # no-op, must not raise
    synchronize(torch.device("cpu"))


def _proc_mib(path: str, key: str) -> float:
    """A ``key: N kB`` value of a /proc file, in MiB."""
    with open(path, encoding="ascii") as handle:
        for line in handle:
            if line.startswith(f"{key}:"):
                return float(line.split()[1]) / 1024.0
    raise AssertionError(f"no {key} in {path}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_max_rss_is_the_kernels_peak_in_mib():
    # ru_maxrss is in KiB on Linux (bytes on macOS): a wrong unit is off by 1024 against VmHWM.
    peak_before = _proc_mib("/proc/self/status", "VmHWM")
    rss = memory_stats("cpu")["max_rss_mb"]
    # At least this process's own peak (it may be more: the kernel also counts the image replaced by exec),
    # and never more than the machine's memory.
    assert peak_before - 1.0 <= rss <= _proc_mib("/proc/meminfo", "MemTotal")


def test_memory_stats_accelerator(device):
    if device.type == "cpu":
        pytest.skip("needs an accelerator")
    reset_peak_memory(device)
    x = torch.empty(16 * 2**20, dtype=torch.uint8, device=device)
    synchronize(device)
    stats = memory_stats(device)
    assert stats["max_allocated_mb"] >= 16.0
    assert stats["allocated_mb"] >= 16.0
    del x


# ------------------------------------------------------------------------------------------------- seeding
def _np_global(n: int) -> list[float]:
    """Draws from NumPy's legacy global generator, the one seed_everything must seed."""
    return np.random.rand(n).tolist()  # noqa: NPY002 - the legacy global generator is what we test


def _draws() -> tuple[list[float], list[float], list[float]]:
    return [random.random() for _ in range(4)], _np_global(4), torch.rand(4).tolist()


def test_same_seed_same_draws():
    assert seed_everything(1234, rank=3) == 1237
    first = _draws()
    seed_everything(1234, rank=3)
    assert _draws() == first


def test_rank_changes_draws():
    seed_everything(1234, rank=0)
    rank0 = _draws()
    seed_everything(1234, rank=1)
    rank1 = _draws()
    for a, b in zip(rank0, rank1):
        assert a != b


def test_seed_out_of_range():
    with pytest.raises(ValueError, match="2\\*\\*32"):
        seed_everything(-1)
    with pytest.raises(ValueError):
        seed_everything(2**32 - 1, rank=1)


def test_seed_deterministic_flags():
    prev_alg = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_det, prev_bench = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        seed_everything(7, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(prev_alg, warn_only=prev_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev_det, prev_bench


