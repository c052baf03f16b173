"""K-Net's RPN-like stage: N learnable kernels convolve the semantic-FPN features into N initial masks.

Reference (ZwwWayne/K-Net @ 5e50ee5): knet/det/kernel_head.py (``ConvKernelHead``) with
configs/det/_base_/models/knet_s3_r50_fpn.py L23-65: 1x1 kernels (conv_kernel_size 1), one 1x1
conv + GN + ReLU on each of the localisation and semantic features (num_loc_convs, num_seg_convs 1),
no extra refinement (feat_refine False), a per-pixel class branch (``conv_seg``, semantic_fpn True)
trained with a sigmoid focal loss, and kernels handed to the update stages as the learned kernel plus
the sum of the features under its binarised mask (proposal_feats_with_obj, use_binary). Losses:
mask BCE 1, dice 4, per-pixel focal 1; no class loss (the stage has no class branch).
Init (init_weights L173-198): convs N(0, 0.01), conv_seg bias at prior 0.01, kernels N(0, 1).
"""
from typing import Dict, List, Optional, Tuple

import torch
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule, bias_init_with_prob, normal_init
from mmengine.structures import InstanceData
from torch import Tensor, nn

from instseg.models.knet.losses import Match, extent_loss, mask_losses, match, resize_like, semantic_loss
from instseg.registry import MODELS, TASK_UTILS


@MODELS.register_module()
class ConvKernelHead(BaseModule):
    """forward(FPN levels) -> (kernels (B, N, C), features (B, C, h, w), mask logits (B, N, h, w),
    per-pixel class logits (B, num_classes, h, w)), h, w at the semantic FPN's stride."""

    def __init__(self, num_classes: int, semantic_fpn: dict, in_channels: int = 256, num_proposals: int = 100,
                 hard_mask_thr: float = 0.5, norm_cfg: dict = dict(type='GN', num_groups=32, requires_grad=True),
                 kernel_init_std: float = 1.0, conv_init_std: Optional[float] = 0.01,
                 loss_mask: dict = dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
                 loss_dice: dict = dict(type='DiceLoss', loss_weight=4.0),
                 loss_seg: dict = dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
                 loss_extent: Optional[dict] = None, train_cfg=None, init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.num_classes = num_classes
        self.num_proposals = num_proposals
        self.hard_mask_thr = hard_mask_thr
        self.kernel_init_std = kernel_init_std
        self.conv_init_std = conv_init_std
        self.semantic_fpn = MODELS.build(semantic_fpn)
        self.loc_convs = ConvModule(in_channels, in_channels, 1, norm_cfg=norm_cfg)
        self.seg_convs = ConvModule(in_channels, in_channels, 1, norm_cfg=norm_cfg)
        # The N kernels are the weights of one 1x1 conv: the stage's masks are a single conv.
        self.init_kernels = nn.Conv2d(in_channels, num_proposals, 1, bias=False)
        self.conv_seg = nn.Conv2d(in_channels, num_classes, 1)
        self.loss_mask = MODELS.build(loss_mask)
        self.loss_dice = MODELS.build(loss_dice)
        self.loss_seg = MODELS.build(loss_seg)
        # Not the reference's (None there): a training-only 1x1 conv regressing each pixel's object box
        # from the features the kernels group (losses.extent_loss).
        self.conv_extent = nn.Conv2d(in_channels, 4, 1) if loss_extent else None
        self.loss_extent = MODELS.build(loss_extent) if loss_extent else None
        self.assigner = TASK_UTILS.build(train_cfg['assigner']) if train_cfg else None

    def init_weights(self) -> None:
        super().init_weights()
        if self.conv_init_std is not None:  # None keeps ConvModule's Kaiming init
            for conv in (self.loc_convs.conv, self.seg_convs.conv):
                normal_init(conv, std=self.conv_init_std)
        normal_init(self.conv_seg, std=0.01, bias=bias_init_with_prob(0.01))
        normal_init(self.init_kernels, std=self.kernel_init_std)
        if self.conv_extent is not None:  # boxes near 0 at first: no early jolt to the shared features
            normal_init(self.conv_extent, std=0.01)

    def forward(self, feats: List[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        loc_feats, sem_feats = self.semantic_fpn(feats)
        loc_feats, sem_feats = self.loc_convs(loc_feats), self.seg_convs(sem_feats)
        mask_logits = self.init_kernels(loc_feats)
        seg_logits = self.conv_seg(sem_feats)
        features = loc_feats + sem_feats  # what every update stage groups and convolves
        # Each kernel starts as itself plus the features under its hard mask (sum, as the reference).
        hard_masks = (mask_logits.sigmoid() > self.hard_mask_thr).float()
        kernels = self.init_kernels.weight.flatten(1)[None] + torch.einsum('bnhw,bchw->bnc', hard_masks, features)
        return kernels, features, mask_logits, seg_logits

    def loss(self, feats: List[Tensor], gts: List[InstanceData]) -> Tuple[Tuple[Tensor, Tensor, Tensor, List[Match]],
                                                                           Dict[str, Tensor]]:
        """Forward and the stage's losses against GT masks at their size (1/mask_stride); returns the
        (kernels, features, mask logits) the update stages start from, the masks' matching and the losses."""
        kernels, features, mask_logits, seg_logits = self(feats)
        matches = match(self.assigner, mask_logits, None, gts, self.num_classes)
        losses = mask_losses(self.loss_mask, self.loss_dice, mask_logits, matches, gts)
        losses['loss_seg'] = semantic_loss(self.loss_seg, resize_like(seg_logits, gts[0].masks.shape[-2:]),
                                           matches, gts)
        if self.loss_extent is not None:
            losses['loss_extent'] = extent_loss(self.loss_extent, self.conv_extent(features), gts)
        return (kernels, features, mask_logits, matches), {k.replace('loss_', 'loss_rpn_'): v for k, v in losses.items()}
