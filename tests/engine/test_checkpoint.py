"""Checkpoint saving/loading, weight initialisation reports and random-generator state, on real files."""

from __future__ import annotations

import argparse
import os
import pickle
import random
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bevnext.engine.checkpoint import (
    CheckpointError,
    LoadReport,
    extract_state_dict,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from bevnext.errors import BevnextError


class _Custom:
    """A class weights_only must refuse to rebuild (module level, so that pickling it works)."""

    def __init__(self) -> None:
        self.value = 3


def _assert_one_line(exc: BaseException, path: Path) -> str:
    message = str(exc)
    assert "\n" not in message
    assert str(path) in message
    return message


def _temp_files(folder: Path) -> list[str]:
    # atomic_open's temp files are hidden ".<name>.*.tmp" files next to the destination.
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def test_error_is_a_bevnext_error() -> None:
    assert issubclass(CheckpointError, BevnextError)


def test_round_trip_keeps_nested_payload(tmp_path: Path) -> None:
    payload = {
        "model": OrderedDict(w=torch.randn(3, 4), b=torch.arange(5)),
        "optimizer": {"state": {0: {"step": torch.tensor(7.0)}}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 4,
        "meta": {"name": "stage1", "shape": (2, 3), "flag": True, "nothing": None, "history": [1.5, 2.5]},
    }
    path = tmp_path / "sub" / "epoch_4.pth"  # the missing folder is created
    save_checkpoint(path, payload)
    loaded = load_checkpoint(str(path))
    assert loaded.keys() == payload.keys()
    assert torch.equal(loaded["model"]["w"], payload["model"]["w"])
    assert torch.equal(loaded["model"]["b"], payload["model"]["b"])
    assert loaded["optimizer"]["state"][0]["step"].item() == 7.0
    assert loaded["optimizer"]["param_groups"] == payload["optimizer"]["param_groups"]
    assert loaded["epoch"] == 4
    assert loaded["meta"] == payload["meta"]
    assert _temp_files(path.parent) == []


def test_failed_save_leaves_old_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(4)})
    before = path.read_bytes()
    # A payload torch cannot serialise fails halfway through writing: a programming error, so not a
    # CheckpointError, but the previous file must survive it all the same.
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(4), "bad": lambda: None})
    assert path.read_bytes() == before
    assert _temp_files(tmp_path) == []


def test_save_into_a_file_instead_of_a_folder_is_an_error(tmp_path: Path) -> None:
    parent = tmp_path / "not_a_folder"
    parent.write_text("a regular file")
    path = parent / "last.pth"
    with pytest.raises(CheckpointError, match="could not save checkpoint") as excinfo:
        save_checkpoint(path, {"epoch": 1})
    _assert_one_line(excinfo.value, path)
    assert parent.read_text() == "a regular file"


def test_save_into_read_only_folder_keeps_old_file(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "last.pth"
    save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()
    os.chmod(folder, 0o500)
    try:
        probe = folder / "probe"
        try:
            probe.write_bytes(b"")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("running as root: a read-only folder is still writable")
        with pytest.raises(CheckpointError, match="could not save checkpoint") as excinfo:
            save_checkpoint(path, {"epoch": 2})
        assert "Permission denied" in _assert_one_line(excinfo.value, path)
        assert path.read_bytes() == before
        assert _temp_files(folder) == []
    finally:
        os.chmod(folder, 0o700)


def test_save_on_a_full_disk_keeps_old_file(tmp_path: Path) -> None:
    # A file-size limit makes write() fail with EFBIG exactly like a full disk fails with ENOSPC, and it
    # works for root too. torch's zip writer reports it as a RuntimeError; the user must see the OS reason.
    resource = pytest.importorskip("resource")
    import signal

    if not hasattr(signal, "SIGXFSZ"):
        pytest.skip("no SIGXFSZ on this platform")
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()
    limit = 1 << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip("file size limit already below the test's")
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(CheckpointError, match="could not save checkpoint") as excinfo:
            save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1 << 19)})  # 2 MiB of float32
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "File too large" in _assert_one_line(excinfo.value, path)
    assert path.read_bytes() == before
    assert _temp_files(tmp_path) == []


def _missing(folder: Path) -> Path:
    return folder / "nope.pth"


def _truncated(folder: Path) -> Path:
    whole = folder / "whole.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}, "epoch": 3}, whole)
    data = whole.read_bytes()
    path = folder / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    return path


def _random_bytes(folder: Path) -> Path:
    path = folder / "random.pth"
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


def _empty(folder: Path) -> Path:
    path = folder / "empty.pth"
    path.write_bytes(b"")
    return path


