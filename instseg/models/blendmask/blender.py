"""BlendMask's blender (Chen et al., CVPR 2020, sec. 3.3) and its loss, as plain functions.

Each instance's mask is the bases cropped to R x R inside its box, each weighted per pixel by the
instance's K attention maps (M x M, upsampled to R x R, softmax over K) and summed over K.
Reference: AdelaiDet adet/modeling/blendmask/blender.py (Blender.merge_bases and its loss).
"""
from typing import List

import torch
import torch.nn.functional as F
from mmcv.ops import roi_align
from mmdet.structures.bbox import bbox2roi
from torch import Tensor


def crop_bases(bases: Tensor, boxes: List[Tensor], resolution: int, stride: int,
               sampling_ratio: int = 1) -> Tensor:
    """The bases (B, K, H, W) at 1/stride of the input, RoI-aligned to R x R inside each image's
    boxes (input pixels): (sum of boxes, K, R, R), in the images' order.

    ``aligned=True`` (AdelaiDet's ROIAlignV2) samples at pixel centres, so a box edge falls on
    the pixel edge and the crop lines up with the ground-truth crop made the same way."""
    rois = bbox2roi(boxes)
    if len(rois) == 0:
        return bases.new_zeros((0, bases.size(1), resolution, resolution))
    # mmcv's kernel reads the raw buffer: strided views (e.g. expand) must be made contiguous.
    return roi_align(bases.contiguous(), rois, (resolution, resolution), 1.0 / stride, sampling_ratio, 'avg', True)


def blend(base_crops: Tensor, attentions: Tensor, attention_size: int) -> Tensor:
    """Mask logits (N, R, R) from base crops (N, K, R, R) and flat attentions (N, K * M * M)."""
    num, num_bases, height, width = base_crops.shape
    attentions = attentions.reshape(num, num_bases, attention_size, attention_size)
    # The coarse M x M attentions are upsampled to the crop and normalised over the K bases
    # (AdelaiDet: TOP_INTERP 'bilinear', then softmax over dim 1).
    weights = F.interpolate(attentions, (height, width), mode='bilinear', align_corners=False).softmax(dim=1)
    return (base_crops * weights).sum(dim=1)


def blend_loss(mask_logits: Tensor, mask_targets: Tensor, weights: Tensor, avg_factor: float) -> Tensor:
    """Per-pixel binary cross-entropy, averaged within each mask, each mask weighted (AdelaiDet: by
    its location's centerness target) and the sum divided by ``avg_factor`` (the weights' sum)."""
    per_pixel = F.binary_cross_entropy_with_logits(mask_logits, mask_targets.to(mask_logits.dtype),
                                                   reduction='none')
    return (per_pixel.flatten(1).mean(dim=1) * weights).sum() / avg_factor


def crop_mask_targets(gt_masks, gt_boxes: Tensor, resolution: int) -> Tensor:
    """Binary R x R crops (G, R, R) of each ground-truth mask (BitmapMasks/PolygonMasks) in its box,
    made like the base crops (aligned RoIAlign, then >= 0.5)."""
    inds = torch.arange(len(gt_boxes), device=gt_boxes.device)
    crops = gt_masks.crop_and_resize(gt_boxes, (resolution, resolution), inds, device=gt_boxes.device)
    return crops.to_tensor(dtype=torch.float32, device=gt_boxes.device)
