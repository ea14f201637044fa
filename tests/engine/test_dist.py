"""Distributed setup: environment validation, single-process fallbacks and a real 2-process gloo group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import free_port

from bevnext.engine import dist as bdist
from bevnext.engine.dist import DistInfo, DistributedError, init_distributed

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    """No torchrun variables, and never a process group left behind by a test."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    bdist.cleanup_distributed()


# ------------------------------------------------------------------------------------------ single process
def test_not_distributed(clean_env):
    info = init_distributed("cpu")
    assert info == DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    assert not info.is_distributed
    assert info.is_main
    assert not dist.is_initialized()


def test_world_size_one_creates_no_group(clean_env):
    for name, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        clean_env.setenv(name, value)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size) == (0, 1)
    assert not dist.is_initialized()


def test_stray_rank_without_world_size_is_ignored(clean_env):
    clean_env.setenv("RANK", "3")
    clean_env.setenv("LOCAL_RANK", "3")
    info = init_distributed("cpu")
    assert (info.rank, info.local_rank, info.world_size) == (0, 0, 1)


def test_helpers_without_group(clean_env):
    t = torch.tensor([1.0, 2.0])
    assert bdist.all_reduce_mean(t) is t
    assert bdist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert bdist.get_rank() == 0
    assert bdist.get_world_size() == 1
    assert bdist.is_main_process()
    bdist.barrier()
    bdist.cleanup_distributed()


# ---------------------------------------------------------------------------------------------- bad env
@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "LOCAL_RANK"),
        ({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_PORT": "1"}, "MASTER_ADDR"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT"),
        (
            {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "99999"},
            "MASTER_PORT",
        ),
    ],
)
def test_bad_env_names_the_variable(clean_env, env, variable):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(DistributedError) as err:
        init_distributed("cpu", timeout_s=1)
    msg = str(err.value)
    assert variable in msg
    assert "\n" not in msg
    assert not dist.is_initialized()


def test_too_few_devices(clean_env):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    count = torch.cuda.device_count()
    env = {"WORLD_SIZE": str(count + 1), "RANK": str(count), "LOCAL_RANK": str(count)}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(DistributedError, match="LOCAL_RANK"):
        init_distributed("cuda", timeout_s=1)


# ------------------------------------------------------------------------------------ real 2-process group
def test_two_process_gloo_group(tmp_path):
    world_size = 2
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
    )
    if sys.platform.startswith("linux"):
        # Gloo otherwise picks the interface its hostname resolves to, which in containers may not exist.
        base.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = []
    try:
        for rank in range(world_size):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(tmp_path)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = []
        for rank, p in enumerate(procs):
            try:
                outputs.append(p.communicate(timeout=60)[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                logs = "\n".join(f"--- rank {r}:\n{q.communicate()[0]}" for r, q in enumerate(procs))
                pytest.fail(f"rank {rank} did not finish within 60 s\n{logs}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out}"

    expected_gather = [{"rank": r, "name": f"r{r}"} for r in range(world_size)]
    for rank in range(world_size):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["rank"] == res["get_rank"] == rank
        assert res["local_rank"] == rank
        assert res["world_size"] == res["get_world_size"] == world_size
        assert res["backend"] == "gloo"
        assert res["device"] == "cpu"
        assert res["is_distributed"] is True
        assert res["is_main"] is res["is_main_process"] is (rank == 0)
        assert res["same_info"] is True
        assert res["mean"] == [0.5, 5.0, 1.0]
        assert res["int_mean"] == 1.5
        assert res["gathered"] == expected_gather
        after = json.loads((tmp_path / f"rank{rank}.after.json").read_text())
        assert after == {"get_world_size": 1, "gather": [rank]}
