"""K-Net's kernel update stage (Zhang et al., NeurIPS 2021, Sec. 3.2): group features under each
kernel's mask, update the kernel with gates, let kernels interact, then predict class and new mask.

Reference (ZwwWayne/K-Net @ 5e50ee5): knet/kernel_updator.py (``KernelUpdator``) and
knet/det/kernel_update_head.py (``KernelUpdateHead``) as configs/det/_base_/models/knet_s3_r50_fpn.py
L71-110 builds them: 1x1 kernels (conv_kernel_size 1), a 1x1 conv feature transform without norm or
activation (feat_transform_cfg), hard masks at 0.5 for grouping (hard_mask_thr), the updator with
feat_channels = in_channels and LN + ReLU, 8-head self-attention + LN, a 2-layer FFN (2048 hidden,
ReLU, dropout 0) + LN, one fc + LN + ReLU before each of the class and mask-kernel predictors
(num_cls_fcs, num_mask_fcs 1). Losses: focal 2 (alpha 0.25, gamma 2), mask BCE 1, dice 4.
Init (init_weights L153-170): xavier-uniform for every weight matrix, class bias at prior 0.01.
Only 1x1 kernels are implemented (the reference's K x K path is unused by its instance configs).
Two options the reference lacks: ``group_grid``, features grouped in a grid over each mask's box
instead of one sum (docs/knet_cpu.md: from scratch, a bag of features learns the class too slowly), and
``box_coords``, each new mask also given every pixel's offset from the centre of the kernel's mask's box.
"""
from typing import Dict, List, Optional, Tuple

import torch
from mmengine.model import BaseModule, bias_init_with_prob
from mmengine.structures import InstanceData
from torch import Tensor, nn

from instseg.models.knet.losses import Match, class_loss, mask_losses
from instseg.registry import MODELS


@MODELS.register_module()
class KernelUpdator(BaseModule):
    """Adaptive kernel update (paper Eq. 4-6; knet/kernel_updator.py): gates computed from the
    group feature F and the kernel K decide, per channel, how much of each goes into the new kernel:
    K' = sigmoid(LN(G_F)) * LN(F_out) + sigmoid(LN(G_K)) * LN(K_out), then fc + LN + ReLU."""

    def __init__(self, in_channels: int = 256, feat_channels: int = 256, out_channels: int = 256,
                 group_channels: Optional[int] = None) -> None:
        super().__init__()
        self.feat_channels = feat_channels
        # from the group feature (group_channels wide where it keeps a layout: KernelUpdateHead.group_grid)
        self.dynamic_layer = nn.Linear(group_channels or in_channels, 2 * feat_channels)
        self.input_layer = nn.Linear(in_channels, 2 * feat_channels)    # from the kernel
        self.input_gate = nn.Linear(feat_channels, feat_channels)
        self.update_gate = nn.Linear(feat_channels, feat_channels)
        self.norm_in, self.norm_out = nn.LayerNorm(feat_channels), nn.LayerNorm(feat_channels)
        self.input_norm_in, self.input_norm_out = nn.LayerNorm(feat_channels), nn.LayerNorm(feat_channels)
        self.fc_layer = nn.Linear(feat_channels, out_channels)
        self.fc_norm = nn.LayerNorm(out_channels)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, group_feats: Tensor, kernels: Tensor) -> Tensor:
        """group_feats (..., group_channels), kernels (..., in_channels) -> updated kernels (..., out_channels)."""
        feat_in, feat_out = self.dynamic_layer(group_feats).split(self.feat_channels, dim=-1)
        kernel_in, kernel_out = self.input_layer(kernels).split(self.feat_channels, dim=-1)
        gate_feats = feat_in * kernel_in  # the gates see both: how well feature and kernel agree
        kernel_gate = self.input_norm_in(self.input_gate(gate_feats)).sigmoid()
        feat_gate = self.norm_in(self.update_gate(gate_feats)).sigmoid()
        updated = feat_gate * self.norm_out(feat_out) + kernel_gate * self.input_norm_out(kernel_out)
        return self.activation(self.fc_norm(self.fc_layer(updated)))


