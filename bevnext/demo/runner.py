"""``bevnext demo``: the whole product on a laptop CPU within a time budget.

Seven phases, each announced with a header line (``[demo 3/7] ...``) and the time spent so far:

1. a synthetic nuScenes-format dataset and its info files in ``DIR/data`` (reused when a previous demo made
   the same one);
2. the baseline: the untrained model (stage 1's initial weights) scored on the validation split, and the
   step times of both stages measured on this machine, from which the steps that fit the budget are planned;
3. stage 1 trained by the real trainer (``bevnext train``'s code path), in this process;
4. its EMA weights scored;
5. stage 2 trained from them, its steps planned again from the time actually left;
6. stage 2's EMA weights scored, with pictures of predictions against ground truth;
7. the loss curves, a summary table, where every file is and the commands that repeat or continue each step.

Everything the demo decides about data and optimisation comes from ``bevnext.demo.recipe``; this module only
runs it, keeps the time and reports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bevnext import __version__
from bevnext.config.run import RunConfig, apply_run_overrides
from bevnext.demo import recipe
from bevnext.demo.recipe import DatasetSpec
from bevnext.demo.report import (
    chain_loss_series,
    draw_loss_curves,
    format_clock,
    read_losses,
    score_line,
    scores,
    scores_table,
)
from bevnext.errors import BevnextError
from bevnext.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from bevnext.engine.evaluate import EvalResult
    from bevnext.engine.trainer import TrainResult

__all__ = ["DEMO_MARKER", "DemoResult", "run_demo"]

DEMO_MARKER = "demo.json"
"""The file that marks a folder as a demo's work dir (written first): a rerun may clear what it made."""
_MARKER_FORMAT = "bevnext-demo"
_RUN_ENTRIES = ("untrained", "stage1", "stage2", "summary.txt", "summary.json", "loss_curves.png")
"""What a demo writes in its work dir besides the dataset and the marker; a rerun removes these."""
_PHASES = 7
_SHOW = 3
"""Validation samples drawn after stage 2 (predictions against ground truth)."""

# Estimates of what the plan cannot measure before it trains (seconds); each is replaced by a measurement as
# soon as there is one (see ``_Planner``).
_PICTURE_S = 3.0
"""Drawing one picture (six camera panels and a bird's-eye view)."""
_TRAIN_OVERHEAD_S = 10.0
"""A training's fixed cost around its steps: loader workers, environment report, checkpoints, EMA export."""
_REPORT_S = 3.0
"""The loss curve and the summary."""
_MIN_STEPS = 10
"""Fewest steps per stage the planned budget must allow; fewer would show nothing."""
_STAGE2_DATA_FACTOR = 1.2
"""Stage 2's real steps over its measured ones, beyond stage 1's ratio: it loads three frames of six cameras
per sample with the same loader workers (measured 1.15-1.2 on a 2-core machine)."""


@dataclass
class DemoResult:
    """What a demo produced.

    Attributes:
        work_dir: the demo's folder.
        data_root: the synthetic dataset (in ``work_dir/data``).
        untrained: metrics of the untrained model (``bevnext.eval.nusc_eval.evaluate_nusc``'s dict).
        stage1: metrics of stage 1's EMA weights.
        stage2: metrics of stage 2's EMA weights.
        steps: optimizer steps trained in stage 1 and stage 2.
        checkpoints: ``{"stage1": ..., "stage2": ...}``, the EMA weights that were evaluated.
        pictures: predictions against ground truth drawn for stage 2.
        loss_curve: the loss-curve PNG.
        summary_txt: the printed summary.
        summary_json: the same, machine-readable.
        commands: the ``bevnext`` commands that repeat the demo's steps or continue stage 2.
        wall_s: wall time of the whole demo.
        budget_s: the time budget it planned for.
    """

    work_dir: Path
    data_root: Path
    untrained: dict[str, Any]
    stage1: dict[str, Any]
    stage2: dict[str, Any]
    steps: tuple[int, int]
    checkpoints: dict[str, Path]
    pictures: list[Path]
    loss_curve: Path
    summary_txt: Path
    summary_json: Path
    commands: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    budget_s: float = 0.0


