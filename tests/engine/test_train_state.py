"""Full checkpoints: layout, epoch files with last.pth beside them, pruning, and finding what to resume from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bevnext.engine.checkpoint import load_checkpoint
from bevnext.engine.train_state import (
    Position,
    ResumeError,
    check_resumable,
    find_resumable,
    full_checkpoint,
    save_epoch_files,
)

MODEL_CFG = {"context_channels": 16}


def _payload(step: int, model_cfg: dict | None = None) -> dict:
    return full_checkpoint(
        model_state={"w": torch.full((3,), float(step))}, optimizer_state={"state": {}, "param_groups": []},
        ema_state={"state_dict": {"w": torch.zeros(3)}, "updates": 10560 + step}, scaler_state={},
        base_lrs=[2e-4], position=Position(step // 4, step % 4, step), rngs=[{}],
        config={"model": model_cfg or MODEL_CFG, "train": {}}, environment={"torch": "x"}, bad_steps=0,
    )


def test_epoch_files_have_the_reference_layout_and_last_follows(tmp_path):
    written = save_epoch_files(tmp_path, _payload(8), _payload(8)["train_state"]["ema"], epoch=2, keep=0)
    assert [p.name for p in written] == ["epoch_2.pth", "epoch_2_ema.pth", "last.pth"]
    epoch = load_checkpoint(tmp_path / "epoch_2.pth")
    assert {"meta", "state_dict", "optimizer"} <= set(epoch) and epoch["meta"]["epoch"] == 2
    ema = load_checkpoint(tmp_path / "epoch_2_ema.pth")
    assert set(ema) == {"state_dict", "epoch", "updates"} and (ema["epoch"], ema["updates"]) == (2, 10568)
    last = load_checkpoint(tmp_path / "last.pth")
    assert torch.equal(last["state_dict"]["w"], epoch["state_dict"]["w"])
    # The same bytes in an independent file: damage to one leaves the other to resume from.
    assert (tmp_path / "last.pth").read_bytes() == (tmp_path / "epoch_2.pth").read_bytes()
    assert not os.path.samefile(tmp_path / "last.pth", tmp_path / "epoch_2.pth")


def test_keep_checkpoints_prunes_old_epochs_only(tmp_path):
    for epoch in (1, 2, 3):
        save_epoch_files(tmp_path, _payload(4 * epoch), _payload(4 * epoch)["train_state"]["ema"], epoch, keep=2)
    names = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert names == ["epoch_2.pth", "epoch_2_ema.pth", "epoch_3.pth", "epoch_3_ema.pth", "last.pth"]
    assert load_checkpoint(tmp_path / "last.pth")["train_state"]["global_step"] == 12


def test_find_resumable_prefers_last_then_falls_back_to_newest_epoch(tmp_path):
    for epoch in (1, 2):
        save_epoch_files(tmp_path, _payload(4 * epoch), None, epoch, keep=0)
    # A mid-epoch last.pth replaces the copy without touching epoch_2.pth.
    torch.save(_payload(10), tmp_path / "last.pth")
    path, ckpt, why = find_resumable(tmp_path, MODEL_CFG)
    assert path.name == "last.pth" and ckpt["train_state"]["global_step"] == 10 and why == "the latest state"

    data = (tmp_path / "last.pth").read_bytes()
    (tmp_path / "last.pth").write_bytes(data[: len(data) // 2])  # truncated, as by a crash of a non-atomic copy
    path, ckpt, why = find_resumable(tmp_path, MODEL_CFG)
    assert path.name == "epoch_2.pth" and ckpt["train_state"]["global_step"] == 8
    assert "passed over" in why and "last.pth" in why

    (tmp_path / "epoch_2.pth").write_bytes(b"")
    path, _, why = find_resumable(tmp_path, MODEL_CFG)
    assert path.name == "epoch_1.pth" and "epoch_2.pth" in why


def test_nothing_to_resume_is_one_clear_line(tmp_path):
    with pytest.raises(ResumeError, match="no checkpoint to resume from") as err:
        find_resumable(tmp_path, MODEL_CFG)
    assert "\n" not in str(err.value)
    (tmp_path / "last.pth").write_bytes(b"garbage")
    with pytest.raises(ResumeError, match="last.pth"):
        find_resumable(tmp_path, MODEL_CFG)


@pytest.mark.parametrize(
    ("ckpt", "message"),
    [
        ({"state_dict": {}, "epoch": 1, "updates": 3}, "not a bevnext training checkpoint"),  # an EMA file
        ({"meta": {}, "state_dict": {}, "optimizer": {}}, "use --load-from"),  # a reference checkpoint
        (_payload(3, {"context_channels": 160}), "another model configuration"),
    ],
)
def test_check_resumable_rejects_what_does_not_fit(ckpt, message):
    with pytest.raises(ResumeError, match=message):
        check_resumable(ckpt, Path("x.pth"), MODEL_CFG)
