"""The reference models' state-dict layout, for exact name/shape comparisons in tests."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"

Row = tuple[str, tuple[int, ...], str]


@cache
def _all_rows(stage: int) -> tuple[Row, ...]:
    lines = (REFERENCE_DIR / f"reference-stage{stage}-state-dict.tsv").read_text().splitlines()
    rows = []
    for line in lines[1:]:
        name, shape, _numel, dtype = line.split("\t")
        rows.append((name, tuple(json.loads(shape)), dtype))
    return tuple(rows)


def reference_rows(stage: int, prefix: str = "") -> list[Row]:
    """``(name relative to prefix, shape, dtype)`` of the reference stage's state dict under ``prefix``."""
    return [(name[len(prefix):], shape, dtype) for name, shape, dtype in _all_rows(stage) if name.startswith(prefix)]


def state_rows(module: torch.nn.Module) -> list[Row]:
    """``(name, shape, dtype)`` of ``module.state_dict()`` in order, dtype spelled like the TSV (float32, int64)."""
    return [(name, tuple(t.shape), str(t.dtype).replace("torch.", "")) for name, t in module.state_dict().items()]


def reference_param_count(stage: int, prefix: str = "") -> int:
    """Number of trainable parameters under ``prefix`` (BN running stats and counters excluded)."""
    total = 0
    for name, shape, dtype in reference_rows(stage, prefix):
        if dtype != "float32" or name.endswith(("running_mean", "running_var")):
            continue
        n = 1
        for s in shape:
            n *= s
        total += n
    return total
