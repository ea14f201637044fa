"""Synthetic nuScenes: driving scenes rendered and ray-cast into the exact nuScenes v1.0 on-disk format.

``generate_dataset(out, ...)`` writes a folder that ``NuScenes(version="v1.0-synth", dataroot=out)``
loads and that the official ``DetectionEval`` runs on (custom splits ``synth_train`` /
``synth_val`` from ``v1.0-synth/splits.json``), so everything downstream runs the same code path as
on real nuScenes::

    out/
      v1.0-synth/{attribute,calibrated_sensor,category,ego_pose,instance,log,map,sample,
                  sample_annotation,sample_data,scene,sensor,visibility}.json, splits.json
      samples/CAM_*/<scene>__<CHANNEL>__<timestamp>.jpg        key-frame images (JPEG, quality 90)
      samples/LIDAR_TOP/<scene>__LIDAR_TOP__<timestamp>.pcd.bin  key sweeps, float32 (N, 5)
      sweeps/LIDAR_TOP/<scene>__LIDAR_TOP__<timestamp>.pcd.bin   non-key sweeps between key frames
      maps/<token>.png                                          a small semantic map per log

What is in a scene (details in the submodules):

* ``world``: a straight road with lanes, bike lanes, parking strips and sidewalks; the ego drives at
  4-10 m/s with a gentle weave; cars, trucks, buses, trailers, construction vehicles, pedestrians,
  motorcycles, bicycles, barriers and traffic cones, moving on straight constant-velocity tracks or
  static, never overlapping. Key frames at 2 Hz; each camera fires a few tens of ms off the LiDAR
  key time and gets its own ego pose; images show the world at the camera's own time.
* ``camera_rig``: the nuScenes rig layout (six cameras, roof LiDAR yawed -90 degrees), a
  per-log calibration, intrinsics scaled from 1600 x 900 to the requested image size.
* ``render``: per-pixel ray casting against the ground plane and the boxes with a z-buffer
  (exact perspective and occlusion); pixel (c, r) samples the ray through (c + 0.5, r + 0.5).
* ``lidar``: a 32-beam LiDAR ray-cast at each sweep's time; ``num_lidar_pts`` counts the key-sweep
  points on each box and the visibility token comes from the fraction of its rays not occluded.
* ``tables``: the 13 tables with the devkit's fields and deterministic MD5 tokens.

Annotation rule: an object is annotated in a sample when it is within 50 m of the ego, or within
60 m with at least one LiDAR point, in runs of at least two consecutive samples (one instance per
run), so ``NuScenes.box_velocity`` derives every velocity; the attribute is exactly
``structures.boxes.attribute_for(class, derived speed)``; barriers and cones carry none.

The output is deterministic: the same arguments give byte-identical tables and images.
"""

from __future__ import annotations

from pathlib import Path

from bevnext.synth.generator import TRAIN_SPLIT, VAL_SPLIT, VERSION, generate, validate_args


def generate_dataset(
    out: str | Path,
    scenes: int = 4,
    samples_per_scene: int = 10,
    image_size: tuple[int, int] = (1600, 900),
    seed: int = 0,
    lidar_sweeps_per_sample: int = 2,
    val_fraction: float = 0.25,
    progress: bool = True,
) -> Path:
    """Write a synthetic dataset in the nuScenes v1.0 format (version ``v1.0-synth``).

    Args:
        out: data root to create; must not exist or be an empty folder. It is built in a temporary
            sibling folder and moved into place only when complete.
        scenes: number of scenes (>= 2: the last ``round(scenes * val_fraction)`` (at least one,
            at most ``scenes - 1``) form ``synth_val``, the others ``synth_train``).
        samples_per_scene: key frames per scene (>= 2), 0.5 s apart.
        image_size: (width, height) of the camera images, at least 64 x 36; intrinsics are the
            1600 x 900 ones scaled by width / 1600 and height / 900.
        seed: dataset seed; the same arguments always give the same bytes.
        lidar_sweeps_per_sample: non-key LiDAR sweeps between consecutive key frames (0..9).
        val_fraction: fraction of scenes in the val split, strictly between 0 and 1.
        progress: show a one-line progress bar on stderr.

    Returns:
        The data root ``out``.

    Raises:
        BevnextError: an argument is out of range, or ``out`` exists and is not an empty folder.
    """
    spec = validate_args(scenes, samples_per_scene, image_size, seed, lidar_sweeps_per_sample, val_fraction)
    return generate(out, spec, progress=progress)


__all__ = ["TRAIN_SPLIT", "VAL_SPLIT", "VERSION", "generate_dataset"]
