"""The BEVNeXt detector: composition of the modules, and ``build_model`` from a ``ModelConfig``.

Data flow for a batch (reference §2.1; shapes at the real size, C = 80 stage 1 / 160 stage 2):
images (B, F, N, 3, 256, 704) -> per frame f: ResNet -> CustomFPN (B*N, 512, 32, 88) -> DepthNet + CRF +
lift-splat (B, C, 128, 128) -> pre_process_net; the key frame (f = 0) with gradients, history frames
without (model still in train mode, as the reference) -> concatenated (B, C*F, 128, 128) -> BEV encoder ->
FPN_LSS (B, 256, 128, 128) -> proposal heatmaps; key-frame context + depth embedding -> perspective
refinement (B, C, 128, 128) -> regression head. All outputs are in the key frame (see ``bevnext.structures.batch``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bevnext.config.model import IMAGE_STRIDES, ModelConfig
from bevnext.models.backbone import ResNetBackbone
from bevnext.models.bev_encoder import FPNLSS, BEVResNet
from bevnext.models.decode import REFERENCE_TASK_DECODING, DecodeConfig, decode_boxes, post_center_range_for
from bevnext.models.feature_cache import ImageFeatureCache
from bevnext.models.heads import CenterHeadProposal, CenterHeadReg
from bevnext.models.image_neck import CustomFPN
from bevnext.models.refinement import PerspectiveRefinement, make_depth_embedding
from bevnext.models.res2fusion import Res2Fusion
from bevnext.models.targets import TASKS, TargetBuilder
from bevnext.models.view_transform import LSSViewTransformer
from bevnext.structures.batch import Batch
from bevnext.structures.detections import Detections

# The reference describes the head grid as 0.1 m voxels with an 8x output stride (= the 0.8 m BEV cell). Only
# the target builder keeps that form: it divides by the voxel and then by the stride in float32, in the
# reference's order, so that its cells and sub-cell offsets match the reference bit for bit. Decoding takes
# the cell size directly.
_HEAD_STRIDE = 8


@dataclass(frozen=True)
class HeadOutputs:
    """The raw outputs of the heads for one batch (before sigmoid and decoding).

    Attributes:
        proposals: per task ``{"heatmap": (B, k_t, Y, X)}`` logits of the proposal head.
        regression: per task the box maps of ``CenterHeadReg`` (``reg``, ``height``, ``dim``, ``rot``, ``vel``),
            each (B, channels, Y, X).
        depth: (B*N, D, h, w) key-frame depth probabilities (after the CRF).
    """

    proposals: list[dict[str, Tensor]]
    regression: list[dict[str, Tensor]]
    depth: Tensor


class BEVNeXt(nn.Module):
    """BEVNeXt (reference ``mmdet3d/models/detectors/bevnext.py``), composed from explicit modules.

    The child modules are registered under the reference's names and in its order, so the state dict
    has the reference's keys and a reference checkpoint loads directly.
    """

    def __init__(
        self,
        *,
        pts_bbox_head: CenterHeadReg,
        img_backbone: ResNetBackbone,
        img_neck: CustomFPN,
        img_view_transformer: LSSViewTransformer,
        img_bev_encoder_backbone: nn.Module,
        img_bev_encoder_neck: FPNLSS,
        pre_process_net: BEVResNet,
        transformer_neck: PerspectiveRefinement,
        proposal_head: CenterHeadProposal,
        depth_emb: nn.Module,
        target_builder: TargetBuilder,
        num_frames: int,
        decode: DecodeConfig | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.pts_bbox_head = pts_bbox_head
        self.img_backbone = img_backbone
        self.img_neck = img_neck
        self.img_view_transformer = img_view_transformer
        self.img_bev_encoder_backbone = img_bev_encoder_backbone
        self.img_bev_encoder_neck = img_bev_encoder_neck
        self.pre_process_net = pre_process_net
        self.transformer_neck = transformer_neck
        self.proposal_head = proposal_head
        self.depth_emb = depth_emb
        self.target_builder = target_builder
        self.num_frames = num_frames
        self.decode = decode if decode is not None else DecodeConfig()
        self.channels_last = channels_last
        if channels_last:
            # 4-D parameters and buffers (the convolutions' weights) only; everything else is unaffected.
            self.to(memory_format=torch.channels_last)

    def image_features(self, images: Tensor) -> Tensor:
        """The image-only part of a frame: backbone, neck and the depth net's reduction.

        Args:
            images: (B*N, 3, H, W) normalised camera images.

        Returns:
            (B*N, depth_mid_channels, H / downsample, W / downsample).
        """
        if self.channels_last:
            # The stem then reads NHWC directly instead of converting its input every call.
            images = images.contiguous(memory_format=torch.channels_last)
        return self.img_view_transformer.depth_net.reduce(self.img_neck(self.img_backbone(images)))

    def _frame_bev(
        self, batch: Batch, f: int, cache: ImageFeatureCache | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One frame to BEV: (bev (B, C, Y, X), depth_prob (B*N, D, h, w), context (B*N, C, h, w))."""
        if cache is None:
            reduced = self.image_features(batch.images[:, f].flatten(0, 1))  # (B*N, mid, h, w)
        else:
            tokens = [meta["frame_tokens"][f] for meta in batch.metas]
            reduced = cache.features(batch.images[:, f], tokens, self.image_features)
        bev, depth, context = self.img_view_transformer(
            None,
            batch.cameras(f),
            batch.canvas,  # the reference's CRF uses the key frame's colours for every frame
            # The reference builds every frame's camera-aware depth input from the key frame's extrinsics.
            mlp_cams=batch.cameras(0),
            reduced=reduced,
        )
        bev = self.pre_process_net(bev)[0]
        return bev, depth, context

    def forward_features(self, batch: Batch, cache: ImageFeatureCache | None = None) -> HeadOutputs:
        """Everything up to decoding: the heads' raw outputs (see ``HeadOutputs``).

        Args:
            batch: B samples of ``num_frames`` frames.
            cache: keeps the image-only features of frames between calls (evaluation only: the test pipeline
                gives a frame the same images every time it returns; see ``ImageFeatureCache``). Every
                ``meta`` of the batch needs its ``frame_tokens``.
        """
        if batch.num_frames != self.num_frames:
            raise ValueError(f"batch has {batch.num_frames} frames, the model was built for {self.num_frames}")
        if cache is not None and self.training:
            raise ValueError("an ImageFeatureCache is only valid in eval mode (training images are augmented)")
        key_bev, key_depth, key_context = self._frame_bev(batch, 0, cache)
        bevs = [key_bev]
        # History frames: no gradients, but the model stays in its mode (BN uses batch statistics in
        # training), exactly as the reference's sliding window.
        with torch.no_grad():
            for f in range(1, self.num_frames):
                bevs.append(self._frame_bev(batch, f, cache)[0])
        if cache is not None:
            cache.keep_only(token for meta in batch.metas for token in meta["frame_tokens"])
        x = self.img_bev_encoder_neck(self.img_bev_encoder_backbone(torch.cat(bevs, dim=1)))
        proposals = self.proposal_head(x)
        bn = key_context.shape[0]
        feats_2d = key_context + self.depth_emb(key_depth.detach())  # depth embedding without depth gradients
        feats_2d = feats_2d.view(batch.batch_size, bn // batch.batch_size, *feats_2d.shape[1:])
        refined = self.transformer_neck(x, feats_2d, batch.cameras(0))
        regression = self.pts_bbox_head(refined)
        return HeadOutputs(proposals=proposals, regression=regression, depth=key_depth)

    def forward(
        self, batch: Batch, reduce_fn: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, Tensor] | list[Detections]:
        """The losses in train mode (see ``loss``), the detections in eval mode (see ``predict``).

        Training goes through ``forward`` so that ``DistributedDataParallel`` sees the step: DDP prepares
        its gradient all-reduce only inside the wrapper's ``forward``; calling ``ddp.module.loss()`` would
        train every rank on its own gradients without any error.

        Args:
            batch: see ``loss`` / ``predict``.
            reduce_fn: averages loss normaliser counts over processes (training only).
        """
        if self.training:
            return self.loss(batch, reduce_fn=reduce_fn)
        return self.predict(batch)

    def loss(self, batch: Batch, reduce_fn: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """Training losses (a flat dict of 0-d tensors; their sum is the training objective).

        Args:
            batch: a training batch with ``gt_depth``, ``gt_boxes`` and ``gt_labels``.
            reduce_fn: averages normaliser counts over processes in distributed training.
        """
        if batch.gt_depth is None:
            raise ValueError("training needs batch.gt_depth (sparse LiDAR depth); got None")
        out = self.forward_features(batch)
        targets = self.target_builder(batch.gt_boxes, batch.gt_labels)
        losses = {"loss_depth": self.img_view_transformer.depth_loss(batch.gt_depth, out.depth)}
        losses.update(self.proposal_head.loss(out.proposals, targets, reduce_fn=reduce_fn))
        losses.update(self.pts_bbox_head.loss(out.regression, targets, reduce_fn=reduce_fn))
        return losses

    @torch.no_grad()
    def predict(self, batch: Batch, cache: ImageFeatureCache | None = None) -> list[Detections]:
        """Detections per sample in the key frame (BEV augmentation, if any, not undone).

        ``cache`` reuses image features across the samples of a scene (see ``forward_features``).
        """
        return self.postprocess(self.forward_features(batch, cache))

    def postprocess(self, out: HeadOutputs) -> list[Detections]:
        """Head outputs -> detections: sigmoid heatmaps, decode and Scale-NMS with ``self.decode``, in fp32.

        Returns:
            Per sample ``Detections`` (see ``bevnext.models.decode.decode_boxes``).
        """
        heatmaps = [p["heatmap"].float().sigmoid() for p in out.proposals]
        regression = [{k: v.float() for k, v in r.items()} for r in out.regression]
        return decode_boxes(heatmaps, regression, self.decode)


def build_model(cfg: ModelConfig) -> BEVNeXt:
    """Translate a ``ModelConfig`` into constructor arguments — the one place that reads the config.

    Raises:
        ConfigError: a value out of range, naming its ``model.*`` key.
    """
    cfg.validate()
    c = cfg.context_channels
    grid_x, grid_y, grid_z = cfg.grid_size
    lower = cfg.point_cloud_range[:3]
    depth_bins = cfg.num_depth_bins
    backbone = ResNetBackbone(
        depth=cfg.backbone_depth,
        out_indices=tuple(range(IMAGE_STRIDES[cfg.downsample], 4)),
        with_cp=cfg.backbone_with_cp,
        pretrained=cfg.pretrained,
        require_pretrained=cfg.require_pretrained,
        base_channels=cfg.backbone_base_channels,
    )
    view = LSSViewTransformer(
        in_channels=cfg.image_neck_channels,
        context_channels=c,
        input_size=cfg.input_size,
        downsample=cfg.downsample,
        grid_lower=lower,
        grid_interval=cfg.bev_cell,
        grid_size=(grid_x, grid_y, grid_z),
        depth_range=cfg.depth_range,
        crf_iters=cfg.crf_iters,
        crf_zeta=cfg.crf_zeta,
        crf_init_weight=cfg.crf_init_weight,
        truncate_voxel_index=cfg.truncate_voxel_index,
        use_dcn=cfg.use_dcn,
        with_cp=cfg.depth_with_cp,
        depth_loss_weight=cfg.depth_loss_weight,
        mid_channels=cfg.depth_mid_channels,
    )
    bev_in = c * grid_z
    if cfg.bev_encoder == "resnet":
        bev_backbone: nn.Module = BEVResNet(
            bev_in * cfg.num_frames, [2, 2, 2], list(cfg.bev_strides), list(cfg.bev_channels)
        )
    else:
        bev_backbone = Res2Fusion(
            in_channels=bev_in, num_frames=cfg.num_frames, channels=cfg.bev_channels, strides=cfg.bev_strides
        )
    first_stride, *later_strides = cfg.bev_strides
    ch = cfg.bev_channels
    voxel = (cfg.bev_cell[0] / _HEAD_STRIDE, cfg.bev_cell[1] / _HEAD_STRIDE)
    targets = TargetBuilder(
        tasks=TASKS,
        point_cloud_range=cfg.point_cloud_range,
        voxel_size=voxel,
        out_size_factor=_HEAD_STRIDE,
    )
    return BEVNeXt(
        pts_bbox_head=CenterHeadReg(
            c, TASKS, head_channels=cfg.head_channels, code_weights=cfg.code_weights, loss_weight=cfg.reg_loss_weight
        ),
        img_backbone=backbone,
        img_neck=CustomFPN(backbone.out_channels, cfg.image_neck_channels),
        img_view_transformer=view,
        img_bev_encoder_backbone=bev_backbone,
        img_bev_encoder_neck=FPNLSS(
            ch[0] + ch[2],
            cfg.bev_neck_channels,
            scale_factor=later_strides[0] * later_strides[1],
            extra_upsample=first_stride if first_stride > 1 else None,
        ),
        pre_process_net=BEVResNet(bev_in, [2], [1], [bev_in]),
        transformer_neck=PerspectiveRefinement(
            c,
            in_channels=cfg.bev_neck_channels,
            bev_shape=(grid_y, grid_x),
            grid_lower=lower[:2],
            grid_interval=cfg.bev_cell[:2],
            pillar_z=cfg.refine_pillar_z,
            num_heads=cfg.refine_heads,
            num_points=cfg.refine_points,
            image_size=cfg.input_size,
            query_chunk=cfg.refine_query_chunk,
        ),
        proposal_head=CenterHeadProposal(
            cfg.bev_neck_channels, TASKS, head_channels=cfg.head_channels, heatmap_init_std=cfg.heatmap_init_std
        ),
        depth_emb=make_depth_embedding(depth_bins, c),
        target_builder=targets,
        num_frames=cfg.num_frames,
        decode=DecodeConfig(
            grid_lower=(lower[0], lower[1]),
            cell_size=(cfg.bev_cell[0], cfg.bev_cell[1]),
            tasks=REFERENCE_TASK_DECODING,
            post_center_range=post_center_range_for(cfg.point_cloud_range),
            score_threshold=cfg.score_threshold,
            topk=cfg.topk,
            pre_max_size=cfg.pre_max_size,
            post_max_size=cfg.post_max_size,
        ),
        channels_last=cfg.channels_last,
    )
