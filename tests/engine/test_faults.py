"""Training under faults, with real processes, signals and files: a run killed while writing a checkpoint,
killed mid-epoch, killed under torchrun, stopped by SIGTERM; non-finite steps on one rank of two; a work dir
that cannot take a checkpoint; checkpoint files that are truncated, empty, of another model or unsafe.

Every run is a ``bevnext train`` process (or torchrun, or ``fault_worker.py`` where a NaN must be forced) on
the tiny synthetic dataset of the session fixture ``tiny_synth_root``, in a session of its own and with a
timeout. ``data.cbgs=false train.batch_size=1`` gives 4 steps per epoch on the 4 training samples;
``runtime.deterministic=true runtime.num_threads=1`` makes two runs of the same steps equal bit for bit, so
that an interrupted and resumed run can be compared with the module's uninterrupted one (``straight``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import free_port, process_env

from bevnext.engine.checkpoint import load_checkpoint

WORKER = Path(__file__).with_name("fault_worker.py")
STEPS = 6  # the straight run: epoch 1 (steps 1-4) and half of epoch 2
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, uses RLIMIT_FSIZE")


# ---------------------------------------------------------------------------------------------- helpers
class _Proc:
    """A process in a session of its own (so that it can be stopped with everything it started), its
    stdout and stderr going to files (nothing blocks on a full pipe while the test polls the work dir)."""

    def __init__(self, cmd: list[str], cwd: Path, name: str, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.cmd, self.name = [str(c) for c in cmd], name
        self.out_path, self.err_path = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.popen = subprocess.Popen(self.cmd, cwd=cwd, env=env or process_env(("FAULT_",)), stdout=out,
                                          stderr=err, start_new_session=True, preexec_fn=preexec_fn)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def describe(self) -> str:
        return (f"{' '.join(self.cmd)}\n--- stdout (end) ---\n{self.stdout[-4000:]}\n--- stderr (end) ---\n"
                f"{self.stderr[-4000:]}")

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            self.popen.wait(timeout=30)
            pytest.fail(f"{self.name} still running after {timeout} s: {self.describe()}")

    def wait_until(self, what: str, predicate: Callable[[], bool], timeout: float, poll: float = 0.02) -> None:
        """Poll ``predicate`` until it holds; fail (stopping the process) if it exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.popen.poll() is not None:
                pytest.fail(f"{self.name} exited {self.popen.returncode} before {what}: {self.describe()}")
            if time.monotonic() > deadline:
                self.kill_group()
                self.popen.wait(timeout=30)
                pytest.fail(f"no {what} after {timeout} s: {self.describe()}")
            time.sleep(poll)


@pytest.fixture
def start(tmp_path):
    """``start(cmd, name, **kw)`` launches a ``_Proc``; whatever still runs at the end of the test is killed."""
    procs: list[_Proc] = []

    def launch(cmd: list, name: str, **kwargs) -> _Proc:
        proc = _Proc(cmd, tmp_path, name, **kwargs)
        procs.append(proc)
        return proc

    yield launch
    for proc in procs:
        if proc.popen.poll() is None:
            proc.kill_group()
            proc.popen.wait(timeout=30)


def _train_cmd(config: str, work: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "bevnext", "train", config, "--work-dir", str(work), "--device", "cpu", *args]


def _torchrun(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
            "--master_port", str(port), "--monitor-interval", "0.5", *args]


def _common(root: Path) -> list[str]:
    return [f"data.data_root={root}", "data.src_size=[400,225]", "data.cbgs=false", "train.batch_size=1",
            "train.num_workers=0", "train.log_every=1", "runtime.deterministic=true", "runtime.num_threads=1"]


def _ok(proc: _Proc, timeout: float = 600) -> str:
    rc = proc.wait(timeout)
    assert rc == 0, f"{proc.name} exited {rc}: {proc.describe()}"
    return proc.stdout


def _metric_rows(work: Path) -> list[dict]:
    """Every complete line of metrics.jsonl, in order (a resumed run appends; a line being written is left out)."""
    path = work / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]


def _metrics(work: Path) -> dict[int, dict]:
    """metrics.jsonl by iteration; the last line of a step wins (steps recomputed after a resume)."""
    return {row["iteration"]: row for row in _metric_rows(work)}


