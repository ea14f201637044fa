"""The launch scripts in ``test/``: arguments, early errors, and real runs on the CPU.

Everything runs the scripts as a user would (bash, torchrun, the ``bevnext`` command) in subprocesses. The
end-to-end part trains stage 1 and stage 2 of the tiny configs with 2 processes on a synthetic dataset,
then re-runs stage 1 to check that it continues from ``last.pth``. The evaluation script's arguments, files
and summary are checked against a stand-in ``python`` that records the torchrun command line and prints
devkit-style lines, and once against the real ``bevnext eval``.
"""

from __future__ import annotations

import json
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
EVAL = SCRIPTS / "eval_bevnext.sh"
ENV_NPU = SCRIPTS / "env_npu.sh"
LAUNCH_COMMON = SCRIPTS / "launch_common.sh"
TRAIN_COMMON = SCRIPTS / "train_common.sh"

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


@pytest.mark.parametrize("script", [STAGE1, STAGE2, EVAL, ENV_NPU, LAUNCH_COMMON, TRAIN_COMMON], ids=lambda p: p.name)
def test_script_parses(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    out = subprocess.run([shellcheck, "-x", "test/env_npu.sh", "test/train_8p_stage1.sh", "test/train_8p_stage2.sh",
                          "test/eval_bevnext.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
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


@pytest.mark.parametrize("script", [STAGE1, STAGE2, EVAL], ids=lambda p: p.name)
@pytest.mark.parametrize("arg", ["--bogus=1", "--work-dir=x", "stray"])
def test_unknown_argument_is_one_error_line(tmp_path, script, arg):
    out = _bash(script, f"--work_dir={tmp_path / 'w'}", arg)
    assert out.returncode == 2, _tail(out)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and arg in lines[0], out.stderr
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------------------------
# The evaluation script against a stand-in ``python``: arguments, files and the summary, without a model.

# What the stand-in prints for the evaluation: two devkit summaries (the script must take the last values),
# a rank-prefixed pair as torchrun may print them, and lines that look alike but are not the figures.
FAKE_EVAL_OUTPUT = """\
mAP: 0.1000
mATE: 0.7000
NDS: 0.2000
[default0]:mAP: 0.1234
[default0]:mATE: 0.6543
[default0]:NDS: 0.2345
mAP (classes with ground truth): 0.9990
2026-01-01 00:00:00 work_dirs/x/epoch_12_ema.pth: mAP 0.9000, NDS 0.9000
car\t0.500\t0.400
"""
EVAL_SUMMARY = {"Network": "BEVNeXt", "DeviceType": platform.machine(), "NDS": "0.2345", "mAP": "0.1234"}


def _fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A ``python`` that records a ``-m torch.distributed.run`` command line (one argument per line) in the
    returned file and prints ``FAKE_OUTPUT`` (a file) and exits ``FAKE_STATUS`` instead of launching; any
    other call (the script's config check) goes to the real interpreter. Returns (bin dir, record)."""
    bin_dir, record = tmp_path / "fake_bin", tmp_path / "torchrun_args"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = torch.distributed.run ]; then
    shift 2
    printf '%s\\n' "$@" > "{record}"
    cat "$FAKE_OUTPUT"
    exit "${{FAKE_STATUS:-0}}"
fi
exec "{sys.executable}" "$@"
""")
    fake.chmod(0o755)
    return bin_dir, record


def _eval_work_dir(work_dir: Path, checkpoint: str = "epoch_12_ema.pth") -> Path:
    """A trained run's folder as far as the script looks: config.json (a real resolved run) and a checkpoint
    file (never read by the stand-in)."""
    from bevnext.config.run import load_run

    work_dir.mkdir(parents=True)
    (work_dir / "config.json").write_text(json.dumps(load_run("tiny_stage2").to_dict(), indent=2))
    (work_dir / checkpoint).write_bytes(b"weights")
    return work_dir


def _run_eval(tmp_path: Path, *args: str, cwd: Path = ROOT, output: str = FAKE_EVAL_OUTPUT, status: int = 0,
              **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """The evaluation script (``cwd/test/eval_bevnext.sh``) with the stand-in first on PATH."""
    bin_dir, record = _fake_python(tmp_path)
    out_file = tmp_path / "fake_output"
    out_file.write_text(output)
    script = cwd / "test" / EVAL.name if (cwd / "test").is_dir() else cwd / EVAL.name
    path = os.pathsep.join([str(bin_dir), _env()["PATH"]])
    out = _bash(script, *args, cwd=cwd, PATH=path, FAKE_OUTPUT=str(out_file), FAKE_STATUS=str(status), **env)
    return out, record


@pytest.mark.parametrize("from_test_dir", [False, True], ids=["from-root", "from-test-dir"])
def test_eval_script_defaults(tmp_path, from_test_dir):
    # A source tree of its own, so that the default work_dirs/bevnext-stage2 is relative to it.
    src = tmp_path / "src"
    (src / "test").mkdir(parents=True)
    for script in (EVAL, ENV_NPU, LAUNCH_COMMON):
        shutil.copy(script, src / "test" / script.name)
    work_dir = _eval_work_dir(src / "work_dirs" / "bevnext-stage2")
    out, record = _run_eval(tmp_path, cwd=src / "test" if from_test_dir else src)
    assert out.returncode == 0, _tail(out)
    assert out.stderr == ""
    rel = "work_dirs/bevnext-stage2"
    assert record.read_text().splitlines() == [
        "--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "8", "--master_addr", "127.0.0.1",
        "--master_port", "29500", "-m", "bevnext", "eval", f"{rel}/config.json", f"{rel}/epoch_12_ema.pth",
        "--work-dir", f"{rel}/eval_epoch12",
    ]
    lines = out.stdout.splitlines()
    assert lines[-3:-1] == ["[BEVNeXt] NDS : 0.2345", "[BEVNeXt] mAP : 0.1234"], _tail(out)
    assert (work_dir / "bevnext_epoch12_eval.log").read_text() == FAKE_EVAL_OUTPUT
    summary = work_dir / "BEVNeXt_8p_epochs12_eval.log"
    assert _summary(summary) == EVAL_SUMMARY and list(_summary(summary)) == list(EVAL_SUMMARY)


def test_eval_script_options_and_environment(tmp_path):
    work_dir = _eval_work_dir(tmp_path / "run")
    ckpt = tmp_path / "other" / "epoch_3.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    env = dict(NPROC_PER_NODE="2", NNODES="2", NODE_RANK="0", MASTER_ADDR="10.0.0.1", MASTER_PORT="12345",
               DEVICE="cpu")
    out, record = _run_eval(tmp_path, f"--work_dir={work_dir}", f"--ckpt={ckpt}", "--split=synth_val", "--show=2",
                            "eval.num_workers=0", "eval.show_score_threshold=0.5", **env)
    assert out.returncode == 0, _tail(out)
    assert record.read_text().splitlines() == [
        "--nnodes", "2", "--node_rank", "0", "--nproc_per_node", "2", "--master_addr", "10.0.0.1",
        "--master_port", "12345", "-m", "bevnext", "eval", f"{work_dir}/config.json", str(ckpt),
        "--work-dir", f"{work_dir}/eval_epoch3", "--device", "cpu", "--split", "synth_val", "--show", "2",
        "eval.num_workers=0", "eval.show_score_threshold=0.5",
    ]
    # The epoch in the log names comes from the checkpoint's name; 2 nodes x 2 processes = 4.
    assert (work_dir / "bevnext_epoch3_eval.log").is_file()
    assert _summary(work_dir / "BEVNeXt_4p_epochs3_eval.log") == EVAL_SUMMARY
    assert not (work_dir / "bevnext_epoch12_eval.log").exists()


def test_eval_script_epochs_and_config_override(tmp_path):
    # --epochs picks epoch_N_ema.pth; CONFIG replaces the work dir's config.json, which then need not exist.
    work_dir = _eval_work_dir(tmp_path / "run", checkpoint="epoch_5_ema.pth")
    (work_dir / "config.json").unlink()
    out, record = _run_eval(tmp_path, f"--work_dir={work_dir}", "--epochs=5", CONFIG="tiny_stage2")
    assert out.returncode == 0, _tail(out)
    args = record.read_text().splitlines()
    assert args[args.index("eval") + 1 : args.index("eval") + 3] == ["tiny_stage2", f"{work_dir}/epoch_5_ema.pth"]
    assert _summary(work_dir / "BEVNeXt_8p_epochs5_eval.log") == EVAL_SUMMARY


@pytest.mark.parametrize("missing", ["work_dir", "checkpoint", "config"])
def test_eval_script_missing_input_is_one_error_line_before_launching(tmp_path, missing):
    work_dir = _eval_work_dir(tmp_path / "run")
    expected = {
        "work_dir": f"error: work dir not found: {tmp_path}/gone (train stage 2 first, or pass --work_dir=...)",
        "checkpoint": f"error: checkpoint not found: {work_dir}/epoch_12_ema.pth (pass --epochs=N or --ckpt=CKPT "
                      "for another one)",
        "config": f"error: config not found: {work_dir}/config.json (written by bevnext train; or set CONFIG=...)",
    }[missing]
    if missing == "checkpoint":
        (work_dir / "epoch_12_ema.pth").unlink()
    elif missing == "config":
        (work_dir / "config.json").unlink()
    target = tmp_path / "gone" if missing == "work_dir" else work_dir
    out, record = _run_eval(tmp_path, f"--work_dir={target}")
    assert out.returncode == 2, _tail(out)
    assert out.stderr.splitlines() == [expected]
    assert out.stdout == ""
    assert not record.exists()
    assert sorted(p.name for p in work_dir.iterdir()) == sorted({"config.json", "epoch_12_ema.pth"} - {
        {"checkpoint": "epoch_12_ema.pth", "config": "config.json"}.get(missing, "")})


@pytest.mark.parametrize("args, env, message", [
    (["eval.bogus=1"], {}, "eval.bogus"),
    (["--epochs=0"], {}, "--epochs=0: expected a positive whole number"),
    (["--show=two"], {}, "--show=two: expected a number of samples"),
    ([], {"NPROC_PER_NODE": "eight"}, "NPROC_PER_NODE=eight: expected a whole number"),
    ([], {"DEVICE": "tpu"}, "DEVICE=tpu: expected npu, cuda or cpu"),
], ids=["bad-key", "epochs", "show", "nproc", "device"])
def test_eval_script_bad_value_is_one_error_line_before_launching(tmp_path, args, env, message):
    work_dir = _eval_work_dir(tmp_path / "run")
    out, record = _run_eval(tmp_path, f"--work_dir={work_dir}", *args, **env)
    assert out.returncode == 2, _tail(out)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert not record.exists()


def test_eval_script_failed_evaluation_exits_with_its_status_and_writes_no_summary(tmp_path):
    work_dir = _eval_work_dir(tmp_path / "run")
    out, record = _run_eval(tmp_path, f"--work_dir={work_dir}", output="Traceback: something broke\n", status=3)
    assert out.returncode == 3, _tail(out)
    assert record.is_file()
    log = work_dir / "bevnext_epoch12_eval.log"
    assert out.stderr.splitlines() == [f"error: evaluation failed with exit status 3 (log: {log})"]
    assert "[BEVNeXt]" not in out.stdout
    assert log.read_text() == "Traceback: something broke\n"
    assert not (work_dir / "BEVNeXt_8p_epochs12_eval.log").exists()


@pytest.mark.parametrize("node_rank", ["0", "1"])
def test_eval_script_without_metric_lines(tmp_path, node_rank):
    # Node 0 prints the metrics: their absence there is an error; on other nodes it is expected.
    work_dir = _eval_work_dir(tmp_path / "run")
    out, _ = _run_eval(tmp_path, f"--work_dir={work_dir}", output="evaluated 4 samples\n", NNODES="2",
                       NODE_RANK=node_rank)
    assert "[BEVNeXt]" not in out.stdout
    assert not (work_dir / "BEVNeXt_16p_epochs12_eval.log").exists()
    if node_rank == "0":
        assert out.returncode == 1, _tail(out)
        assert out.stderr.splitlines() == [
            f"error: the evaluation printed no 'NDS:' and 'mAP:' lines (log: {work_dir}/bevnext_epoch12_eval.log)"
        ]
    else:
        assert out.returncode == 0, _tail(out)
        assert out.stdout.splitlines()[-1] == "BEVNeXt evaluation finished on node 1; node 0 reports the metrics"


@pytest.mark.slow
def test_eval_script_runs_the_real_evaluation(tiny_synth_root, tmp_path):
    # Randomly initialised tiny stage-2 weights on the 4 validation samples, 1 process on the CPU (~25 s):
    # the printed and summarised figures are the ones bevnext eval computed.
    import torch

    from bevnext.config.run import load_run
    from bevnext.engine.checkpoint import save_checkpoint
    from bevnext.models.detector import build_model

    run = load_run("tiny_stage2", [f"data.data_root={tiny_synth_root}", "data.src_size=[400,225]",
                                   "eval.num_workers=0"])
    work_dir = tmp_path / "stage2"
    work_dir.mkdir()
    (work_dir / "config.json").write_text(json.dumps(run.to_dict(), indent=2))
    torch.manual_seed(0)
    save_checkpoint(work_dir / "epoch_12_ema.pth", {"state_dict": build_model(run.model).state_dict()})
    out = _bash(EVAL, f"--work_dir={work_dir}", "--show=1", timeout=600, NPROC_PER_NODE="1", DEVICE="cpu",
                MASTER_PORT=str(_free_port()))
    assert out.returncode == 0, _tail(out)
    metrics = json.loads((work_dir / "eval_epoch12" / "metrics.json").read_text())
    nds, mean_ap = f"{metrics['nd_score']:.4f}", f"{metrics['mean_ap']:.4f}"
    assert f"[BEVNeXt] NDS : {nds}\n[BEVNeXt] mAP : {mean_ap}\n" in out.stdout
    assert _summary(work_dir / "BEVNeXt_1p_epochs12_eval.log") == {
        "Network": "BEVNeXt", "DeviceType": platform.machine(), "NDS": nds, "mAP": mean_ap}
    assert f"NDS: {nds}" in (work_dir / "bevnext_epoch12_eval.log").read_text()
    assert len(list((work_dir / "eval_epoch12" / "pictures").glob("*.png"))) == 1


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
