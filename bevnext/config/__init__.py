"""Typed dataclass configs: the run (``run.py``) composes model, data, train, eval and runtime sections.

``load_run("stage1", ["train.lr=4e-4"])`` returns a whole ``RunConfig`` from a preset or a resolved
``config.json``; ``apply_overrides`` / ``config_to_dict`` work on any dataclass config.
"""

from bevnext.config.overrides import apply_overrides, config_to_dict
from bevnext.config.run import RUN_PRESETS, RunConfig, load_run

__all__ = ["RUN_PRESETS", "RunConfig", "apply_overrides", "config_to_dict", "load_run"]
