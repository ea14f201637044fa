"""The launch scripts in ``test/``: arguments, early errors, and one real two-stage run on the CPU.

Everything runs the scripts as a user would (bash, torchrun, the ``bevnext`` command) in subprocesses. The
end-to-end part trains stage 1 and stage 2 of the tiny configs with 2 processes on a synthetic dataset,
then re-runs stage 1 to check that it continues from ``last.pth``.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "test"
STAGE1 = SCRIPTS / "train_8p_stage1.sh"
STAGE2 = SCRIPTS / "train_8p_stage2.sh"
ENV_NPU = SCRIPTS / "env_npu.sh"

SUMMARY_KEYS = ["Network", "DeviceType", "RankSize", "BatchSize", "CaseName", "E2ETrainingTime", "TrainingTime",
                "averageFPS"]

# Variables the scripts read; the caller's values must not change what a test runs.
_SCRIPT_VARIABLES = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "DEVICE", "CONFIG",
                     "PYTHON", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def _env(**extra: str) -> dict[str, str]:
    """The caller's environment with this interpreter's bin folder first on PATH (so the scripts' ``python``
    is the one running the tests), no script variables inherited, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARIABLES}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


def _bash(script: Path, *args: str, cwd: Path = ROOT, timeout: float = 60, **env: str):
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(out: subprocess.CompletedProcess) -> str:
    return f"exit {out.returncode}\n--- stdout ---\n{out.stdout[-4000:]}\n--- stderr ---\n{out.stderr[-2000:]}"


def _summary(path: Path) -> dict[str, str]:
    """``key = value`` lines of a summary file, in order."""
    pairs = [line.split(" = ", 1) for line in path.read_text().splitlines() if line.strip()]
    return dict(pairs)


# ------------------------------------------------------------------------------------------------------------
# Fast checks: no training is launched.


