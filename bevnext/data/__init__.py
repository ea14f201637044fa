"""Data: synthetic nuScenes generator, info files, datasets."""