def _namespace(folder: Path) -> Path:
    path = folder / "namespace.pth"
    torch.save({"args": argparse.Namespace(lr=0.1), "model": {"w": torch.ones(1)}}, path)
    return path


def _instance(folder: Path) -> Path:
    path = folder / "instance.pth"
    torch.save(_Custom(), path)
    return path


def _plain_pickle_of_instance(folder: Path) -> Path:
    path = folder / "pickled.pth"
    path.write_bytes(pickle.dumps(_Custom(), protocol=2))
    return path


def _tensor(folder: Path) -> Path:
    path = folder / "tensor.pth"
    torch.save(torch.zeros(3), path)
    return path


def _directory(folder: Path) -> Path:
    path = folder / "adir.pth"
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_missing, "no such checkpoint file"),
        (_truncated, "not a readable checkpoint"),
        (_random_bytes, "not a readable checkpoint"),
        (_empty, "not a readable checkpoint"),
        (_namespace, "would need to run code (argparse.Namespace), which is refused"),
        (_instance, "_Custom), which is refused"),
        (_plain_pickle_of_instance, "_Custom), which is refused"),
        (_tensor, "checkpoint holds a Tensor, expected a dict"),
        (_directory, "is a directory"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path: Path, make: Callable[[Path], Path], expected: str) -> None:
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    message = _assert_one_line(excinfo.value, path)
    assert expected in message
    assert "\x1b" not in message  # torch's bold markup stays out
    # Raised "from None": no chained torch traceback reaches the user.
    error = excinfo.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def _state() -> dict[str, torch.Tensor]:
    return OrderedDict([("backbone.weight", torch.randn(2, 3)), ("head.bias", torch.randn(2))])


@pytest.mark.parametrize(
    "layout",
    [
        lambda sd: {"model": sd, "optimizer": {"state": {}}, "epoch": 2},  # our training file
        lambda sd: {"state_dict": sd, "epoch": 12, "updates": 600},  # our EMA file
        lambda sd: {"meta": {"epoch": 2, "CLASSES": ("car",)}, "state_dict": sd, "optimizer": {"state": {}}},  # mmcv
        lambda sd: sd,  # bare state dict
        lambda sd: {"model": OrderedDict((f"module.{k}", v) for k, v in sd.items())},  # DDP
        lambda sd: OrderedDict((f"_orig_mod.{k}", v) for k, v in sd.items()),  # torch.compile
        lambda sd: {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},  # both
    ],
)
def test_extract_state_dict_layouts(tmp_path: Path, layout: Callable[[dict], dict]) -> None:
    state = _state()
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, layout(state))
    extracted = extract_state_dict(load_checkpoint(path), path)
    assert list(extracted) == list(state)
    for name, value in state.items():
        assert torch.equal(extracted[name], value)


def test_extract_state_dict_only_strips_leading_prefixes() -> None:
    extracted = extract_state_dict({"module.neck.module.conv": torch.ones(1)}, "x.pth")
    assert list(extracted) == ["neck.module.conv"]


@pytest.mark.parametrize(
    ("ckpt", "keys"),
    [
        ({"epoch": 3, "optimizer": {"state": {}}}, "found keys: epoch, optimizer"),
        ({"model": {"w": [1.0, 2.0]}, "epoch": 1}, "found keys: model, epoch"),
        ({}, "found keys: none"),
    ],
)
def test_extract_state_dict_rejects_other_dicts(ckpt: dict, keys: str) -> None:
    with pytest.raises(CheckpointError) as excinfo:
        extract_state_dict(ckpt, Path("odd.pth"))
    message = _assert_one_line(excinfo.value, Path("odd.pth"))
    assert "not a model checkpoint (expected a 'state_dict' or 'model' entry of tensors" in message
    assert keys in message


def _net(mid_width: int, last: str, last_features: int) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            [
                ("conv", nn.Conv2d(3, 8, 3)),
                ("bn", nn.BatchNorm2d(8)),
                ("mid", nn.Conv2d(8, mid_width, 1)),
                ("head", nn.Linear(4, 2)),
                (last, nn.Linear(last_features, last_features)),
            ]
        )
    )


