"""The ``bevnext`` command: one entry point with a subcommand per task.

Each subcommand parses its own flags here and calls one function of the package, imported lazily so
that ``bevnext --help`` stays fast and a missing optional dependency only affects the subcommand
that needs it. A ``BevnextError`` (bad input, missing file, unavailable device) is printed as one
``error: ...`` line with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from bevnext import __version__
from bevnext.errors import BevnextError


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on this machine in minutes: synthetic data, stage 1, stage 2, scores, pictures",
        description="Generate a synthetic nuScenes-format dataset, score the untrained model, train stage 1 and "
        "stage 2 (from stage 1's EMA weights) with as many steps as fit the time budget on this machine, score "
        "both, draw predictions against ground truth and the loss curves, and print a summary with the commands "
        "that repeat or continue each step. Running it again into the same folder reuses the dataset and starts "
        "the runs over.",
    )
    p.add_argument("--work-dir", type=Path, default=Path("work_dirs/demo"),
                   help="output folder (default work_dirs/demo); a non-empty folder must be an earlier demo's")
    p.add_argument("--budget-minutes", type=float, default=10.0, metavar="M",
                   help="wall time the whole demo may take, in minutes (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of training (default 0)")
    # Fixed step counts instead of the planned ones (no timing, no planning): for quick checks of the pipeline.
    p.add_argument("--steps", type=int, nargs=2, default=None, metavar=("N1", "N2"), help=argparse.SUPPRESS)


def _demo(args: argparse.Namespace) -> int:
    from bevnext.demo import run_demo

    run_demo(args.work_dir, budget_minutes=args.budget_minutes, seed=args.seed,
             steps=tuple(args.steps) if args.steps else None)
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic dataset in the exact nuScenes on-disk format",
        description="Render synthetic driving scenes (6 cameras, LiDAR, annotated moving objects) into a folder "
        "laid out exactly like nuScenes (version v1.0-synth, splits synth_train / synth_val).",
    )
    p.add_argument("--out", required=True, type=Path, help="data root to create (must not exist or be empty)")
    p.add_argument("--scenes", type=int, default=4, help="number of scenes (default 4)")
    p.add_argument("--samples-per-scene", type=int, default=10, help="key frames per scene, 2 Hz (default 10)")
    p.add_argument(
        "--image-size", type=int, nargs=2, default=(1600, 900), metavar=("W", "H"), help="default 1600 900"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed; the output is deterministic for a seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_create_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "create-data",
        help="turn a nuScenes-format dataset into bevnext info files",
        description="Read nuScenes tables (v1.0-trainval, v1.0-mini, v1.0-test, or any version with a "
        "splits.json) and write one info file per split next to the data: bevnext_infos_<split>.json.",
    )
    p.add_argument("--data-root", required=True, type=Path, help="e.g. data/nuscenes")
    p.add_argument("--version", required=True, help="e.g. v1.0-trainval, v1.0-mini, v1.0-synth")
    p.add_argument("--skip-missing", action="store_true", help="report and skip samples with missing/corrupt files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_check_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-data",
        help="push ground truth through the results path into the official nuScenes evaluation",
        description="Convert the info files' ground truth with the same code that formats model outputs, run "
        "the official devkit DetectionEval, print 'mAP: x' / 'NDS: y', and draw one sample's boxes.",
    )
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--version", required=True)
    p.add_argument("--split", default=None, help="default: the version's validation split")
    p.add_argument("--out-dir", type=Path, default=None, help="default: DATA_ROOT/check_data/SPLIT")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a run (one or many processes under torchrun)",
        description="Train a run preset (stage1, stage2, tiny_stage1, tiny_stage2) or a config.json written by an "
        "earlier run, with key=value overrides (e.g. train.lr=4e-4 data.data_root=data/nuscenes). Launch with "
        "torchrun for several processes or nodes.",
    )
    p.add_argument("config", help="preset name or path to a config.json")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--work-dir", type=Path, default=None, help="output folder (default work_dirs/<config name>)")
    p.add_argument("--load-from", type=Path, default=None, help="initialise the weights from this checkpoint")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue exactly from CKPT; without it (or 'auto'): WORK_DIR/last.pth, or the newest "
                   "readable checkpoint there when last.pth is unreadable")
    p.add_argument("--device", choices=("npu", "cuda", "cpu"), default=None, help="default: npu > cuda > cpu")
    p.add_argument("--seed", type=int, default=None, help="base seed (default runtime.seed = 0)")


def _load_run(args: argparse.Namespace, *flag_overrides: str):
    """The run of ``args.config`` with its ``key=value`` overrides, then ``--device`` and the other flags'."""
    from bevnext.config.run import load_run

    device = [f"runtime.device={args.device}"] if args.device is not None else []
    return load_run(args.config, [*args.overrides, *device, *flag_overrides])


