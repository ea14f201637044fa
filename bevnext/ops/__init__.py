"""Operators: each a typed function with a pure-PyTorch reference and optional device fast paths.

See ``bevnext.ops._dispatch`` for how a fast path is chosen; ``BEVNEXT_OPS=reference`` forces the
reference implementation everywhere.
"""

from bevnext.ops.deform_attn import msda_fast_path_unsupported, multi_scale_deformable_attn
from bevnext.ops.deform_conv import DeformConv2dPack, deform_conv2d, deform_conv2d_fast_path_unsupported
from bevnext.ops.gaussian import draw_gaussians, gaussian_radius, heatmap_radius
from bevnext.ops.nms import bev_box_corners, circle_nms, nms_rotated_bev, rotated_iou_bev

__all__ = [
    "DeformConv2dPack",
    "bev_box_corners",
    "circle_nms",
    "deform_conv2d",
    "deform_conv2d_fast_path_unsupported",
    "draw_gaussians",
    "gaussian_radius",
    "heatmap_radius",
    "msda_fast_path_unsupported",
    "multi_scale_deformable_attn",
    "nms_rotated_bev",
    "rotated_iou_bev",
]
