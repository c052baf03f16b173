"""BlendMask's mask head: the basis module and the blender, fed by the detector head's instances.

Training blends one mask per positive location of the detector head (its attentions, inside its
assigned ground-truth box); inference blends one per detection (inside the predicted box) and pastes
it into the image. References: AdelaiDet adet/modeling/blendmask/{blendmask.py, blender.py} with
adet/config/defaults.py (BLENDMASK.*: ATTN_SIZE 14, BOTTOM_RESOLUTION 56, POOLER_SCALES (0.25,),
POOLER_SAMPLING_RATIO 1, POOLER_TYPE ROIAlignV2, INSTANCE_LOSS_WEIGHT 1.0); the paste is mmdet's
(FCNMaskHead's _do_paste_mask), as detectron2's paste_masks_in_image in AdelaiDet.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmdet.models.dense_heads.base_mask_head import BaseMaskHead
from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask
from mmdet.utils import reduce_mean
from mmengine.structures import InstanceData
from torch import Tensor

from instseg.models.blendmask.blender import blend, blend_loss, crop_bases, crop_mask_targets
from instseg.registry import MODELS

PASTE_CHUNK = 64  # masks pasted at once: bounds the (N, H, W) float buffer on large images


@MODELS.register_module()
class BlendMaskHead(BaseMaskHead):
    """Args:
        basis_module: config of the bottom module (BlendMaskBasisModule).
        attention_size: M, the side of each instance's attention maps.
        bottom_resolution: R, the side of the blended masks.
        bases_stride: the bases' stride in input pixels (P3's 8, upsampled x2).
        sampling_ratio: bilinear samples per RoI bin and side when cropping the bases.
        loss_weight: weight of the mask loss (INSTANCE_LOSS_WEIGHT).
    """

    def __init__(self, basis_module: dict, attention_size: int = 14, bottom_resolution: int = 56,
                 bases_stride: int = 4, sampling_ratio: int = 1, loss_weight: float = 1.0,
                 train_cfg=None, test_cfg=None, init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.basis_module = MODELS.build(basis_module)
        self.attention_size = attention_size
        self.resolution = bottom_resolution
        self.bases_stride = bases_stride
        self.sampling_ratio = sampling_ratio
        self.loss_weight = loss_weight
        self.test_cfg = test_cfg

    def forward(self, x: Tuple[Tensor], instances: Optional[List[InstanceData]] = None) -> tuple:
        """Bases (B, K, H/4, W/4) and, while training with the semantic loss, semantic logits.
        ``instances`` (positives or detections) are used by loss_by_feat / predict_by_feat."""
        return self.basis_module(x)

    def blend_masks(self, bases: Tensor, boxes: List[Tensor], attentions: Tensor,
                    box_index: Optional[Tensor] = None) -> Tensor:
        """Mask logits (N, R, R): the bases cropped in each image's boxes, optionally picked by
        ``box_index`` (into the concatenated boxes), blended with the N attentions."""
        crops = crop_bases(bases, boxes, self.resolution, self.bases_stride, self.sampling_ratio)
        return blend(crops if box_index is None else crops[box_index], attentions, self.attention_size)

    # ------------------------------------------------------------------ training
    def loss_by_feat(self, bases: Tensor, semantic_logits: Optional[Tensor], batch_gt_instances: List[InstanceData],
                     batch_img_metas: List[dict], positive_infos: List[InstanceData], **kwargs) -> dict:
        gt_boxes = [gt.bboxes for gt in batch_gt_instances]
        # Positives index their image's ground truth; shift to the batch's concatenation.
        offsets = torch.tensor([0] + [len(b) for b in gt_boxes[:-1]], device=bases.device).cumsum(0)
        gt_index = torch.cat([info.pos_assigned_gt_inds + offset for info, offset in zip(positive_infos, offsets)])
        attentions = torch.cat([info.attentions for info in positive_infos])
        weights = torch.cat([info.centerness_targets for info in positive_infos])
        if len(gt_index) == 0:  # keep every branch in the graph (AdelaiDet: zero loss)
            loss_mask = bases.sum() * 0 + attentions.sum() * 0
        else:
            # Crop once per ground truth and share it among its positives, like AdelaiDet.
            logits = self.blend_masks(bases, gt_boxes, attentions, gt_index)
            targets = torch.cat([crop_mask_targets(gt.masks, gt.bboxes, self.resolution)
                                 for gt in batch_gt_instances])[gt_index]
            avg_factor = max(reduce_mean(weights.sum().detach()).item(), 1e-6)  # AdelaiDet's loss_denorm
            loss_mask = blend_loss(logits, targets, weights, avg_factor)
        losses = dict(loss_mask=loss_mask * self.loss_weight)
        if semantic_logits is not None:
            targets = semantic_targets(batch_gt_instances, semantic_logits.shape[-2:])
            losses['loss_semantic'] = self.basis_module.semantic_loss_weight * F.cross_entropy(semantic_logits, targets)
        return losses

    # ------------------------------------------------------------------ inference
    def predict_by_feat(self, bases: Tensor, semantic_logits: Optional[Tensor], batch_img_metas: List[dict],
                        rescale: bool = True, results_list: List[InstanceData] = None, **kwargs) -> List[InstanceData]:
        """Adds ``masks`` (bool, N x H x W at the original size when ``rescale``, else the input's)."""
        attentions = torch.cat([results.attentions for results in results_list])
        probs = self.blend_masks(bases, [results.bboxes for results in results_list], attentions).sigmoid()
        for results, img_probs, img_meta in zip(results_list, probs.split([len(r) for r in results_list]),
                                                batch_img_metas):
            del results.attentions
            if rescale:  # boxes and masks back to the original image
                results.bboxes = results.bboxes / results.bboxes.new_tensor(img_meta['scale_factor']).repeat(2)
            height, width = img_meta['ori_shape' if rescale else 'img_shape'][:2]
            results.masks = paste_masks(img_probs, results.bboxes, height, width, self.test_cfg['mask_thr'])
        return results_list


def paste_masks(probs: Tensor, boxes: Tensor, height: int, width: int, threshold: float) -> Tensor:
    """R x R mask probabilities (N, R, R) resampled into their boxes of an image: bool (N, H, W)."""
    masks = probs.new_zeros((len(probs), height, width), dtype=torch.bool)
    for start in range(0, len(probs), PASTE_CHUNK):
        chunk = slice(start, start + PASTE_CHUNK)
        pasted, _ = _do_paste_mask(probs[chunk, None], boxes[chunk], height, width, skip_empty=False)
        masks[chunk] = pasted >= threshold
    return masks


def semantic_targets(batch_gt_instances: List[InstanceData], size) -> Tensor:
    """Per-pixel class maps (B, h, w): 0 background, label + 1 inside an instance (the later
    instance where they overlap, as AdelaiDet's prepare_thing_sem_from_instance.py paints them),
    nearest-downsampled from the padded input to the semantic logits' size."""
    maps = []
    for gt in batch_gt_instances:
        masks = gt.masks.to_tensor(dtype=torch.bool, device=gt.labels.device)
        if len(masks):
            order = torch.arange(1, len(masks) + 1, device=masks.device)[:, None, None]
            last = (masks * order).amax(dim=0)  # the last instance covering each pixel (1-based), 0: none
            maps.append(torch.cat([gt.labels.new_zeros(1), gt.labels + 1])[last])  # (argmax: 6x slower)
        else:
            maps.append(masks.new_zeros(masks.shape[-2:], dtype=torch.long))
    maps = torch.stack(maps)[:, None].float()
    return F.interpolate(maps, size=tuple(size), mode='nearest')[:, 0].long()