def _span(occupied: Tensor, length: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """Where each mask's box lies along one axis: occupied (B, N, length), True where the mask has a pixel
    in that row (or column) -> the indices (length,), the box's first index and its extent (B, N, 1)."""
    index = torch.arange(length, dtype=dtype, device=occupied.device)
    low = torch.where(occupied, index, float(length)).amin(-1, keepdim=True)
    high = torch.where(occupied, index, -1.0).amax(-1, keepdim=True)
    return index, low, (high - low + 1).clamp(min=1)


def box_offsets(hard_masks: Tensor, limit: float = 2.0) -> Tuple[Tensor, Tensor]:
    """Each pixel's offset from the centre of each mask's box in half box widths (heights), clipped to
    +-``limit``: hard_masks (B, N, h, w) -> (B, N, w) along x, (B, N, h) along y; zeros for an empty mask."""
    inside = hard_masks > 0

    def offsets(occupied: Tensor, length: int) -> Tensor:
        index, low, extent = _span(occupied, length, hard_masks.dtype)
        offset = ((index + 0.5 - low - extent / 2) / (extent / 2)).clamp(-limit, limit)
        return offset * occupied.any(-1, keepdim=True)

    return offsets(inside.any(2), hard_masks.shape[-1]), offsets(inside.any(3), hard_masks.shape[-2])


def grid_group(hard_masks: Tensor, features: Tensor, grid: int) -> Tensor:
    """The features under each mask summed in a ``grid`` x ``grid`` layout over the mask's own box:
    hard_masks (B, N, h, w), features (B, C, h, w) -> (B, N, grid * grid * C). A cell holds the mask's
    pixels whose centres fall in it; an empty mask gives zeros."""
    h, w = hard_masks.shape[-2:]
    inside = hard_masks > 0

    def cells(occupied: Tensor, length: int) -> Tensor:  # (B, N, length) -> one-hot grid row (or column) of each index
        index, low, extent = _span(occupied, length, features.dtype)
        cell = ((index - low + 0.5) / extent * grid).floor().clamp(0, grid - 1)
        return (cell[..., None] == torch.arange(grid, device=features.device)).to(features.dtype)

    # A cell is a grid row times a grid column: sum each image row per column cell, then the rows per row
    # cell (two small contractions instead of one over a (B, N, h, w, grid^2) weight tensor: 2x faster).
    rows, columns = cells(inside.any(3), h), cells(inside.any(2), w)  # (B, N, h, grid), (B, N, w, grid)
    per_row = torch.einsum('bnyxj,bcyx->bnyjc', hard_masks[..., None] * columns[:, :, None], features)
    return torch.einsum('bnyi,bnyjc->bnijc', rows, per_row).flatten(2)


def _fc_ln_relu(channels: int, num: int) -> nn.Sequential:
    layers = []
    for _ in range(num):
        layers += [nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


@MODELS.register_module()
class KernelUpdateHead(BaseModule):
    """One update stage: (features (B, C, h, w), kernels (B, N, C), mask logits (B, N, h', w'))
    -> (class logits (B, N, num_classes), new mask logits (B, N, h, w), new kernels (B, N, C))."""

    def __init__(self, num_classes: int, in_channels: int = 256, num_heads: int = 8,
                 feedforward_channels: int = 2048, num_ffn_fcs: int = 2, num_cls_fcs: int = 1,
                 num_mask_fcs: int = 1, dropout: float = 0.0, hard_mask_thr: float = 0.5,
                 updator_channels: int = 256, group_grid: int = 0, box_coords: bool = False,
                 loss_cls: dict = dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0),
                 loss_mask: dict = dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
                 loss_dice: dict = dict(type='DiceLoss', loss_weight=4.0), init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        assert num_ffn_fcs >= 2
        self.num_classes = num_classes
        self.hard_mask_thr = hard_mask_thr
        # group_grid > 0 (not the reference's: 0) keeps where in the mask each feature lies (see forward)
        self.group_grid = group_grid
        # box_coords (not the reference's: False): each new mask also sees every pixel's offset from the
        # centre of the kernel's previous mask's box, as CondInst's masks see relative coordinates: two
        # objects of one class, alike in their features, are then told apart by where each lies
        self.box_coords = box_coords
        self.feat_transform = nn.Conv2d(in_channels, in_channels, 1)
        self.kernel_updator = KernelUpdator(in_channels, updator_channels, in_channels,
                                            group_channels=in_channels * group_grid ** 2 or None)
        self.attention = nn.MultiheadAttention(in_channels, num_heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(in_channels)
        ffn = [nn.Linear(in_channels, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        for _ in range(num_ffn_fcs - 2):
            ffn += [nn.Linear(feedforward_channels, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        self.ffn = nn.Sequential(*ffn, nn.Linear(feedforward_channels, in_channels), nn.Dropout(dropout))
        self.ffn_norm = nn.LayerNorm(in_channels)
        self.cls_fcs = _fc_ln_relu(in_channels, num_cls_fcs)
        self.fc_cls = nn.Linear(in_channels, num_classes)
        self.mask_fcs = _fc_ln_relu(in_channels, num_mask_fcs)
        # with box_coords, 4 more outputs weigh the offsets x, y and their squares (see forward)
        self.fc_mask = nn.Linear(in_channels, in_channels + 4 * box_coords)
        self.loss_cls = MODELS.build(loss_cls)
        self.loss_mask = MODELS.build(loss_mask)
        self.loss_dice = MODELS.build(loss_dice)

    def init_weights(self) -> None:
        super().init_weights()
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.fc_cls.bias, bias_init_with_prob(0.01))

    def forward(self, features: Tensor, kernels: Tensor, mask_logits: Tensor, padding: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """``padding`` (B, N), True for kernels that fill a batch up: no other kernel attends to them;
        ``attn_mask`` (N, N), True where kernel i may not attend to kernel j (groups kept apart)."""
        features = self.feat_transform(features)
        if mask_logits.shape[-2:] != features.shape[-2:]:
            mask_logits = nn.functional.interpolate(mask_logits, features.shape[-2:], mode='bilinear',
                                                    align_corners=False)
        # Group: sum the features under each kernel's hard mask (no gradient through the grouping).
        hard_masks = (mask_logits.sigmoid() > self.hard_mask_thr).float()
        if self.group_grid:
            # A bag of features forgets the shape, which a backbone trained from scratch learns to put
            # into each pixel's feature only slowly; a grid over the mask's box keeps its layout.
            group_feats = grid_group(hard_masks, features, self.group_grid)
        else:
            group_feats = torch.einsum('bnhw,bchw->bnc', hard_masks, features)
        kernels = self.kernel_updator(group_feats, kernels)
        # Interact: kernels attend to each other, e.g. to suppress duplicates of one instance.
        attended = self.attention(kernels, kernels, kernels, key_padding_mask=padding, attn_mask=attn_mask,
                                  need_weights=False)[0]
        kernels = self.attention_norm(kernels + attended)
        kernels = self.ffn_norm(kernels + self.ffn(kernels))
        cls_logits = self.fc_cls(self.cls_fcs(kernels))
        mask_kernels = self.fc_mask(self.mask_fcs(kernels))
        if self.box_coords:
            mask_kernels, coord_weights = mask_kernels.split([features.shape[1], 4], dim=-1)
        new_mask_logits = torch.einsum('bnc,bchw->bnhw', mask_kernels, features)
        if self.box_coords:  # a quadratic in the offsets, separable: a term along x plus one along y
            along_x, along_y = box_offsets(hard_masks)
            weight_x, weight_y, weight_xx, weight_yy = coord_weights[..., None].unbind(-2)
            along_x = weight_x * along_x + weight_xx * along_x ** 2
            along_y = weight_y * along_y + weight_yy * along_y ** 2
            new_mask_logits = new_mask_logits + along_y[..., :, None] + along_x[..., None, :]
        return cls_logits, new_mask_logits, kernels

    def loss(self, cls_logits: Tensor, mask_logits: Tensor, matches: List[Match],
             gts: List[InstanceData]) -> Dict[str, Tensor]:
        """Focal, BCE and dice losses of one stage; mask logits at the GT masks' size."""
        losses = mask_losses(self.loss_mask, self.loss_dice, mask_logits, matches, gts)
        losses['loss_cls'] = class_loss(self.loss_cls, cls_logits, matches, gts)
        return losses
