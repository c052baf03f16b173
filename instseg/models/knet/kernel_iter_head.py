"""K-Net's iterative stages: S kernel-update heads, each refining the previous stage's kernels and masks.

Reference (ZwwWayne/K-Net @ 5e50ee5): knet/det/kernel_iter_head.py (``KernelIterHead``) as
configs/det/_base_/models/knet_s3_r50_fpn.py L66-139 builds it: 3 stages of equal loss
weight, each matched (mmdet's HungarianAssigner here) on the *previous* stage's predictions
(post_assign False: stage 0 on the RPN-like stage's masks, without class scores), mask logits
upsampled to the GT masks' stride 4 for matching, loss and inference (mask_upsample_stride 2 from
the fused stride 8). Inference (``simple_test`` L233-283, ``rescale_masks``/``get_seg_masks``):
the top max_per_img (class, kernel) pairs by sigmoid score, masks resized to the padded input,
cropped to the image, resized to the original size and thresholded at mask_thr. Three test_cfg options
the reference lacks: ``upsample_logits`` (resize before the sigmoid), ``mask_score`` (class score x
mean mask probability) and ``nms`` (mmdet's ``mask_matrix_nms`` arguments: for one-to-many matching).
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmdet.models.layers import mask_matrix_nms
from mmdet.structures.mask import mask2bbox
from mmengine.model import BaseModule, ModuleList
from mmengine.structures import InstanceData
from torch import Tensor

from instseg.models.knet.losses import Match, match
from instseg.registry import MODELS, TASK_UTILS


def mask_score(probs: Tensor, masks: Tensor) -> Tensor:
    """The mean probability inside each binary mask: how sure the kernel is of its own mask (mmdet's
    Mask2Former scores a query by its class score times this, as SOLOv2's maskness)."""
    inside = masks.flatten(1).float()
    return (probs.flatten(1) * inside).sum(1) / inside.sum(1).clamp(min=1.0)


def _first_per_gt(match: Match) -> Match:
    """The pairs of a matching whose GT has no earlier pair: one per GT (one-to-many matching gives a GT
    several kernels), in the matching's order."""
    pred_inds, gt_inds = match
    order = torch.argsort(gt_inds, stable=True)
    first = torch.ones_like(gt_inds, dtype=torch.bool)
    first[1:] = gt_inds[order][1:] != gt_inds[order][:-1]
    keep = order[first].sort().values
    return pred_inds[keep], gt_inds[keep]


@MODELS.register_module()
class KernelIterHead(BaseModule):
    """``num_stages`` KernelUpdateHeads (``mask_head``: one config for all, or a list of one per stage).

    ``denoising_weight`` > 0 (the reference has none: 0) adds, in training only, one more group of
    kernels per image, one per GT: its first matched kernel of the first stage (one of up to num_copies
    with one-to-many matching: one per pair was 3x the kernels, 25 % of an iteration), grouping features
    under the GT mask itself in the first stage, then under its own masks, its targets fixed (no
    matching), its losses weighted so. As DN-DETR's denoising queries, it gives the class a clean
    target from the first iteration, on features grouped exactly under each object, while the matching
    is still unstable."""

    def __init__(self, mask_head, num_stages: int = 3, stage_loss_weights: Optional[List[float]] = None,
                 denoising_weight: float = 0.0, train_cfg=None, test_cfg=None, init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        heads = mask_head if isinstance(mask_head, (list, tuple)) else [mask_head] * num_stages
        assert len(heads) == num_stages, (len(heads), num_stages)
        self.mask_head = ModuleList(MODELS.build(cfg) for cfg in heads)
        self.stage_loss_weights = list(stage_loss_weights or [1.0] * num_stages)
        self.denoising_weight = denoising_weight
        self.assigner = TASK_UTILS.build(train_cfg['assigner']) if train_cfg else None
        self.test_cfg = test_cfg or {}

    def forward(self, features: Tensor, kernels: Tensor, mask_logits: Tensor) -> List[Tuple[Tensor, Tensor]]:
        """(class logits, mask logits) of every stage, masks at the features' stride."""
        outputs = []
        for head in self.mask_head:
            cls_logits, mask_logits, kernels = head(features, kernels, mask_logits)
            outputs.append((cls_logits, mask_logits))
        return outputs

    def loss(self, features: Tensor, kernels: Tensor, mask_logits: Tensor, gts: List[InstanceData],
             first_matches: Optional[List[Match]] = None) -> Dict[str, Tensor]:
        """``first_matches``: the matching of ``mask_logits`` (no class scores) by this head's assigner,
        when the caller has it already (the RPN-like stage's own)."""
        num_kernels = kernels.shape[1]
        # Each stage is matched on the previous stage's predictions, which it refines; the first on the
        # RPN-like stage's masks, known before any update.
        matches = first_matches
        if matches is None:
            matches = match(self.assigner, mask_logits, None, gts, self.mask_head[0].num_classes)
        padding = attn_mask = None
        if self.denoising_weight > 0:  # the group runs beside the kernels, in its own attention block
            group_kernels, group_logits, group_padding, group_matches = self._denoising_group(
                kernels, matches, gts, mask_logits.shape[-2:])
            kernels, mask_logits = torch.cat([kernels, group_kernels], 1), torch.cat([mask_logits, group_logits], 1)
            padding = torch.cat([group_padding.new_zeros(len(gts), num_kernels), group_padding], 1)
            in_group = torch.arange(kernels.shape[1], device=kernels.device) >= num_kernels
            attn_mask = in_group[:, None] != in_group[None, :]  # True: may not attend
        losses = {}
        for stage, (head, weight) in enumerate(zip(self.mask_head, self.stage_loss_weights)):
            cls_logits, mask_logits, kernels = head(features, kernels, mask_logits, padding, attn_mask)
            if stage > 0:
                matches = match(self.assigner, prev_masks, prev_cls, gts, head.num_classes)
            for name, value in head.loss(cls_logits[:, :num_kernels], mask_logits[:, :num_kernels],
                                         matches, gts).items():
                losses[f's{stage}_{name}'] = value * weight
            if self.denoising_weight > 0:
                for name, value in head.loss(cls_logits[:, num_kernels:], mask_logits[:, num_kernels:],
                                             group_matches, gts).items():
                    losses[f's{stage}_dn_{name}'] = value * weight * self.denoising_weight
            prev_cls, prev_masks = cls_logits[:, :num_kernels].detach(), mask_logits[:, :num_kernels].detach()
        return losses

    @staticmethod
    def _denoising_group(kernels: Tensor, matches: List[Match], gts: List[InstanceData],
                         size: Tuple[int, int]) -> Tuple[Tensor, Tensor, Tensor, List[Match]]:
        """The GT group (see the class) from the kernels (B, N, C) before the first stage and its
        matching: its kernels (B, G, C), its first masks as logits of size ``size`` (positive exactly
        inside each GT mask before resizing), its padding (B, G) and its fixed matching."""
        batch, _, channels = kernels.shape
        matches = [_first_per_gt(m) for m in matches]
        group = max(1, max(len(p) for p, _ in matches))
        group_kernels = kernels.new_zeros(batch, group, channels)
        mask_logits = kernels.new_full((batch, group, *gts[0].masks.shape[-2:]), -10.0)
        padding = torch.ones(batch, group, dtype=torch.bool, device=kernels.device)
        for i, ((p, g), gt) in enumerate(zip(matches, gts)):
            group_kernels[i, :len(p)] = kernels[i, p]
            mask_logits[i, :len(p)] = 20.0 * gt.masks[g] - 10.0  # logits: sigmoid > 0.5 inside
            padding[i, :max(len(p), 1)] = False  # attention needs one key per image
        if mask_logits.shape[-2:] != tuple(size):  # as the first stage resizes every mask it is given
            mask_logits = F.interpolate(mask_logits, size, mode='bilinear', align_corners=False)
        # Kernel j of an image is its j-th matched GT's.
        group_matches = [(torch.arange(len(g), device=kernels.device), g) for _, g in matches]
        return group_kernels, mask_logits, padding, group_matches

    def predict(self, features: Tensor, kernels: Tensor, mask_logits: Tensor, batch_img_metas: List[dict],
                rescale: bool = True) -> List[InstanceData]:
        cls_logits, mask_logits = self(features, kernels, mask_logits)[-1]
        scores = cls_logits.sigmoid()
        results = []
        for img_scores, img_masks, meta in zip(scores, mask_logits, batch_img_metas):
            num_classes = img_scores.shape[-1]
            k = min(self.test_cfg.get('max_per_img', 100), img_scores.numel())
            # One kernel may yield several (class, mask) detections, as the reference's top-k.
            top_scores, top_inds = img_scores.flatten().topk(k)
            kernel_inds, labels = top_inds // num_classes, top_inds % num_classes
            probs = self._masks_at_image_size(img_masks[kernel_inds], meta, rescale,
                                              self.test_cfg.get('upsample_logits', False))
            masks = probs > self.test_cfg.get('mask_thr', 0.5)
            result = InstanceData(scores=top_scores, labels=labels, masks=masks)
            if self.test_cfg.get('mask_score', False):
                result.scores = top_scores * mask_score(probs, masks)
                result = result[result.scores.argsort(descending=True)]  # best first again
            if self.test_cfg.get('nms'):  # one-to-many matching trains duplicates: SOLOv2's matrix NMS
                areas = result.masks.flatten(1).sum(1).float().clamp(min=1.0)  # two empty masks: IoU 0, not 0/0
                scores, _, _, keep = mask_matrix_nms(result.masks, result.labels, result.scores,
                                                     mask_area=areas, **self.test_cfg['nms'])
                result = result[keep]
                result.scores = scores
            result.bboxes = mask2bbox(result.masks)
            results.append(result)
        return results

    @staticmethod
    def _masks_at_image_size(mask_logits: Tensor, meta: dict, rescale: bool, upsample_logits: bool) -> Tensor:
        """Probabilities at the padded input size, cropped to the image, then at the original size
        when ``rescale``. The reference's ``rescale_masks`` takes the sigmoid first; ``upsample_logits``
        resizes the logits and takes it last, as the training losses see them when the targets are
        finer than the logits (mask_stride below the features' stride): a boundary between two logit
        cells then lands where the resized logits cross zero, where those losses put it."""
        h, w = meta['img_shape'][:2]
        maps = mask_logits[None] if upsample_logits else mask_logits[None].sigmoid()
        maps = F.interpolate(maps, size=tuple(meta['batch_input_shape']), mode='bilinear',
                             align_corners=False)[..., :h, :w]
        if rescale:
            maps = F.interpolate(maps, size=tuple(meta['ori_shape'][:2]), mode='bilinear', align_corners=False)
        return maps[0].sigmoid() if upsample_logits else maps[0]
