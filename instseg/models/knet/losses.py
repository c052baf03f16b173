"""K-Net's matching and the loss pieces mmdet has no module for.

Reference (ZwwWayne/K-Net @ 5e50ee5): knet/det/mask_hungarian_assigner.py (costs and the Hungarian
matching), knet/det/kernel_update_head.py and knet/det/kernel_head.py (`loss`, `_get_target_single`).
The matching itself is mmdet's ``HungarianAssigner`` (scipy's linear_sum_assignment) with mmdet's
``FocalLossCost`` and ``DiceCost``; only the reference's mask cost is new here (``KNetMaskCost``).
The losses are mmdet's FocalLoss, DiceLoss and CrossEntropyLoss; these functions gather their inputs.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmdet.models.task_modules.assigners import AssignResult, HungarianAssigner
from mmdet.models.task_modules.assigners.match_cost import BaseMatchCost
from mmdet.structures.mask import mask2bbox
from mmdet.utils import reduce_mean
from mmengine.structures import InstanceData
from torch import Tensor

from instseg.registry import TASK_UTILS

# (prediction indices, GT indices) of one image's matched pairs.
Match = Tuple[Tensor, Tensor]


@TASK_UTILS.register_module()
class KNetMaskCost(BaseMatchCost):
    """The reference's ``MaskCost`` (mask_hungarian_assigner.py L77-110): minus the mean per-pixel
    agreement of mask probabilities p with (soft) targets t, -(p*t + (1-p)*(1-t)) averaged over pixels.
    Unlike mmdet's ``CrossEntropyLossCost`` (a BCE) it is linear in p and bounded, so one confident
    wrong pixel cannot dominate the dice and class costs."""

    def __init__(self, weight: float = 1.0, pred_act: bool = True) -> None:
        super().__init__(weight=weight)
        self.pred_act = pred_act

    def __call__(self, pred_instances: InstanceData, gt_instances: InstanceData,
                 img_meta: Optional[dict] = None, **kwargs) -> Tensor:
        pred = pred_instances.masks.flatten(1)
        pred = pred.sigmoid() if self.pred_act else pred
        target = gt_instances.masks.flatten(1).float()
        agreement = pred @ target.T + (1 - pred) @ (1 - target).T
        return -agreement / pred.shape[1] * self.weight


@TASK_UTILS.register_module()
class OneToManyHungarianAssigner(HungarianAssigner):
    """mmdet's Hungarian matching with every GT repeated ``num_copies`` times, so that each GT gets up
    to that many predictions (H-DETR's one-to-many matching, Jia et al., CVPR 2023): more positives per
    GT for the class loss while the one-to-one matching is still unstable. Not the reference's; its
    duplicates need a non-maximum suppression at test (``test_cfg.nms``)."""

    def __init__(self, match_costs, num_copies: int = 2) -> None:
        super().__init__(match_costs)
        if num_copies < 1:
            raise ValueError(f'num_copies: expected at least 1, got {num_copies}')
        self.num_copies = num_copies

    def assign(self, pred_instances: InstanceData, gt_instances: InstanceData,
               img_meta: Optional[dict] = None, **kwargs) -> AssignResult:
        num_gts = len(gt_instances)
        copies = torch.arange(num_gts, device=gt_instances.labels.device).repeat(self.num_copies)
        result = super().assign(pred_instances, gt_instances[copies], img_meta)
        positive = result.gt_inds > 0
        result.gt_inds[positive] = copies[result.gt_inds[positive] - 1] + 1
        result.num_gts = num_gts
        return result


def match(assigner, mask_logits: Tensor, cls_logits: Optional[Tensor], gts: List[InstanceData],
          num_classes: int) -> List[Match]:
    """The matching of each image's N predictions to its GTs, one-to-one (or one-to-many with
    ``OneToManyHungarianAssigner``); mask logits at any size: resized to the GT masks', without gradient.

    Without class scores (the RPN-like stage and the first update stage are matched on the RPN's
    masks) the class cost sees zero logits: it is then one constant over the whole cost matrix, so
    the matching is the mask costs' alone, as the reference's assigner, which skips it (L219-222)."""
    if cls_logits is None:
        cls_logits = mask_logits.new_zeros(*mask_logits.shape[:2], num_classes)
    mask_logits = resize_like(mask_logits.detach(), gts[0].masks.shape[-2:])
    matches = []
    for masks, scores, gt in zip(mask_logits, cls_logits.detach(), gts):
        result = assigner.assign(InstanceData(masks=masks, scores=scores), gt)
        pred_inds = torch.nonzero(result.gt_inds > 0).flatten()
        matches.append((pred_inds, result.gt_inds[pred_inds] - 1))
    return matches


def mask_losses(loss_mask, loss_dice, mask_logits: Tensor, matches: List[Match],
                gts: List[InstanceData]) -> Dict[str, Tensor]:
    """BCE and dice on the matched predictions only (kernel_update_head.py L311-345), their logits
    resized to the GT masks' size here: only the matched few of the N kernels pay for the resizing
    and its backward."""
    pred = torch.cat([logits[p] for logits, (p, _) in zip(mask_logits, matches)])
    target = torch.cat([gt.masks[g] for gt, (_, g) in zip(gts, matches)])
    if len(pred) == 0:  # no GT in the batch: zero losses that still reach every parameter
        zero = mask_logits.sum() * 0
        return dict(loss_mask=zero, loss_dice=zero)
    pred = resize_like(pred[None], target.shape[-2:])[0]
    return dict(loss_mask=loss_mask(pred, target), loss_dice=loss_dice(pred, target))


def class_loss(loss_cls, cls_logits: Tensor, matches: List[Match], gts: List[InstanceData]) -> Tensor:
    """Sigmoid focal loss over all N predictions of every image, unmatched ones as background
    (label num_classes), averaged over the matched count (kernel_update_head.py L293-309)."""
    num_classes = cls_logits.shape[-1]
    labels = torch.full(cls_logits.shape[:2], num_classes, dtype=torch.long, device=cls_logits.device)
    for i, ((p, g), gt) in enumerate(zip(matches, gts)):
        labels[i, p] = gt.labels[g]
    # averaged over all GPUs' matched counts, as the reference (reduce_mean), so every GPU weighs alike
    num_pos = reduce_mean(cls_logits.new_tensor(float(sum(len(p) for p, _ in matches))))
    return loss_cls(cls_logits.flatten(0, 1), labels.flatten(), avg_factor=num_pos.clamp(min=1.0).item())


def semantic_loss(loss_seg, seg_logits: Tensor, matches: List[Match], gts: List[InstanceData]) -> Tensor:
    """The RPN-like stage's auxiliary per-pixel class loss (kernel_head.py L403-423, L457-459):
    every pixel a matched GT mask touches gets its class, the rest background; sigmoid focal loss
    averaged over the foreground pixels."""
    batch, num_classes = seg_logits.shape[:2]
    targets = torch.full((batch, *seg_logits.shape[-2:]), num_classes, dtype=torch.long,
                         device=seg_logits.device)
    for i, ((_, g), gt) in enumerate(zip(matches, gts)):
        for mask, label in zip(gt.masks[g], gt.labels[g]):
            targets[i][mask > 0] = label
    num_fg = int((targets < num_classes).sum())
    flat_logits = seg_logits.permute(0, 2, 3, 1).reshape(-1, num_classes)
    return loss_seg(flat_logits, targets.flatten(), avg_factor=max(num_fg, 1))


def extent_targets(gts: List[InstanceData]) -> Tuple[Tensor, Tensor]:
    """Per-pixel distances to the left, top, right and bottom edges of the box of the GT mask the pixel
    lies in (FCOS's regression targets, taken from the mask), as fractions of the masks' width and
    height, (B, 4, h, w) at the GT masks' size; and the foreground (B, h, w), where a GT mask is > 0.5.
    Where masks overlap the later GT wins, as in ``semantic_loss``."""
    h, w = gts[0].masks.shape[-2:]
    device = gts[0].masks.device
    ys = torch.arange(h, dtype=torch.float32, device=device)[:, None].expand(h, w)
    xs = torch.arange(w, dtype=torch.float32, device=device)[None, :].expand(h, w)
    targets = ys.new_zeros(len(gts), 4, h, w)
    foreground = torch.zeros(len(gts), h, w, dtype=torch.bool, device=device)
    for i, gt in enumerate(gts):
        masks = gt.masks > 0.5
        for mask, (left, top, right, bottom) in zip(masks, mask2bbox(masks)):  # an empty mask sets nothing
            edges = torch.stack([(xs - left) / w, (ys - top) / h, (right - xs) / w, (bottom - ys) / h])
            targets[i][:, mask] = edges[:, mask]
            foreground[i] |= mask
    return targets, foreground


def extent_loss(loss_extent, extent: Tensor, gts: List[InstanceData]) -> Tensor:
    """An auxiliary dense loss (not the reference's): every foreground pixel regresses the box of its own
    object (``extent_targets``), so its feature has to tell which object it belongs to, the property the
    kernels' grouping rests on; the reference's semantic loss asks for the class only. Averaged over the
    foreground pixels; zero (reaching the parameters) without any."""
    targets, foreground = extent_targets(gts)
    pred = resize_like(extent, targets.shape[-2:]).permute(0, 2, 3, 1)[foreground]
    if len(pred) == 0:
        return extent.sum() * 0
    return loss_extent(pred, targets.permute(0, 2, 3, 1)[foreground])


def resize_like(mask_logits: Tensor, size) -> Tensor:
    """Mask logits bilinearly resized to the GT masks' size (the reference's x2 upsampling from the
    fused stride 8 to the assignment stride 4; a no-op when the features are already at stride 4)."""
    if tuple(mask_logits.shape[-2:]) == tuple(size):
        return mask_logits
    return F.interpolate(mask_logits, size=tuple(size), mode='bilinear', align_corners=False)