def _logged_step(work: Path) -> int:
    rows = _metric_rows(work)
    return rows[-1]["iteration"] if rows else 0


def _losses(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k == "loss" or ".loss_" in k or k.startswith("loss_")}


def _assert_tensors_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} of {len(a)} tensors differ, e.g. {different[:5]}"


def _assert_same_run(work: Path, reference: Path) -> None:
    """``work`` ended exactly as ``reference``: position, weights, EMA, and the losses of every step."""
    a, b = load_checkpoint(work / "last.pth"), load_checkpoint(reference / "last.pth")
    sa, sb = a["train_state"], b["train_state"]
    assert (sa["epoch"], sa["step_in_epoch"], sa["global_step"]) == (sb["epoch"], sb["step_in_epoch"],
                                                                     sb["global_step"])
    _assert_tensors_equal(a["state_dict"], b["state_dict"], "model weights")
    _assert_tensors_equal(sa["ema"]["state_dict"], sb["ema"]["state_dict"], "EMA weights")
    assert sa["ema"]["updates"] == sb["ema"]["updates"]
    ma, mb = _metrics(work), _metrics(reference)
    assert sorted(ma) == sorted(mb)
    for step in ma:
        assert _losses(ma[step]) == _losses(mb[step]), f"losses of step {step}"


