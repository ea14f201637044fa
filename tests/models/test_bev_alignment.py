"""Data pipeline, view transform and targets agree on where each object is.

The geometry tests pin each part to the synthetic renderer on its own (tests/data/test_geometry.py) and the
evaluation test pins targets -> detections -> metrics. This closes the chain between them: in an augmented
training batch, a feature placed at the image pixel where an object's centre shows, at that centre's depth,
must be splatted by the model into the BEV cell where the target builder puts the object's heatmap peak.
A disagreement anywhere (camera order, image vs. geometry augmentation, BEV flips, the grid's row/column
order) leaves a detector that can only learn where objects usually are.
"""

from __future__ import annotations

import torch

from bevnext.config.run import load_run
from bevnext.data.loader import build_train_loader
from bevnext.models.detector import build_model


def _key_cell_of_splat(model, batch, b: int, n: int, uv: torch.Tensor, depth: float) -> tuple[int, int] | None:
    """(row, column) of the BEV cell that a unit feature at pixel ``uv`` of key-frame camera ``n`` of sample ``b``,
    at ``depth`` metres, is splatted into; None when it leaves the feature map, the depth bins or the grid."""
    vt = model.img_view_transformer
    h, w = vt.feature_size
    stride = vt.input_size[0] // h
    col, row = int(uv[0] // stride), int(uv[1] // stride)
    start, _, step = vt.depth_range
    bin_ = int((depth - start) // step)
    if not (0 <= col < w and 0 <= row < h and 0 <= bin_ < vt.D):
        return None
    B, N = batch.batch_size, batch.num_cams
    depth_prob = torch.zeros(B * N, vt.D, h, w)
    context = torch.zeros(B * N, 1, h, w)
    depth_prob[b * N + n, bin_, row, col] = 1.0
    context[b * N + n, 0, row, col] = 1.0
    bev = vt.splat(depth_prob, context, batch.cameras(0))[b].sum(0)  # (Y, X)
    if bev.sum() == 0:  # above or below the grid's height range
        return None
    cell = (bev == bev.max()).nonzero()[0]
    return int(cell[0]), int(cell[1])


def test_a_feature_at_an_objects_pixel_lands_on_its_target_peak(tiny_synth_root):
    # 0.5 m depth bins keep the depth quantisation well inside a 3.2 m cell.
    run = load_run("tiny_stage1", [f"data.data_root={tiny_synth_root}", "data.src_size=[400,225]",
                                   "data.cbgs=false", "model.depth_range=[1.0,61.0,0.5]"])
    model = build_model(run.model)
    loader = build_train_loader(run.data, batch_size=2, num_workers=0, seed=1)
    checked = exact = 0
    loader.set_epoch(0)  # image flips, rotations, resizes, crops; BEV rotations, scales and flips
    for batch in loader.loader:
        cams = batch.cameras(0)
        targets = model.target_builder(batch.gt_boxes, batch.gt_labels)
        peaks = torch.cat([t.heatmap for t in targets], dim=1).eq(1).any(dim=1)  # (B, Y, X)
        for b in range(batch.batch_size):
            # Boxes are in the BEV-augmented key frame; cameras see the un-augmented one.
            centres = batch.gt_boxes[b][:, :3] @ torch.linalg.inv(cams.bda[b]).T
            rows, cols = peaks[b].nonzero(as_tuple=True)
            for centre in centres:
                for n in range(batch.num_cams):
                    in_cam = cams.cam2key_rot[b, n].T @ (centre - cams.cam2key_trans[b, n])
                    if in_cam[2] < 1.0:
                        continue
                    pixel = cams.intrinsics[b, n] @ in_cam
                    pixel = cams.post_rot[b, n] @ (pixel / pixel[2]) + cams.post_trans[b, n]
                    cell = _key_cell_of_splat(model, batch, b, n, pixel, float(in_cam[2]))
                    if cell is None:
                        continue
                    # The nearest target peak: one cell of slack for the feature map's 8-pixel quantisation.
                    distance = torch.maximum((rows - cell[0]).abs(), (cols - cell[1]).abs()).min()
                    assert distance <= 1, f"sample {b} camera {n}: splat cell {cell}, nearest peak {distance} away"
                    checked += 1
                    exact += int(distance == 0)
                    break
    assert checked >= 20, f"only {checked} objects were checked"
    assert exact >= 0.7 * checked, f"{exact} of {checked} objects landed exactly on their peak cell"