def _train(args: argparse.Namespace) -> int:
    from bevnext.engine.trainer import train

    run = _load_run(args, *([f"runtime.seed={args.seed}"] if args.seed is not None else []))
    work_dir = args.work_dir or Path("work_dirs") / run.name
    train(run, work_dir, load_from=args.load_from, resume=args.resume)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint with the official nuScenes evaluation (one or many processes under torchrun)",
        description="Run the test pipeline over a split (each process takes whole scenes), write the nuScenes "
        "results JSON and score it with the official devkit (detection_cvpr_2019): prints 'mAP:' and 'NDS:' "
        "with the TP errors and a per-class table, writes metrics.json. CONFIG is a run preset or the config.json "
        "of a training run; CHECKPOINT any of its epoch_N.pth, epoch_N_ema.pth, last.pth, or a reference BEVNeXt "
        "checkpoint.",
    )
    p.add_argument("config", help="preset name or path to a config.json")
    p.add_argument("checkpoint", type=Path, help="the checkpoint to evaluate")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="output folder (default: next to the checkpoint, eval_<checkpoint name>)")
    p.add_argument("--split", default=None, help="split to evaluate (default data.val_split)")
    p.add_argument("--show", type=int, default=0, metavar="N", help="draw N samples: predictions against ground truth")
    p.add_argument("--no-history-reuse", action="store_true",
                   help="recompute every history frame's image features (eval.reuse_history=false)")
    p.add_argument("--device", choices=("npu", "cuda", "cpu"), default=None, help="default: npu > cuda > cpu")


def _eval(args: argparse.Namespace) -> int:
    from bevnext.engine.evaluate import evaluate_checkpoint

    if args.show < 0:
        raise BevnextError(f"--show {args.show}: expected a number of samples >= 0")
    run = _load_run(args, *(["eval.reuse_history=false"] if args.no_history_reuse else []))
    work_dir = args.work_dir or args.checkpoint.parent / f"eval_{args.checkpoint.stem}"
    evaluate_checkpoint(run, args.checkpoint, work_dir, split=args.split, show=args.show)
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark from bench/ (e.g. 'bevnext bench synth')",
        description="Run bench/NAME.py from the source checkout; each prints its ratio against a baseline "
        "measured in the same run. Available: " + ", ".join(_bench_names()) + ".",
    )
    p.add_argument("name", help="benchmark name: " + ", ".join(_bench_names()))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")


def _bench_dir() -> Path:
    # Benchmarks live next to the package in the source checkout (pip install -e .).
    return Path(__file__).resolve().parent.parent / "bench"


def _bench_names() -> list[str]:
    folder = _bench_dir()
    if not folder.is_dir():
        return []
    # Scripts are bench/<name_with_underscores>.py; the command takes the hyphenated name.
    return sorted(p.stem.replace("_", "-") for p in folder.glob("*.py") if not p.stem.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bevnext`` command."""
    parser = argparse.ArgumentParser(
        prog="bevnext", description="BEVNeXt for PyTorch: camera-only 3D detection on nuScenes (NPU, GPU, CPU)."
    )
    parser.add_argument("--version", action="version", version=f"bevnext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_demo(sub)
    _add_synth(sub)
    _add_create_data(sub)
    _add_check_data(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_bench(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return _demo(args)
    if args.command == "synth":
        from bevnext.synth import generate_dataset

        root = generate_dataset(
            args.out,
            scenes=args.scenes,
            samples_per_scene=args.samples_per_scene,
            image_size=tuple(args.image_size),
            seed=args.seed,
            progress=not args.no_progress,
        )
        print(f"wrote synthetic nuScenes dataset (version v1.0-synth) to {root}")
        return 0
    if args.command == "create-data":
        from bevnext.data.infos import create_infos

        for path in create_infos(args.data_root, args.version, skip_missing=args.skip_missing,
                                 progress=not args.no_progress):
            print(f"wrote {path}")
        return 0
    if args.command == "check-data":
        from bevnext.eval.check_data import check_data

        check_data(args.data_root, args.version, split=args.split, out_dir=args.out_dir)
        return 0
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "bench":
        script = _bench_dir() / f"{args.name.replace('-', '_')}.py"
        if not script.is_file():
            raise BevnextError(
                f"no benchmark {args.name!r} in {_bench_dir()} (available: {', '.join(_bench_names()) or 'none'}); "
                "benchmarks run from a source checkout"
            )
        module = runpy.run_path(str(script), run_name="bevnext_bench")
        return int(module["main"](args.args) or 0)
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bevnext`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("train", "eval"):
        # key=value overrides may follow the options too (argparse stops collecting positionals at an option).
        resume = getattr(args, "resume", None)
        if resume not in (None, "auto") and "=" in resume and not Path(resume).exists():
            extra.insert(0, args.resume)
            args.resume = "auto"
        bad = [e for e in extra if e.startswith("-") or "=" not in e]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _run(args)
    except BevnextError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
