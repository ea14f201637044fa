"""What the demo trains: the synthetic dataset it generates and the tiny runs' settings and schedule.

Everything the demo decides about data and optimisation is here, as ``key=value`` overrides of the
``tiny_stage1`` / ``tiny_stage2`` presets, so that ``bevnext train`` with the same overrides (the demo prints
them) repeats a demo stage exactly.

Why these settings (measured on a 2-core CPU, tiny presets, synthetic scenes):

* Convolutions in the channels-last layout (``model.channels_last=true``): the same computation, and oneDNN's
  CPU convolutions skip their layout conversions; a training step of batch 8 takes 0.82x the time in stage 1 and
  0.81x in stage 2 (``bevnext bench model tiny-stage1 --batch-size 8 --set model.backbone_base_channels=32 --set
  model.bev_strides=[1,2,2] --compare model.channels_last=true``).
* A ResNet-18 of half width (``model.backbone_base_channels=32``) takes 0.68 s per step of 8 samples where the
  full width takes 1.03 s: the demo is bound by how many samples it can show the model in a few minutes, and
  the backbone is most of each step.
* Batches of 8 with a learning rate of 2e-3: 8 samples cost 3x a batch of 2, not 4x (fixed per-step costs), and
  the larger batch tolerates the higher rate.
* An EMA that follows within about a hundred steps (``train.ema_decay=0.99``): the reference's 0.999 averages over
  more steps than a demo stage has.
* No loader workers: loading a batch takes about 0.1 s (0.2 s with stage 2's three frames), and both cores are
  better spent on the step than shared with a worker process.
* No class-balanced resampling: an epoch is one pass over the scenes, which keeps the schedule readable.
* Heatmap logits that start uniform at the prior (``model.heatmap_init_std=0.001``) and a BEV encoder whose first
  stage keeps the grid's resolution (``model.bev_strides=[1,2,2]``): given the ground-truth heatmaps as its BEV
  input, the tiny model's heatmap loss after 120 steps is 0.3 with both and 2.9 with the reference's init and
  strides, so the detection side stops being the slow part of a short run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from bevnext.config.run import RunConfig, load_run

BATCH_SIZE = 8
"""Samples per optimizer step in both stages."""
STAGE1_SHARE = 0.5
"""Share of the training time that goes to stage 1; stage 2 starts from its image network and fine-tunes."""


@dataclass(frozen=True)
class DatasetSpec:
    """The synthetic dataset the demo generates (``bevnext synth`` arguments).

    The last quarter of the scenes (at least one) form the validation split, never trained on.
    """

    scenes: int = 12
    samples_per_scene: int = 20
    image_size: tuple[int, int] = (400, 225)
    seed: int = 0

    @property
    def train_samples(self) -> int:
        """Samples in the training split (``bevnext.synth`` puts ``round(scenes / 4)`` scenes, at least one, in val)."""
        val = min(self.scenes - 1, max(1, round(self.scenes * 0.25)))
        return (self.scenes - val) * self.samples_per_scene


DEMO_DATA = DatasetSpec()
"""The demo's dataset: 12 scenes of 20 samples (9 train, 3 validation) at 400 x 225, about 20 s to render."""


def stage_overrides(stage: int, data_root: str, steps: int, spec: DatasetSpec = DEMO_DATA) -> list[str]:
    """``key=value`` overrides of preset ``tiny_stage<stage>`` for a demo stage of ``steps`` optimizer steps.

    Args:
        stage: 1 or 2.
        data_root: the synthetic dataset.
        steps: optimizer steps; the run's epochs are the passes over the training split they need.
        spec: the dataset at ``data_root`` (its image size and training-split size).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    steps_per_epoch = max(1, spec.train_samples // BATCH_SIZE)
    return [
        f"data.data_root={data_root}",
        f"data.src_size=[{spec.image_size[0]},{spec.image_size[1]}]",
        "data.cbgs=false",
        "model.backbone_base_channels=32",
        "model.heatmap_init_std=0.001",
        "model.bev_strides=[1,2,2]",
        "model.channels_last=true",
        f"train.batch_size={BATCH_SIZE}",
        "train.lr=2e-3",
        "train.ema_decay=0.99",
        "train.num_workers=0",
        "train.log_every=5",
        "train.checkpoint_minutes=0",
        "train.keep_checkpoints=1",
        f"train.epochs={max(1, math.ceil(steps / steps_per_epoch))}",
        f"train.max_iters={steps}",
    ]


def stage_run(stage: int, data_root: str, steps: int, spec: DatasetSpec = DEMO_DATA) -> RunConfig:
    """The resolved run of demo stage ``stage`` (1 or 2) with ``steps`` optimizer steps."""
    return load_run(f"tiny_stage{stage}", stage_overrides(stage, data_root, steps, spec))


def plan_steps(seconds: float, step_seconds: tuple[float, float]) -> tuple[int, int]:
    """Optimizer steps of stage 1 and stage 2 that fit ``seconds`` of training at the measured step times.

    Args:
        seconds: wall time left for both trainings.
        step_seconds: seconds per optimizer step of stage 1 and stage 2.
    """
    s1 = max(1, int(seconds * STAGE1_SHARE / step_seconds[0]))
    s2 = max(1, int(seconds * (1.0 - STAGE1_SHARE) / step_seconds[1]))
    return s1, s2


def measure_step_seconds(run: RunConfig, steps: int = 3) -> float:
    """Seconds per optimizer step of ``run``'s model on this machine (forward, backward, AdamW update).

    Runs ``steps`` steps on a random batch of the run's shape and batch size, in this process with its
    current thread setting, and returns the fastest of all but the first (allocator warm-up). Data loading is
    not included (the caller corrects for it from the trainer's own step times).
    """
    from bevnext.models.detector import build_model
    from bevnext.synth.batches import random_batch

    model = build_model(run.model).train()
    batch = random_batch(run.model, batch_size=run.train.batch_size, num_boxes=20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(max(2, steps)):
        t0 = time.perf_counter()
        losses = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return min(times[1:])
