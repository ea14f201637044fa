"""Log plumbing: smoothed meters, ETA strings, the JSON-lines writer, logging setup, environment report."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest

from bevnext.engine.environment import collect_environment, format_environment
from bevnext.engine.metrics import MetricWriter, SmoothedValue, format_eta, setup_logging


def test_smoothed_value():
    meter = SmoothedValue(window=3)
    assert math.isnan(meter.median) and math.isnan(meter.global_avg) and meter.count == 0
    for value in [1.0, 10.0, 2.0, 4.0]:
        meter.update(value)
    # window holds 10, 2, 4
    assert meter.median == 4.0
    assert meter.avg == pytest.approx(16 / 3)
    assert meter.global_avg == pytest.approx(17 / 4)
    assert meter.latest == 4.0
    assert meter.count == 4
    meter.update(6.0, n=4)  # a batch mean over 4 samples weighs 4 in the global average
    assert meter.count == 8
    assert meter.global_avg == pytest.approx((17 + 24) / 8)


def test_format_eta():
    assert format_eta(307) == "0:05:07"
    assert format_eta(86400 + 2 * 3600 + 3 * 60 + 4) == "1 day, 2:03:04"
    assert format_eta(2 * 86400 + 1.4) == "2 days, 0:00:01"
    assert format_eta(-3) == "0:00:00"
    assert format_eta(float("nan")) == "unknown"


def test_metric_writer(tmp_path):
    work = tmp_path / "run"
    with MetricWriter(work, tensorboard=False) as writer:
        writer.write(50, {"loss": 1.5, "lr": 2e-4, "mode": "train", "bad": float("nan"), "big": float("-inf")})
        writer.write(100, {"loss": 1.25, "samples": 64})
        assert writer.path == work / "metrics.jsonl"
    writer.write(150, {"loss": 9.0})  # after close: ignored
    lines = (work / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records == [
        {"iteration": 50, "loss": 1.5, "lr": 2e-4, "mode": "train", "bad": "nan", "big": "-inf"},
        {"iteration": 100, "loss": 1.25, "samples": 64},
    ]
    # appending (resume) keeps the history
    with MetricWriter(work, tensorboard=False) as writer:
        writer.write(200, {"loss": 1.0})
    assert len((work / "metrics.jsonl").read_text().splitlines()) == 3


def test_metric_writer_tensorboard_optional(tmp_path):
    # Works whether or not the optional tensorboard package is installed.
    with MetricWriter(tmp_path, tensorboard=True) as writer:
        writer.write(1, {"loss": 0.5, "name": "x"})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"iteration": 1, "loss": 0.5, "name": "x"}


def test_metric_writer_disabled(tmp_path):
    writer = MetricWriter(tmp_path / "rank1", enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert writer.path is None
    assert not (tmp_path / "rank1").exists()


@pytest.fixture
def restore_bevnext_logger():
    """setup_logging reconfigures a process-wide logger; put it back for the tests that follow."""
    logger = logging.getLogger("bevnext")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in list(logger.handlers):
        if handler not in saved[0]:
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_setup_logging_idempotent(tmp_path, capsys, restore_bevnext_logger):
    setup_logging(tmp_path, rank=0)
    logger = setup_logging(tmp_path, rank=0)
    assert logger.name == "bevnext"
    logging.getLogger("bevnext.engine.test").info("hello once")
    logger.debug("not shown")
    text = (tmp_path / "log.txt").read_text()
    assert text.count("hello once") == 1 and "not shown" not in text
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d hello once$", text.splitlines()[0])
    assert capsys.readouterr().out.count("hello once") == 1


def test_setup_logging_other_rank(tmp_path, capsys, restore_bevnext_logger):
    logger = setup_logging(tmp_path, rank=3)
    logger.info("quiet")
    logger.warning("loud")
    captured = capsys.readouterr()
    assert "quiet" not in captured.err and captured.out == ""
    assert "[rank 3]" in captured.err and "loud" in captured.err
    assert not (tmp_path / "log.txt").exists()


def test_environment():
    env = collect_environment()
    for key in (
        "python",
        "torch",
        "torchvision",
        "numpy",
        "bevnext",
        "torch_npu",
        "mx_driving",
        "platform",
        "hostname",
        "cpu_count",
        "torch_threads",
    ):
        assert env[key] is not None, key
    assert isinstance(env["git_revision"], str) and re.fullmatch(r"[0-9a-f]{40}", env["git_revision"])
    assert isinstance(env["git_dirty"], bool)
    json.dumps(env)
    text = format_environment(env)
    assert len(text.splitlines()) == len(env) and "torch" in text