@pytest.mark.parametrize("script", [STAGE1, STAGE2, ENV_NPU], ids=lambda p: p.name)
def test_script_parses(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    out = subprocess.run([shellcheck, "-x", "test/env_npu.sh", "test/train_8p_stage1.sh", "test/train_8p_stage2.sh"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_env_npu_sets_variables_under_strict_mode(tmp_path):
    # A stand-in msnpureport that records its arguments and rejects device 5, as on a machine with fewer
    # devices: sourcing must still succeed and try every device.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "msnpureport"
    fake.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n[ "$4" != 5 ]\n')
    fake.chmod(0o755)
    show = ('set -euo pipefail; source test/env_npu.sh; '
            'echo "$PYTORCH_NPU_ALLOC_CONF $TASK_QUEUE_ENABLE $CPU_AFFINITY_CONF"')
    env = {k: v for k, v in _env().items() if k not in ("PYTORCH_NPU_ALLOC_CONF", "TASK_QUEUE_ENABLE",
                                                          "CPU_AFFINITY_CONF")}
    for path in (f"{bin_dir}{os.pathsep}{env['PATH']}", env["PATH"]):
        out = subprocess.run(["bash", "-c", show], cwd=ROOT, env={**env, "PATH": path}, capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, _tail(out)
        assert out.stdout == "expandable_segments:True 2 1\n"
        assert out.stderr == ""
    assert calls.read_text().splitlines() == [f"-g error -d {n}" for n in range(8)]


@pytest.mark.parametrize("from_test_dir", [False, True], ids=["from-root", "from-test-dir"])
def test_stage2_without_stage1_checkpoint_stops_before_launching(tmp_path, from_test_dir):
    work_dir, ckpt = tmp_path / "stage2", tmp_path / "missing" / "epoch_2_ema.pth"
    out = _bash(STAGE2, f"--work_dir={work_dir}", f"--stage1_ckpts_path={ckpt}",
                cwd=SCRIPTS if from_test_dir else ROOT)
    assert out.returncode == 2, _tail(out)
    assert out.stderr.splitlines() == [
        f"error: stage-1 checkpoint not found: {ckpt} (train stage 1 first, or pass --stage1_ckpts_path=...)"
    ]
    assert out.stdout == ""
    assert not work_dir.exists()


@pytest.mark.parametrize("script", [STAGE1, STAGE2], ids=lambda p: p.name)
@pytest.mark.parametrize("arg", ["--bogus=1", "--work-dir=x", "stray"])
def test_unknown_argument_is_one_error_line(tmp_path, script, arg):
    out = _bash(script, f"--work_dir={tmp_path / 'w'}", arg)
    assert out.returncode == 2, _tail(out)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and arg in lines[0], out.stderr
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------------------------
# One real run: stage 1, stage 2 from its EMA weights, then stage 1 again (resumed).


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    """2 scenes x 4 samples at 400x225 through the commands: one scene is ``synth_train`` (4 samples)."""
    root = tmp_path_factory.mktemp("scripts") / "data"
    for args in (["synth", "--out", str(root), "--scenes", "2", "--samples-per-scene", "4", "--image-size", "400",
                  "225", "--seed", "0", "--no-progress"],
                 ["create-data", "--data-root", str(root), "--version", "v1.0-synth", "--no-progress"]):
        out = subprocess.run([sys.executable, "-m", "bevnext", *args], env=_env(), capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, _tail(out)
    return root


def _tiny_overrides(data_root: Path) -> list[str]:
    # 4 training samples over 2 processes with batch 1 (and no class-balanced resampling, which would change
    # the epoch's length) make a 2-step epoch: epoch_1*.pth in seconds. One step is left out of the
    # steady-state figure so that it is a number, not "n/a".
    return [f"data.data_root={data_root}", "data.src_size=[400,225]", "data.cbgs=False", "train.batch_size=1",
            "train.warmup_exclude_iters=1", "train.num_workers=0"]


def _train(script: Path, config: str, *args: str) -> subprocess.CompletedProcess:
    return _bash(script, *args, timeout=900, NPROC_PER_NODE="2", DEVICE="cpu", CONFIG=config,
                 MASTER_PORT=str(_free_port()))


@pytest.fixture(scope="module")
def stage1_run(synth_data, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("scripts") / "stage1"
    out = _train(STAGE1, "tiny_stage1", f"--work_dir={work_dir}", "--epochs=1", *_tiny_overrides(synth_data))
    return work_dir, out


def _check_summary(out, work_dir: Path, stage: str, name: str) -> None:
    summary = _summary(work_dir / f"BEVNeXt_{name}.log")
    assert list(summary) == SUMMARY_KEYS
    assert summary["Network"] == f"BEVNeXt_{stage}"
    assert summary["DeviceType"] == platform.machine()
    assert (summary["RankSize"], summary["BatchSize"]) == ("2", "1")
    assert summary["CaseName"] == f"BEVNeXt_{name}"
    Stage = stage.capitalize()
    fps = re.search(rf"^{Stage} Final Performance images/sec : (\d+\.\d{{3}})$", out.stdout, re.M)
    assert fps, _tail(out)
    assert float(fps.group(1)) > 0 and summary["averageFPS"] == fps.group(1)
    e2e = re.search(rf"^{Stage} E2E Training Duration sec : (\d+)$", out.stdout, re.M)
    assert e2e and summary["E2ETrainingTime"] == e2e.group(1)
    assert re.search(rf"^{Stage} Steady-state samples/sec : \d+\.\d{{3}} ", out.stdout, re.M)
    assert float(summary["TrainingTime"]) > 0


@pytest.mark.slow
def test_stage1_script_trains_and_reports(stage1_run):
    work_dir, out = stage1_run
    assert out.returncode == 0, _tail(out)
    assert "Resuming" not in out.stdout
    for name in ("epoch_1.pth", "epoch_1_ema.pth", "last.pth", "config.json", "log.txt"):
        assert (work_dir / name).is_file(), name
    # 2 processes x batch 1 x 1 epoch; the reference's 8 x 8 x 2 gives train_stage1_8p_bs8_epochs2.log.
    log = work_dir / "train_stage1_2p_bs1_epochs1.log"
    assert "Final Performance images/sec :" in log.read_text()
    _check_summary(out, work_dir, "stage1", "stage1_2p_bs1_epochs1")


@pytest.fixture(scope="module")
def stage2_run(stage1_run, synth_data, tmp_path_factory):
    stage1_dir, stage1_out = stage1_run
    assert stage1_out.returncode == 0, _tail(stage1_out)
    work_dir = tmp_path_factory.mktemp("scripts") / "stage2"
    ckpt = stage1_dir / "epoch_1_ema.pth"
    out = _train(STAGE2, "tiny_stage2", f"--stage1_ckpts_path={ckpt}", f"--work_dir={work_dir}", "--epochs=1",
                 *_tiny_overrides(synth_data))
    return work_dir, ckpt, out


@pytest.mark.slow
def test_stage2_script_starts_from_stage1(stage2_run):
    work_dir, ckpt, out = stage2_run
    assert out.returncode == 0, _tail(out)
    assert "Resuming" not in out.stdout
    assert (work_dir / "epoch_1_ema.pth").is_file()
    assert (work_dir / "train_stage2_2p_bs1_epochs1.log").is_file()
    assert f"initialised weights from {ckpt}" in (work_dir / "log.txt").read_text()
    _check_summary(out, work_dir, "stage2", "stage2_2p_bs1_epochs1")


@pytest.mark.slow
def test_stage2_script_rerun_resumes_without_stage1_checkpoint(stage2_run, synth_data, tmp_path):
    # last.pth holds everything a continued run needs: the stage-1 checkpoint is neither required nor loaded.
    work_dir, _, first = stage2_run
    assert first.returncode == 0, _tail(first)
    summary = (work_dir / "BEVNeXt_stage2_2p_bs1_epochs1.log").read_text()
    out = _train(STAGE2, "tiny_stage2", f"--stage1_ckpts_path={tmp_path / 'missing.pth'}", f"--work_dir={work_dir}",
                 "--epochs=1", *_tiny_overrides(synth_data))
    resuming = f"Resuming Stage2 training from {work_dir}/last.pth"
    assert any(line.startswith(resuming) for line in out.stdout.splitlines())
    assert out.returncode == 0, _tail(out)
    # The run was complete: nothing trained, and the summary of the run that trained is kept.
    assert "Stage2: no training step was left to run" in out.stdout
    assert (work_dir / "BEVNeXt_stage2_2p_bs1_epochs1.log").read_text() == summary


@pytest.mark.slow
def test_stage1_script_rerun_resumes_from_last(stage1_run, synth_data):
    # Runs after the stage-2 tests (file order), which start from this work dir's epoch_1_ema.pth.
    work_dir, first = stage1_run
    assert first.returncode == 0, _tail(first)
    out = _train(STAGE1, "tiny_stage1", f"--work_dir={work_dir}", "--epochs=2", *_tiny_overrides(synth_data))
    resuming = f"Resuming Stage1 training from {work_dir}/last.pth"
    assert any(line.startswith(resuming) for line in out.stdout.splitlines())
    assert out.returncode == 0, _tail(out)
    # It continued (epoch 2 only) instead of starting over.
    assert (work_dir / "epoch_2_ema.pth").is_file()
    assert "resumed from" in (work_dir / "log.txt").read_text()
    assert (work_dir / "train_stage1_2p_bs1_epochs2.log").is_file()
