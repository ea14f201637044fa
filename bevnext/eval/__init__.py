"""Evaluation: nuScenes result formatting, the official evaluation, visualisation."""
