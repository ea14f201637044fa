"""Random batches with a real camera rig: model tests, benchmarks and smoke runs without any data files.

The images are noise, but the geometry is a nuScenes-like six-camera ring and the boxes are valid, so every
module, target and loss computes what it would on real data. ``bevnext bench model`` / ``bench train`` time
the model on these batches to separate the step from data loading.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from bevnext.config.model import ModelConfig
from bevnext.structures.batch import Batch
from bevnext.structures.cameras import CameraGeometry

# nuScenes-like ring: yaw of each camera's optical axis about +z (CAM_FRONT, FRONT_RIGHT, FRONT_LEFT,
# BACK, BACK_LEFT, BACK_RIGHT), degrees.
_YAWS = (0.0, -55.0, 55.0, 180.0, 110.0, -110.0)


def _cam2ego(yaw_deg: float) -> tuple[torch.Tensor, torch.Tensor]:
    # Optical frame (x right, y down, z forward) -> ego (x forward, y left, z up), then yaw about +z.
    optical_to_ego = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    a = math.radians(yaw_deg)
    yaw = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rot = yaw @ optical_to_ego
    trans = torch.tensor([1.0 * math.cos(a), 1.0 * math.sin(a), 1.6])
    return rot, trans


# Three objects in every task: an odd count per task means the L1 gradient of a regression branch's bias
# (a sum of +-1 over objects) can never cancel to exactly zero, so "every parameter gets a gradient" is exact.
ODD_PER_TASK = (0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 5, 6, 6, 7, 8, 8, 9)


def random_batch(
    cfg: ModelConfig, batch_size: int = 1, num_boxes: int = 4, seed: int = 0, labels: Sequence[int] | None = None
) -> Batch:
    """A batch shaped for ``cfg`` with a nuScenes-like 6-camera rig, random images and boxes.

    Intrinsics are those of a 1600x900 camera scaled so the input image is the resized, bottom-cropped
    view, as the test pipeline produces it; history frames share the key frame's geometry, shifted 1 m back per
    frame (the ego moving forward). ``labels`` fixes the class of every box (and their number).
    """
    g = torch.Generator().manual_seed(seed)
    if labels is not None:
        num_boxes = len(labels)
    h, w = cfg.input_size
    n, f = 6, cfg.num_frames
    scale = w / 1600.0
    k = torch.tensor([[1266.0 * scale, 0.0, 800.0 * scale], [0.0, 1266.0 * scale, 450.0 * scale], [0.0, 0.0, 1.0]])
    post_rot = torch.eye(3)
    post_trans = torch.tensor([0.0, -(900.0 * scale - h), 0.0])  # bottom crop
    rots, trans = zip(*(_cam2ego(y) for y in _YAWS))
    rot = torch.stack(rots)[None, None].expand(batch_size, f, n, 3, 3).clone()
    tr = torch.stack(trans)[None, None].expand(batch_size, f, n, 3).clone()
    tr[..., 0] -= torch.arange(f, dtype=torch.float32)[None, :, None]
    x_max = cfg.point_cloud_range[3] * 0.8
    gt_boxes, gt_labels = [], []
    for _ in range(batch_size):
        xy = (torch.rand(num_boxes, 2, generator=g) * 2 - 1) * x_max
        z = torch.rand(num_boxes, 1, generator=g) - 0.5
        lwh = torch.rand(num_boxes, 3, generator=g) * 3 + 0.5
        yaw = (torch.rand(num_boxes, 1, generator=g) * 2 - 1) * math.pi
        vel = torch.randn(num_boxes, 2, generator=g)
        gt_boxes.append(torch.cat([xy, z, lwh, yaw, vel], dim=1))
        if labels is None:
            gt_labels.append(torch.randint(0, 10, (num_boxes,), generator=g))
        else:
            gt_labels.append(torch.tensor(labels, dtype=torch.long))
    gt_depth = torch.rand(batch_size, n, h, w, generator=g) * 70.0
    gt_depth[torch.rand(batch_size, n, h, w, generator=g) > 0.05] = 0.0  # sparse, some out of range
    return Batch(
        images=torch.randn(batch_size, f, n, 3, h, w, generator=g),
        cams=CameraGeometry(
            cam2key_rot=rot,
            cam2key_trans=tr,
            intrinsics=k[None, None, None].expand(batch_size, f, n, 3, 3).clone(),
            post_rot=post_rot[None, None, None].expand(batch_size, f, n, 3, 3).clone(),
            post_trans=post_trans[None, None, None].expand(batch_size, f, n, 3).clone(),
            bda=torch.eye(3)[None].expand(batch_size, 3, 3).clone(),
        ),
        canvas=torch.randint(0, 256, (batch_size, n, h, w, 3), generator=g, dtype=torch.uint8),
        gt_depth=gt_depth,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        metas=[{"token": f"sample-{i}"} for i in range(batch_size)],
    )


def random_scene_batches(cfg: ModelConfig, scene_lengths: Sequence[int] = (4,), seed: int = 0) -> list[Batch]:
    """Batches of one sample each that form scenes, as the test pipeline delivers them in order.

    Every key frame has its own random images; sample ``t`` of a scene carries frames ``t, t-1, ...`` with the
    scene's first sample repeated where the scene has fewer (as the dataset does), each frame with the images
    of the sample it is, the ego moving 1 m forward per sample, and ``meta["frame_tokens"]`` naming them.

    Args:
        cfg: the model config (input size, frame count).
        scene_lengths: number of samples of each scene.
        seed: seed of the images and boxes.

    Returns:
        ``sum(scene_lengths)`` batches in scene order.
    """
    g = torch.Generator().manual_seed(seed)
    template = random_batch(cfg, batch_size=1, seed=seed)
    batches = []
    for s, length in enumerate(scene_lengths):
        tokens = [f"scene{s}-sample{t}" for t in range(length)]
        images = [torch.randn(template.images.shape[2:], generator=g) for _ in range(length)]
        for t in range(length):
            frames = [max(t - f, 0) for f in range(cfg.num_frames)]
            trans = template.cams.cam2key_trans.clone()
            for f, j in enumerate(frames):
                # frame 0 from random_batch sits at the key frame; frame j of the scene is t - j metres back
                trans[:, f, :, 0] = template.cams.cam2key_trans[:, 0, :, 0] - (t - j)
            cams = dataclasses.replace(template.cams, cam2key_trans=trans)
            batches.append(dataclasses.replace(
                template,
                images=torch.stack([images[j] for j in frames])[None],
                cams=cams,
                canvas=template.canvas.clone(),
                metas=[{"token": tokens[t], "frame_tokens": [tokens[j] for j in frames]}],
            ))
    return batches
