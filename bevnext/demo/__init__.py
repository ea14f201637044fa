"""``bevnext demo``: synthetic scenes -> info files -> stage 1 -> stage 2 -> evaluations and pictures, on a CPU.

``run_demo`` runs it within a time budget (``bevnext.demo.runner``); ``bevnext.demo.recipe`` holds what it
trains (dataset, run overrides, step planning) and ``bevnext.demo.report`` draws and formats its results.
"""

from __future__ import annotations

from bevnext.demo.runner import DemoResult, run_demo

__all__ = ["DemoResult", "run_demo"]