def test_load_weights_reports_and_copies(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _net(4, "extra", 2)
    with torch.no_grad():  # non-default buffers, so that copying them is visible
        source.bn.running_mean.uniform_()
        source.bn.running_var.uniform_(1.0, 2.0)
        source.bn.num_batches_tracked.fill_(17)
    path = tmp_path / "epoch_2_ema.pth"
    save_checkpoint(path, {"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 2})

    model = _net(6, "new", 3)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    report = load_weights(model, path)

    bn = ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert report.loaded == ["conv.weight", "conv.bias", *bn, "head.weight", "head.bias"]
    assert report.mismatched == [("mid.weight", (4, 8, 1, 1), (6, 8, 1, 1)), ("mid.bias", (4,), (6,))]
    assert report.missing == ["new.weight", "new.bias"]
    assert report.unexpected == ["extra.weight", "extra.bias"]
    assert report.summary() == "loaded 9 tensors, 2 shape-mismatched, 2 missing, 2 unexpected"

    saved = source.state_dict()
    after = model.state_dict()
    for name in report.loaded:
        assert torch.equal(after[name], saved[name]), name
    for name in ["mid.weight", "mid.bias", *report.missing]:
        assert torch.equal(after[name], initial[name]), name

    table = report.table()
    assert table.splitlines()[0] == report.summary()
    for name, ckpt_shape, model_shape in report.mismatched:
        line = next(row for row in table.splitlines() if name in row)
        assert str(list(ckpt_shape)) in line and str(list(model_shape)) in line
    for name in report.missing + report.unexpected:
        assert name in table
    assert "conv.weight" not in table  # loaded names only on request
    assert "conv.weight" in report.table(show_loaded=True)


def test_load_weights_casts_to_model_dtype(tmp_path: Path) -> None:
    source = nn.Linear(3, 2).double()
    path = tmp_path / "double.pth"
    save_checkpoint(path, source.state_dict())
    model = nn.Linear(3, 2)
    report = load_weights(model, path)
    assert report.loaded == ["weight", "bias"]
    assert model.weight.dtype == torch.float32
    assert torch.allclose(model.weight, source.weight.float())


def test_load_weights_unwraps_ddp(tmp_path: Path) -> None:
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    source = nn.Linear(3, 2)
    path = tmp_path / "plain.pth"
    save_checkpoint(path, {"state_dict": source.state_dict()})
    dist.init_process_group("gloo", init_method=(tmp_path / "pg").as_uri(), rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
        report = load_weights(wrapped, path)
        assert report.loaded == ["weight", "bias"] and not report.missing and not report.unexpected
        assert torch.equal(wrapped.module.weight.detach(), source.weight.detach())
    finally:
        dist.destroy_process_group()


def test_load_weights_of_another_model_raises(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pth"
    save_checkpoint(path, {"state_dict": {"encoder.layer1.weight": torch.ones(2, 2)}})
    model = _net(4, "extra", 2)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="no tensor name matches this model") as excinfo:
        load_weights(model, path)
    _assert_one_line(excinfo.value, path)
    assert all(torch.equal(model.state_dict()[name], value) for name, value in initial.items())


def test_table_truncates_long_lists() -> None:
    report = LoadReport(
        loaded=["a"],
        mismatched=[("m", (1,), (2, 3))],
        missing=[f"missing.{i}" for i in range(25)],
        unexpected=[],
    )
    table = report.table(max_rows=5)
    assert "missing.4" in table and "missing.5" not in table
    assert "... and 20 more" in table
    assert "unexpected" not in table.splitlines()[-1]  # empty categories get no section
    assert "checkpoint [1]" in table and "model [2, 3]" in table
    assert report.summary() == "loaded 1 tensors, 1 shape-mismatched, 25 missing, 0 unexpected"


def _draws() -> tuple[list[float], list[float], torch.Tensor]:
    return (
        [random.random() for _ in range(5)] + [random.gauss(0.0, 1.0)],
        list(np.random.rand(5)) + [np.random.randn()],  # noqa: NPY002 - the legacy generator is what is saved
        torch.rand(5),
    )


def test_rng_state_round_trip_through_a_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)  # noqa: NPY002
    torch.manual_seed(3)
    random.gauss(0.0, 1.0)  # leaves a cached gaussian in Python's state
    np.random.randn()  # noqa: NPY002 - and in NumPy's
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"rng": rng_state()})
    expected = _draws()

    _draws()  # move every generator on
    set_rng_state(load_checkpoint(path)["rng"])  # load_checkpoint uses weights_only=True
    python, numpy_draws, torch_draws = _draws()
    assert python == expected[0]
    assert numpy_draws == expected[1]
    assert torch.equal(torch_draws, expected[2])


def test_rng_state_skips_devices_it_does_not_have() -> None:
    state = rng_state()
    assert set(state) >= {"python", "numpy", "torch"}
    if not torch.cuda.is_available():
        assert "cuda" not in state
        # A state saved on a GPU machine restores the CPU generators here without complaint.
        state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
        set_rng_state(state)