class _Console:
    """The demo's own output: phase headers and score lines, with the time spent so far."""

    def __init__(self, budget_s: float, enabled: bool) -> None:
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.enabled = enabled

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def say(self, text: str) -> None:
        # Flushed: the trainer's log lines go to the same stdout through logging, which flushes every record.
        if self.enabled:
            print(text, flush=True)

    def phase(self, number: int, text: str) -> None:
        self.say(f"[demo {number}/{_PHASES}] {text}, elapsed {format_clock(self.elapsed())} of "
                 f"{format_clock(self.budget_s)}")


# ----------------------------------------------------------------------------------------------------
# The work dir: refuse a stranger's folder, reuse our dataset, clear our previous runs.


def _spec_dict(spec: DatasetSpec) -> dict[str, Any]:
    # Through JSON, so that it compares equal to what a marker file holds (tuples come back as lists).
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def _read_marker(work_dir: Path) -> dict[str, Any] | None:
    """The demo marker in ``work_dir``, or None when the folder holds none of ours."""
    path = work_dir / DEMO_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # markers are written atomically: an unreadable one is not ours
    return marker if isinstance(marker, dict) and marker.get("format") == _MARKER_FORMAT else None


def _write_marker(work_dir: Path, dataset: dict[str, Any] | None, seed: int, budget_s: float) -> None:
    atomic_write_json(work_dir / DEMO_MARKER, {
        "format": _MARKER_FORMAT, "bevnext_version": __version__,
        # The spec of the complete dataset in work_dir/data, or None while there is none.
        "dataset": dataset, "seed": seed, "budget_minutes": budget_s / 60.0,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, indent=2)


def _info_files(data_root: Path) -> list[Path]:
    from bevnext.data.infos import info_path
    from bevnext.synth import TRAIN_SPLIT, VAL_SPLIT

    return [info_path(data_root, split) for split in (TRAIN_SPLIT, VAL_SPLIT)]


def _infos_readable(data_root: Path) -> bool:
    from bevnext.data.infos import load_infos

    try:
        for path in _info_files(data_root):
            load_infos(path)
    except (BevnextError, OSError):
        return False
    return True


def _prepare_work_dir(work_dir: Path, spec: DatasetSpec, console: _Console) -> tuple[bool, bool]:
    """Check ``work_dir`` and clear a previous demo's runs.

    Returns:
        ``(reuse the dataset, reuse its info files)``.

    Raises:
        BevnextError: ``work_dir`` is a file, or a non-empty folder that no demo made.
    """
    if work_dir.exists() and not work_dir.is_dir():
        raise BevnextError(f"demo work dir {work_dir} is a file; give --work-dir a folder")
    if not work_dir.exists() or not any(work_dir.iterdir()):
        return False, False
    marker = _read_marker(work_dir)
    if marker is None:
        raise BevnextError(f"demo work dir {work_dir} is not empty and was not made by bevnext demo (no "
                           f"{DEMO_MARKER}); give an empty or new folder with --work-dir")
    previous = [name for name in _RUN_ENTRIES if (work_dir / name).exists()]
    if previous:
        console.say(f"{work_dir} holds an earlier demo: removing its {', '.join(previous)}; the runs start over")
        for name in previous:
            path = work_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    # A generation that was killed leaves its staging folder (bevnext.io.staging_dir) next to data/.
    for partial in work_dir.glob(".data.*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    data_root = work_dir / "data"
    same_spec = marker.get("dataset") == _spec_dict(spec)
    same_version = marker.get("bevnext_version") == __version__
    if same_spec and same_version and (data_root / "v1.0-synth").is_dir():
        return True, _infos_readable(data_root)
    if data_root.exists():
        why = ("is incomplete" if marker.get("dataset") is None or same_spec and same_version
               else "was made with other settings" if not same_spec else "was made by another bevnext version")
        console.say(f"the synthetic dataset in {data_root} {why}: generating it again")
        shutil.rmtree(data_root)
    return False, False


def _dataset(work_dir: Path, spec: DatasetSpec, reuse: tuple[bool, bool], seed: int, console: _Console) -> Path:
    """Phase 1: the dataset and its info files in ``work_dir/data`` (generation and info files are atomic)."""
    from bevnext.data.infos import create_infos
    from bevnext.synth import VERSION, generate_dataset

    data_root = work_dir / "data"
    reuse_data, reuse_infos = reuse
    what = f"{spec.scenes} scenes x {spec.samples_per_scene} samples, {spec.image_size[0]}x{spec.image_size[1]}"
    if reuse_data:
        console.phase(1, f"synthetic dataset ({what})")
        console.say(f"reusing the synthetic dataset in {data_root}")
    else:
        console.phase(1, f"synthetic dataset: generating {what} in {data_root}")
        _write_marker(work_dir, None, seed, console.budget_s)
        generate_dataset(data_root, scenes=spec.scenes, samples_per_scene=spec.samples_per_scene,
                         image_size=tuple(spec.image_size), seed=spec.seed, progress=console.enabled)
    # From here on the data is complete: a later demo may reuse it even if this one stops.
    _write_marker(work_dir, _spec_dict(spec), seed, console.budget_s)
    if not reuse_infos:
        if reuse_data:
            console.say("its info files are missing or of another format: writing them again")
        for path in create_infos(data_root, VERSION, progress=console.enabled):
            console.say(f"wrote {path}")
    return data_root


# ----------------------------------------------------------------------------------------------------
# Runs, checkpoints, evaluations.


def _own_overrides(seed: int, extra: Sequence[str]) -> list[str]:
    """What this demo sets on top of the recipe's overrides: its seed and the caller's extra overrides."""
    return [f"runtime.seed={seed}", *extra]


def _stage_overrides(stage: int, data_root: Path, steps: int, spec: DatasetSpec, seed: int,
                     extra: Sequence[str]) -> list[str]:
    """All overrides of preset ``tiny_stage<stage>`` for a demo stage: ``bevnext train`` with them repeats it."""
    return [*recipe.stage_overrides(stage, str(data_root), steps, spec), *_own_overrides(seed, extra)]


def _stage_run(stage: int, data_root: Path, steps: int, spec: DatasetSpec, seed: int,
               extra: Sequence[str]) -> RunConfig:
    """The resolved run of a demo stage: the recipe's run with this demo's own overrides applied."""
    run = apply_run_overrides(recipe.stage_run(stage, str(data_root), steps, spec), _own_overrides(seed, extra))
    run.validate()
    return run


def _ema_weights(stage_dir: Path) -> tuple[Path, str]:
    """The file with a finished training's EMA weights, written from ``last.pth`` when the trainer wrote none.

    At an epoch end the trainer writes ``epoch_N_ema.pth``; a run that ``train.max_iters`` stops inside an
    epoch only has ``last.pth``, whose ``train_state["ema"]`` holds them: they go to ``stage_dir/ema.pth`` in
    the reference's EMA layout, so that ``bevnext eval`` and ``--load-from`` read them like any EMA file.

    Returns:
        ``(file, what it holds)``; the live weights (``last.pth`` itself) when the run kept no EMA.
    """
    from bevnext.engine.checkpoint import load_checkpoint, save_checkpoint
    from bevnext.engine.train_state import ema_checkpoint

    last = stage_dir / "last.pth"
    ckpt = load_checkpoint(last)
    state = ckpt.get("train_state", {})
    ema = state.get("ema")
    if ema is None:
        return last, "model weights (the run kept no EMA)"
    epoch = int(state.get("epoch", 0))
    epoch_file = stage_dir / f"epoch_{epoch}_ema.pth"
    if int(state.get("step_in_epoch", -1)) == 0 and epoch > 0 and epoch_file.is_file():
        return epoch_file, "EMA weights"
    out = stage_dir / "ema.pth"
    save_checkpoint(out, {**ema_checkpoint(ema, epoch), "iter": int(state.get("global_step", 0))})
    return out, "EMA weights"


def _evaluate_untrained(run: RunConfig, out: Path) -> dict[str, Any]:
    """Score stage 1's initial weights: the model the trainer builds with this seed, before any step."""
    from bevnext.engine.device import seed_everything
    from bevnext.engine.evaluate import evaluate_model
    from bevnext.engine.launch import start_process
    from bevnext.models.detector import build_model

    info, _ = start_process(run, out, "eval_log.txt", run.eval.num_workers)
    # As the trainer does: seed, then build, so these are exactly the weights stage 1 starts from.
    seed_everything(run.runtime.seed, 0, deterministic=run.runtime.deterministic)
    model = build_model(run.model).to(info.device).eval()
    result = evaluate_model(model, run, out, quiet=True,
                            checkpoint=f"untrained: stage 1's initial weights, seed {run.runtime.seed}")
    return result.metrics


def _measure(run: RunConfig) -> float:
    """Seconds per optimizer step of ``run`` with the CPU threads its training will use."""
    from bevnext.engine.device import choose_num_threads

    # The trainer sets the threads from train.num_workers (one process here); measure under the same setting.
    threads = choose_num_threads(run.runtime.num_threads, 1, run.train.num_workers)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return float(recipe.measure_step_seconds(run))
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------------
# The plan.


@dataclass
class _Planner:
    """Fits the trainings into the budget from measured times; every estimate here is replaced by a measurement
    when one exists (step times by the trainer's real ones, the evaluation time by the last evaluation's)."""

    budget_s: float
    step_s: tuple[float, float]
    eval_s: float
    overhead_s: float = _TRAIN_OVERHEAD_S
    slowdown: float = 1.0  # real stage-1 step time / measured: data loading and logging on top of the math

    def margin(self) -> float:
        # Room for what varies between runs (the machine's load, JPEG decoding, the devkit).
        return max(5.0, 0.05 * self.budget_s)

    def stage2_eval_s(self) -> float:
        # Stage 2 runs more frames per sample; assume its inference costs grow like its training steps.
        ratio = max(1.0, self.step_s[1] / self.step_s[0])
        return self.eval_s * ratio + _SHOW * _PICTURE_S

    def first_plan(self, left_s: float) -> tuple[tuple[int, int], float]:
        """Steps of both stages for ``left_s`` seconds from now, and the seconds given to training.

        Raises:
            BevnextError: the budget leaves less than ``_MIN_STEPS`` steps per stage.
        """
        fixed = self.eval_s + self.stage2_eval_s() + 2 * self.overhead_s + _REPORT_S + self.margin()
        train_s = left_s - fixed
        need = _MIN_STEPS * (self.step_s[0] + self.step_s[1])
        if train_s < need:
            spent = self.budget_s - left_s
            enough = math.ceil((spent + fixed + need * 4) / 60.0)
            raise BevnextError(f"a budget of {self.budget_s / 60:.1f} min is too short on this machine: the data, "
                               f"the evaluations and the measured step times ({self.step_s[0]:.2f} s, "
                               f"{self.step_s[1]:.2f} s) leave {max(0.0, train_s):.0f} s to train; give "
                               f"--budget-minutes {enough} or more")
        return recipe.plan_steps(train_s, self.step_s), train_s

    def stage2_step_s(self) -> float:
        """The expected real seconds per stage-2 step."""
        return self.step_s[1] * self.slowdown * _STAGE2_DATA_FACTOR

    def stage2_plan(self, left_s: float, first: tuple[int, int]) -> tuple[int, float]:
        """Steps of stage 2 for ``left_s`` seconds from now (its training, evaluation and the report)."""
        step2 = self.stage2_step_s()
        train_s = max(0.0, left_s - self.stage2_eval_s() - self.overhead_s - _REPORT_S - self.margin())
        # Ask the recipe for the whole plan that would give stage 2 this time (keeping the share it gave stage 2
        # at first), so that its rules for stage 2 still apply; never more than fits.
        s1, s2 = first
        share2 = s2 * self.step_s[1] / (s1 * self.step_s[0] + s2 * self.step_s[1])
        steps = recipe.plan_steps(train_s / share2, (self.step_s[0] * self.slowdown, step2))[1]
        return max(1, min(steps, int(train_s / step2))), train_s


# ----------------------------------------------------------------------------------------------------
# The demo.


def _train_stage(run: RunConfig, stage_dir: Path, load_from: Path | None) -> TrainResult:
    from bevnext.engine.trainer import train

    return train(run, stage_dir, load_from=load_from)


def _evaluate_stage(run: RunConfig, checkpoint: Path, out: Path, show: int) -> EvalResult:
    from bevnext.engine.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(run, checkpoint, out, show=show)


def _check_args(budget_minutes: float, seed: int, steps: tuple[int, int] | None) -> None:
    if not (isinstance(budget_minutes, int | float) and math.isfinite(budget_minutes) and budget_minutes > 0):
        raise BevnextError(f"--budget-minutes {budget_minutes}: expected a positive number of minutes")
    if not 0 <= seed < 2**31:
        raise BevnextError(f"--seed {seed}: expected an integer in [0, 2**31)")
    if steps is not None and (len(steps) != 2 or any(int(s) < 1 for s in steps)):
        raise BevnextError(f"steps {steps}: expected two step counts >= 1 (stage 1, stage 2)")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise BevnextError("bevnext demo runs in a single process; start it without torchrun")


def _command(*parts: str | Path) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts)


def run_demo(
    work_dir: str | Path,
    budget_minutes: float = 10.0,
    seed: int = 0,
    progress: bool = True,
    *,
    dataset: DatasetSpec | None = None,
    steps: tuple[int, int] | None = None,
    overrides: Sequence[str] = (),
) -> DemoResult:
    """Run the demo into ``work_dir``: data, baseline, stage 1, stage 2, evaluations, pictures, summary.

    Rerunning into a demo's folder reuses its dataset when it was made with the same settings and starts the
    runs over; a non-empty folder that no demo made is refused, never cleared.

    Args:
        work_dir: the demo's folder (``work_dirs/demo`` on the command line).
        budget_minutes: wall time the whole demo may take; the training steps are planned to fit it from the
            step times measured on this machine, and stage 2 is planned again from the time left after stage 1.
        seed: seed of the models' initial weights and of training (the dataset is the recipe's, fixed).
        progress: print the phase headers, the score lines, the summary and the progress bars of data
            generation (the trainer's log lines are logging output and print either way).
        dataset: another dataset than ``recipe.DEMO_DATA`` (a shortened demo, for tests).
        steps: stage 1 and stage 2 steps instead of the planned ones; no step-time measurement, no planning.
        overrides: extra ``key=value`` overrides of both stages' runs (applied last).

    Raises:
        BevnextError: a bad argument or work dir, a budget too short to train anything, or an error of the
            steps it runs (data, training, evaluation), in one line.
    """
    _check_args(budget_minutes, seed, steps)
    budget_s = float(budget_minutes) * 60.0
    console = _Console(budget_s, progress)
    work_dir = Path(work_dir)
    spec = dataset or recipe.DEMO_DATA
    extra = list(overrides)
    try:
        return _run(work_dir, spec, seed, steps, extra, console)
    finally:
        # Otherwise the bevnext logger keeps writing into the last run's log file; the console keeps its lines.
        from bevnext.engine.metrics import setup_logging

        setup_logging(None, 0)


def _run(work_dir: Path, spec: DatasetSpec, seed: int, steps: tuple[int, int] | None, extra: list[str],
         console: _Console) -> DemoResult:
    reuse = _prepare_work_dir(work_dir, spec, console)
    data_root = _dataset(work_dir, spec, reuse, seed, console)

    # ---- 2: the baseline and the plan --------------------------------------------------------------------
    console.phase(2, "baseline: scoring the untrained model on the validation split")
    probe = _stage_run(1, data_root, 1, spec, seed, extra)
    t_eval = time.perf_counter()
    untrained = _evaluate_untrained(probe, work_dir / "untrained")
    eval_s = time.perf_counter() - t_eval
    console.say(score_line("untrained", untrained))
    planner: _Planner | None = None
    if steps is None:
        step_s = (_measure(probe), _measure(_stage_run(2, data_root, 1, spec, seed, extra)))
        planner = _Planner(console.budget_s, step_s, eval_s)
        planned, train_s = planner.first_plan(console.left())
        console.say(f"measured {step_s[0]:.2f} s per step in stage 1 and {step_s[1]:.2f} s in stage 2; "
                    f"{train_s / 60:.1f} min of the budget go to training: {planned[0]} + {planned[1]} steps")
    else:
        planned = (int(steps[0]), int(steps[1]))
        console.say(f"steps given: {planned[0]} in stage 1, {planned[1]} in stage 2 (no planning)")

    # ---- 3, 4: stage 1 ---------------------------------------------------------------------------------------
    steps1 = planned[0]
    run1 = _stage_run(1, data_root, steps1, spec, seed, extra)
    stage1_dir = work_dir / "stage1"
    estimate = f" (~{(steps1 * planner.step_s[0] + planner.overhead_s) / 60:.1f} min)" if planner else ""
    console.phase(3, f"training stage 1: {steps1} steps{estimate}")
    trained1 = _train_stage(run1, stage1_dir, None)
    ckpt1, what1 = _ema_weights(stage1_dir)
    if planner is not None and trained1.final_fps > 0 and trained1.global_step > 0:
        # The trainer's own step times (data loading included) correct the measured ones for stage 2.
        real_step = run1.train.batch_size * run1.train.grad_accum / trained1.final_fps
        planner.slowdown = max(1.0, real_step / planner.step_s[0])
        planner.overhead_s = max(0.0, trained1.duration_s - trained1.global_step * real_step)
    console.phase(4, f"scoring stage 1 ({what1}, {ckpt1})")
    t_eval = time.perf_counter()
    eval1 = _evaluate_stage(run1, ckpt1, stage1_dir / "eval", 0)
    if planner is not None:
        planner.eval_s = time.perf_counter() - t_eval
    console.say(score_line("stage 1", eval1.metrics))

    # ---- 5, 6: stage 2 ---------------------------------------------------------------------------------------
    steps2 = planned[1]
    estimate = ""
    if planner is not None:
        steps2, _ = planner.stage2_plan(console.left(), planned)
        estimate = f" (~{(steps2 * planner.stage2_step_s() + planner.overhead_s) / 60:.1f} min)"
    run2 = _stage_run(2, data_root, steps2, spec, seed, extra)
    stage2_dir = work_dir / "stage2"
    console.phase(5, f"training stage 2 from stage 1's {what1}: {steps2} steps{estimate}")
    _train_stage(run2, stage2_dir, ckpt1)
    ckpt2, what2 = _ema_weights(stage2_dir)
    console.phase(6, f"scoring stage 2 ({what2}, {ckpt2}) and drawing {_SHOW} validation samples")
    eval2 = _evaluate_stage(run2, ckpt2, stage2_dir / "eval", _SHOW)
    console.say(score_line("stage 2", eval2.metrics))

    # ---- 7: report ---------------------------------------------------------------------------------------------
    console.phase(7, "summary")
    curve = draw_loss_curves(
        chain_loss_series([(f"stage 1 ({steps1} steps)", read_losses(stage1_dir / "metrics.jsonl")),
                           (f"stage 2 ({steps2} steps)", read_losses(stage2_dir / "metrics.jsonl"))]),
        work_dir / "loss_curves.png", title="BEVNeXt demo: total training loss per logged step",
    )
    result = DemoResult(
        work_dir=work_dir, data_root=data_root, untrained=untrained, stage1=eval1.metrics, stage2=eval2.metrics,
        steps=(steps1, steps2), checkpoints={"stage1": ckpt1, "stage2": ckpt2}, pictures=list(eval2.pictures),
        loss_curve=curve, summary_txt=work_dir / "summary.txt", summary_json=work_dir / "summary.json",
        budget_s=console.budget_s,
    )
    result.commands = _commands(result, spec, seed, extra)
    result.wall_s = console.elapsed()
    text = _summary_text(result, spec, (run1, run2), (what1, what2))
    atomic_write_text(result.summary_txt, text + "\n")
    atomic_write_json(result.summary_json, _summary_dict(result, spec, seed), indent=2)
    console.say(text)
    return result


# ----------------------------------------------------------------------------------------------------
# The summary.


def _commands(result: DemoResult, spec: DatasetSpec, seed: int, extra: list[str]) -> list[str]:
    from bevnext.synth import VERSION

    d, data = result.work_dir, result.data_root
    s1, s2 = result.steps
    over1 = _stage_overrides(1, data, s1, spec, seed, extra)
    over2 = _stage_overrides(2, data, s2, spec, seed, extra)
    ckpt1, ckpt2 = result.checkpoints["stage1"], result.checkpoints["stage2"]
    return [
        _command("bevnext", "synth", "--out", data, "--scenes", spec.scenes, "--samples-per-scene",
                 spec.samples_per_scene, "--image-size", spec.image_size[0], spec.image_size[1], "--seed", spec.seed),
        _command("bevnext", "create-data", "--data-root", data, "--version", VERSION),
        _command("bevnext", "train", "tiny_stage1", *over1, "--work-dir", d / "stage1"),
        _command("bevnext", "eval", d / "stage1" / "config.json", ckpt1, "--work-dir", d / "stage1" / "eval"),
        _command("bevnext", "train", "tiny_stage2", *over2, "--load-from", ckpt1, "--work-dir", d / "stage2"),
        _command("bevnext", "eval", d / "stage2" / "config.json", ckpt2, "--work-dir", d / "stage2" / "eval",
                 "--show", _SHOW),
        _command("bevnext", "train", d / "stage2" / "config.json", f"train.max_iters={2 * s2}", "--work-dir",
                 d / "stage2", "--resume"),
    ]


def _summary_text(result: DemoResult, spec: DatasetSpec, runs: tuple[RunConfig, RunConfig],
                  what: tuple[str, str]) -> str:
    d = result.work_dir
    s1, s2 = result.steps
    with_gt = result.stage2.get("classes_with_gt") or result.untrained.get("classes_with_gt", [])
    rows = [("untrained", result.untrained), (f"stage 1 ({s1} steps)", result.stage1),
            (f"stage 2 ({s2} steps)", result.stage2)]
    pictures = result.pictures
    lines = [
        "BEVNeXt demo: summary",
        "",
        f"scores on split {runs[0].data.val_split} of the synthetic dataset (official nuScenes detection "
        "evaluation, detection_cvpr_2019):",
        *(f"  {line}" for line in scores_table(rows)),
        *textwrap.wrap(
            "mAP and NDS: the devkit's means over its 10 classes. The other columns: means over the classes with "
            f"ground truth in the split ({len(with_gt)}: {', '.join(with_gt) or 'none'}). AP@d: average precision "
            "at a match distance of d m.", width=110, initial_indent="  ", subsequent_indent="  "),
        "",
        "where everything is:",
        f"  data          {result.data_root}  ({spec.scenes} scenes x {spec.samples_per_scene} samples, "
        f"{spec.image_size[0]}x{spec.image_size[1]}; info files bevnext_infos_*.json)",
        f"  untrained     {d / 'untrained' / 'metrics.json'}",
        f"  stage 1       {d / 'stage1'}  (config.json, log.txt, metrics.jsonl, last.pth)",
        f"                {what[0]}: {result.checkpoints['stage1']}; scores: {d / 'stage1' / 'eval' / 'metrics.json'}",
        f"  stage 2       {d / 'stage2'}  (config.json, log.txt, metrics.jsonl, last.pth)",
        f"                {what[1]}: {result.checkpoints['stage2']}; scores: {d / 'stage2' / 'eval' / 'metrics.json'}",
        f"  pictures      {pictures[0].parent if pictures else 'none'}  ({len(pictures)} validation samples: "
        "predictions in colour, ground truth in white)",
        f"  loss curve    {result.loss_curve}",
        f"  summary       {result.summary_txt}, {result.summary_json}",
        "",
        "the same steps as commands (the dataset, stage 1 and its score, stage 2 from stage 1's weights and its "
        "score),",
        "then stage 2 continued to twice its steps:",
        *(f"  {cmd}" for cmd in result.commands),
        "",
        f"wall time {format_clock(result.wall_s)} of a {format_clock(result.budget_s)} budget",
    ]
    return "\n".join(lines)


def _jsonable(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _summary_dict(result: DemoResult, spec: DatasetSpec, seed: int) -> dict[str, Any]:
    def entry(metrics: dict[str, Any], metrics_path: Path, **more: Any) -> dict[str, Any]:
        return {"scores": {k: _jsonable(v) for k, v in scores(metrics).items()}, "metrics": str(metrics_path), **more}

    d = result.work_dir
    return {
        "bevnext_version": __version__,
        "dataset": {**dataclasses.asdict(spec), "data_root": str(result.data_root)},
        "seed": seed,
        "untrained": entry(result.untrained, d / "untrained" / "metrics.json"),
        "stage1": entry(result.stage1, d / "stage1" / "eval" / "metrics.json", steps=result.steps[0],
                        work_dir=str(d / "stage1"), checkpoint=str(result.checkpoints["stage1"])),
        "stage2": entry(result.stage2, d / "stage2" / "eval" / "metrics.json", steps=result.steps[1],
                        work_dir=str(d / "stage2"), checkpoint=str(result.checkpoints["stage2"]),
                        pictures=[str(p) for p in result.pictures]),
        "loss_curve": str(result.loss_curve),
        "commands": result.commands,
        "wall_s": result.wall_s,
        "budget_s": result.budget_s,
    }