def _one_error_line(proc: _Proc, *names: Path) -> str:
    """The process's only stderr line, which must start with ``error: `` and name every path in ``names``."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.describe()
    assert "Traceback" not in proc.stdout + proc.stderr, proc.describe()
    for name in names:
        assert str(name) in lines[0], (str(name), lines[0])
    return lines[0]


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _temp_files(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir() if p.name.endswith((".tmp", ".link")))


# ------------------------------------------------------------------------------- the uninterrupted run
@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_synth_root) -> Path:
    """6 deterministic steps without a fault: epoch_1.pth (+ _ema) at step 4, last.pth at step 6."""
    tmp = tmp_path_factory.mktemp("straight")
    work = tmp / "work"
    proc = _Proc(_train_cmd("tiny_stage1", work, *_common(tiny_synth_root), f"train.max_iters={STEPS}"), tmp,
                 "straight")
    _ok(proc)
    assert load_checkpoint(work / "last.pth")["train_state"]["global_step"] == STEPS
    return work


# ------------------------------------------------------------ 1. SIGKILL while a checkpoint is written
@pytest.mark.slow
def test_sigkill_while_writing_checkpoint_keeps_previous_and_resumes(tmp_path, tiny_synth_root, start):
    """``checkpoint_minutes`` so small that every step writes last.pth; SIGKILL while its temp file
    ``.last.pth.*.tmp`` is half written (with an older last.pth in place): the older one loads whole, and
    ``--resume`` ends the run."""
    work = tmp_path / "work"
    args = [*_common(tiny_synth_root), f"train.max_iters={STEPS}", "train.checkpoint_minutes=0.0001"]
    proc = start(_train_cmd("tiny_stage1", work, *args), "killed")

    def half_written_over_an_older_last() -> bool:
        # A temp file with some, not all, of its bytes (a checkpoint is ~200 MB; the previous one's size is
        # a close estimate): the kill lands inside torch.save, not before it or in the final fsync.
        with contextlib.suppress(OSError):
            whole = (work / "last.pth").stat().st_size
            for name in os.listdir(work):
                if name.startswith(".last.pth.") and name.endswith(".tmp"):
                    return (1 << 20) <= (work / name).stat().st_size <= whole - (1 << 20)
        return False

    proc.wait_until("a half-written temp file of last.pth next to an older last.pth",
                    half_written_over_an_older_last, 600, poll=0.002)
    proc.kill_group(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    leftovers = [p for p in work.iterdir() if p.name.startswith(".last.pth.") and p.name.endswith(".tmp")]
    print("killed while writing:", [(p.name, p.stat().st_size) for p in leftovers],
          "last.pth:", (work / "last.pth").stat().st_size, "bytes")

    # last.pth is the state of the last save the run reported, whole.
    saved = re.findall(r"saved last\.pth \(epoch \d+, step \d+ in the epoch, global step (\d+)\)",
                       (work / "log.txt").read_text())
    assert saved, (work / "log.txt").read_text()
    state = load_checkpoint(work / "last.pth")["train_state"]
    assert state["global_step"] == int(saved[-1])

    out = _ok(start(_train_cmd("tiny_stage1", work, *args, "--resume"), "resumed"))
    assert f"resuming from {work / 'last.pth'} (the latest state)" in out
    assert (f"resumed from {work / 'last.pth'}: epoch {state['epoch'] + 1}, step {state['step_in_epoch']} of 4 in "
            f"the epoch, global step {state['global_step']}") in out
    final = load_checkpoint(work / "last.pth")["train_state"]
    assert final["global_step"] == STEPS
    assert sorted(_metrics(work)) == list(range(1, STEPS + 1))
    # The killed write's temporary file is removed when the run starts again.
    assert leftovers and _temp_files(work) == []
    assert f"removed {leftovers[0].name}, left by an interrupted save" in (work / "log.txt").read_text()


# --------------------------------------------------------------- 2. SIGKILL mid-epoch, then --resume
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, tiny_synth_root, start, straight):
    work = tmp_path / "work"
    args = [*_common(tiny_synth_root), f"train.max_iters={STEPS}", "train.checkpoint_minutes=0.0001"]
    proc = start(_train_cmd("tiny_stage1", work, *args), "killed")
    proc.wait_until("step 2 in metrics.jsonl", lambda: _logged_step(work) >= 2, 600)
    proc.kill_group(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    killed_at = _logged_step(work)
    state = load_checkpoint(work / "last.pth")["train_state"]
    epoch, in_epoch, step = state["epoch"], state["step_in_epoch"], state["global_step"]
    assert epoch == 0 and 1 <= in_epoch <= 3 and step == in_epoch, "a checkpoint inside epoch 1"
    assert step <= killed_at
    print(f"killed after step {killed_at} was logged; last.pth holds global step {step}")

    out = _ok(start(_train_cmd("tiny_stage1", work, *args, "--resume"), "resumed"))
    assert f"resumed from {work / 'last.pth'}: epoch 1, step {in_epoch} of 4 in the epoch, global step {step}" in out
    # Only the steps between the checkpoint and the kill were logged twice (recomputed after the resume).
    twice = sorted(s for s, n in Counter(r["iteration"] for r in _metric_rows(work)).items() if n > 1)
    assert all(step < s <= killed_at for s in twice), (twice, step, killed_at)
    assert load_checkpoint(work / "last.pth")["train_state"]["global_step"] == STEPS
    _assert_same_run(work, straight)


# ------------------------------------------------------------ 3. torchrun restarts a killed worker group
@pytest.mark.slow
@linux_only
def test_torchrun_restart_after_worker_sigkill_finishes_the_run(tmp_path, tiny_synth_root, start):
    work = tmp_path / "work"
    cmd = _torchrun(free_port(), "--max-restarts", "1", "-m", "bevnext", "train", "tiny_stage1", "--work-dir",
                    str(work), "--device", "cpu", *_common(tiny_synth_root), f"train.max_iters={STEPS}",
                    "train.checkpoint_minutes=0.0001")
    proc = start(cmd, "torchrun")
    proc.wait_until("step 2 in metrics.jsonl", lambda: _logged_step(work) >= 2, 600)
    workers = [pid for pid in _children(proc.pid)
               if b"bevnext" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)
    out = _ok(proc, timeout=600)
    log = (work / "log.txt").read_text()
    assert "worker group restart 1: continuing from the work dir's checkpoint" in log, out
    assert f"resuming from {work / 'last.pth'}" in log
    state = load_checkpoint(work / "last.pth")["train_state"]
    assert state["global_step"] == STEPS
    assert json.loads((work / "train_summary.json").read_text())["steps"] == STEPS
    assert sorted(_metrics(work)) == list(range(1, STEPS + 1))


# ------------------------------------------------------------------------- 4. SIGTERM saves and stops
_STOPPED = re.compile(r"^error: stopped by SIGTERM at epoch (\d+), step (\d+) of 4; saved (\S+) — "
                      r"continue with --resume$")


@pytest.mark.slow
def test_sigterm_saves_stops_and_resume_equals_uninterrupted_run(tmp_path, tiny_synth_root, start, straight):
    """Default ``checkpoint_minutes`` (30): the only checkpoint before the end is the one SIGTERM asks for."""
    work = tmp_path / "work"
    args = [*_common(tiny_synth_root), f"train.max_iters={STEPS}"]
    proc = start(_train_cmd("tiny_stage1", work, *args), "terminated")
    proc.wait_until("step 2 in metrics.jsonl", lambda: _logged_step(work) >= 2, 600)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(600) == 2, proc.describe()
    line = _one_error_line(proc, work / "last.pth")
    match = _STOPPED.match(line)
    assert match, line
    epoch, in_epoch, path = int(match[1]), int(match[2]), Path(match[3])
    assert epoch == 1 and in_epoch in (2, 3) and path == work / "last.pth", line
    assert "SIGTERM received: saving at the end of this step, then stopping" in proc.stdout
    state = load_checkpoint(path)["train_state"]
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, in_epoch, in_epoch)
    print("SIGTERM:", line)

    out = _ok(start(_train_cmd("tiny_stage1", work, *args, "--resume"), "resumed"))
    assert f"resumed from {path}: epoch 1, step {in_epoch} of 4 in the epoch, global step {in_epoch}" in out
    _assert_same_run(work, straight)


@pytest.mark.slow
@linux_only
def test_sigterm_to_torchrun_reaches_the_worker_which_saves(tmp_path, tiny_synth_root, start):
    work = tmp_path / "work"
    cmd = _torchrun(free_port(), "-m", "bevnext", "train", "tiny_stage1", "--work-dir", str(work), "--device", "cpu",
                    *_common(tiny_synth_root), f"train.max_iters={STEPS}")
    proc = start(cmd, "torchrun")
    proc.wait_until("step 2 in metrics.jsonl", lambda: _logged_step(work) >= 2, 600)
    os.kill(proc.pid, signal.SIGTERM)
    rc = proc.wait(600)
    assert rc != 0, proc.describe()
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: stopped by SIGTERM")]
    assert len(lines) == 1, proc.describe()
    match = _STOPPED.match(lines[0])
    assert match and Path(match[3]) == work / "last.pth", lines[0]
    state = load_checkpoint(work / "last.pth")["train_state"]
    assert (state["epoch"] + 1, state["step_in_epoch"]) == (int(match[1]), int(match[2]))
    print(f"torchrun exited {rc}; worker said: {lines[0]}")


# ------------------------------------------------------------------------------- 5. non-finite steps
@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_on_both(tmp_path, tiny_synth_root, start):
    """Two gloo ranks, 2 steps per epoch each; rank 1's step 2 returns NaN losses. Both ranks skip it (no
    optimizer or EMA update), count it, and end with identical parameters."""
    work = tmp_path / "work"
    port = str(free_port())
    overrides = [*_common(tiny_synth_root), "train.max_iters=3"]
    procs = [
        start([sys.executable, str(WORKER), "train", str(tmp_path), str(work), "tiny_stage1", *overrides],
              f"rank{r}", env=process_env(("FAULT_",), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                          LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                          FAULT_NAN_STEPS="2", FAULT_NAN_RANK="1"))
        for r in range(2)
    ]
    for proc in procs:
        _ok(proc, timeout=600)
    r0, r1 = (torch.load(tmp_path / f"state_rank{r}.pt", weights_only=True) for r in range(2))
    assert (r0["nan_steps"], r1["nan_steps"]) == ([], [2])
    for rank, state in enumerate((r0, r1)):
        assert state["global_step"] == 3, rank
        assert state["bad_steps"] == 1, f"rank {rank} counted {state['bad_steps']} skipped steps"
        assert state["optimizer_steps"] == [2], f"rank {rank}: optimizer steps {state['optimizer_steps']}"
    _assert_tensors_equal(r0["params"], r1["params"], "parameters of rank 0 and rank 1")

    log = (work / "log.txt").read_text()
    skipped = [ln for ln in log.splitlines() if "skipped step" in ln]
    assert len(skipped) == 1, skipped
    assert skipped[0].endswith("skipped step 2 (epoch 1, iteration 2): non-finite loss (on another rank); "
                               "1 skipped so far, 1 in a row (limit 10)"), skipped[0]
    rows = _metrics(work)
    assert [rows[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert json.loads((work / "train_summary.json").read_text())["skipped_steps"] == 1
    state = load_checkpoint(work / "last.pth")["train_state"]
    assert state["bad_steps"] == 1 and state["ema"]["updates"] == 2
    for name, value in r0["params"].items():
        assert torch.isfinite(value).all(), name


@pytest.mark.slow
def test_max_bad_steps_in_a_row_stop_naming_the_last_good_checkpoint(tmp_path, tiny_synth_root, start):
    """NaN on every step from step 2, ``train.max_bad_steps=2``, a checkpoint every step: step 2 is skipped
    (last.pth still holds step 1's finite weights, at global step 2), step 3 stops the run."""
    work = tmp_path / "work"
    cmd = [sys.executable, str(WORKER), "cli", "tiny_stage1", "--work-dir", str(work), "--device", "cpu",
           *_common(tiny_synth_root), f"train.max_iters={STEPS}", "train.max_bad_steps=2",
           "train.checkpoint_minutes=0.0001"]
    proc = start(cmd, "nan", env=process_env(("FAULT_",), FAULT_NAN_STEPS="2-", FAULT_NAN_RANK="0"))
    assert proc.wait(600) == 2, proc.describe()
    last = work / "last.pth"
    line = _one_error_line(proc)
    assert line.startswith("error: 2 steps in a row were not finite (train.max_bad_steps=2; last: non-finite "
                           "loss (loss_depth=nan"), line
    assert line.endswith(f"; stopping — the last good checkpoint is {last}"), line
    print(line[:120], "...", line[-80:])
    skipped = [ln for ln in (work / "log.txt").read_text().splitlines() if "skipped step" in ln]
    assert [re.search(r"skipped step (\d+)", ln)[1] for ln in skipped] == ["2", "3"], skipped
    ckpt = load_checkpoint(last)
    state = ckpt["train_state"]
    assert (state["global_step"], state["bad_steps"]) == (2, 1)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# ------------------------------------------------------------------ 6. a work dir that cannot be written
def _file_size_limit(limit: int) -> Callable[[], None]:
    """A ``preexec_fn``: files of the child may not grow past ``limit`` bytes (writes fail with EFBIG)."""
    import resource  # POSIX only

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
@linux_only
def test_failed_saves_keep_the_previous_checkpoint(tmp_path, tiny_synth_root, start, straight):
    """A resumed run that may not write files over 16 MiB (RLIMIT_FSIZE; a checkpoint is ~200 MB): the save
    after step 7 fails (one error line, training goes on), the end-of-run save after step 8 fails (the run
    stops with one line, exit 2); last.pth is byte for byte the one it resumed from and still loads."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(straight / "last.pth", work / "last.pth")
    before = _sha256(work / "last.pth")
    args = [*_common(tiny_synth_root), "train.max_iters=8", "train.checkpoint_minutes=0.0001", "--resume"]
    proc = start(_train_cmd("tiny_stage1", work, *args), "limited", preexec_fn=_file_size_limit(16 << 20))
    assert proc.wait(600) == 2, proc.describe()
    last = work / "last.pth"
    line = _one_error_line(proc, work / "epoch_2.pth", last)
    assert line == (f"error: could not save checkpoint {work / 'epoch_2.pth'}: File too large; the run's last save "
                    f"failed, stopping — the last good checkpoint is {last}"), line
    errors = [ln for ln in (work / "log.txt").read_text().splitlines() if "could not save" in ln]
    assert len(errors) == 1, errors
    assert errors[0].endswith(f"could not save checkpoint {last}: File too large; the last good checkpoint is "
                              f"{last}, training continues and the next checkpoint retries (1 of 2 failures "
                              "allowed in a row)"), errors[0]
    print("log:", errors[0])
    print("stderr:", line)
    assert sorted(_metrics(work))[-2:] == [7, 8], "both steps trained"
    assert _sha256(last) == before
    assert load_checkpoint(last)["train_state"]["global_step"] == STEPS
    assert not (work / "epoch_2.pth").exists()
    assert _temp_files(work) == []


# ----------------------------------------------------------------------- 7. bad checkpoint files
class _RunsCode:
    """Unpickling this runs ``touch MARKER`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, straight) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    data = (straight / "last.pth").read_bytes()
    files = {"truncated": folder / "truncated.pth", "empty": folder / "empty.pth",
             "other_module": folder / "linear.pth", "runs_code": folder / "runs_code.pth"}
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    torch.save(torch.nn.Linear(3, 4).state_dict(), files["other_module"])
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": _RunsCode(folder / "MARKER")}, files["runs_code"])
    return files


_UNREADABLE = "not a readable checkpoint (truncated, corrupt or not from torch.save?)"
_BAD_CASES = [
    # (option, config, file, what the line says after "error: FILE: ")
    ("--resume", "tiny_stage1", "truncated", _UNREADABLE),
    ("--resume", "tiny_stage1", "empty", _UNREADABLE),
    ("--resume", "tiny_stage2", "stage1_last", "saved for another model configuration"),
    ("--resume", "tiny_stage1", "runs_code", "loading it would need to run code"),
    ("--load-from", "tiny_stage1", "truncated", _UNREADABLE),
    ("--load-from", "tiny_stage1", "empty", _UNREADABLE),
    ("--load-from", "tiny_stage1", "other_module", "no tensor name matches this model"),
    ("--load-from", "tiny_stage1", "runs_code", "loading it would need to run code"),
]


@pytest.mark.slow
def test_bad_checkpoint_files_are_refused_in_one_line(tmp_path, tiny_synth_root, bad_files, straight, start):
    """Each case is its own ``bevnext train`` process (two at a time): exit 2, one ``error: FILE: ...`` line on
    stderr, no traceback, nothing trained, and the code in the unsafe file never runs."""
    files = dict(bad_files, stage1_last=straight / "last.pth")
    failures = []
    for first in range(0, len(_BAD_CASES), 2):
        batch = []
        for i, (option, config, key, _) in enumerate(_BAD_CASES[first:first + 2], start=first):
            work = tmp_path / f"work{i}"
            args = [*_common(tiny_synth_root), "train.max_iters=1", option, str(files[key])]
            batch.append(start(_train_cmd(config, work, *args), f"case{i}"))
        for i, proc in enumerate(batch, start=first):
            option, config, key, says = _BAD_CASES[i]
            try:
                assert proc.wait(600) == 2, f"exit {proc.popen.returncode}"
                line = _one_error_line(proc, files[key])
                assert line.startswith(f"error: {files[key]}: {says}"), line
                assert not (tmp_path / f"work{i}" / "last.pth").exists()
                print(f"{option} {key} ({config}): {line[:220]}")
            except AssertionError as err:
                failures.append(f"{option} {key} ({config}): {err}\n{proc.describe()}")
    assert not (bad_files["runs_code"].parent / "MARKER").exists(), "the unsafe file's code ran"
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_auto_resume_passes_over_a_corrupt_last_pth(tmp_path, tiny_synth_root, start, straight):
    """``--resume`` in a work dir whose last.pth is corrupt continues from the newest readable epoch_N.pth,
    says which file it passed over and why, and computes step 5 as the uninterrupted run did."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(straight / "epoch_1.pth", work / "epoch_1.pth")
    data = (straight / "last.pth").read_bytes()
    (work / "last.pth").write_bytes(data[: len(data) // 3])
    out = _ok(start(_train_cmd("tiny_stage1", work, *_common(tiny_synth_root), "train.max_iters=5", "--resume"),
                    "fallback"))
    line = next((ln for ln in out.splitlines() if "resuming from" in ln), "")
    assert f"resuming from {work / 'epoch_1.pth'} (the newest readable checkpoint; passed over: " \
           f"{work / 'last.pth'}: not a readable checkpoint" in line, out[-3000:]
    print(line[20:260])
    assert f"resumed from {work / 'epoch_1.pth'}: epoch 2, step 0 of 4 in the epoch, global step 4" in out
    assert load_checkpoint(work / "last.pth")["train_state"]["global_step"] == 5
    assert sorted(_metrics(work)) == [5]
    assert _losses(_metrics(work)[5]) == _losses(_metrics(straight)[5])
    assert not math.isnan(_metrics(work)[5]["loss"])
