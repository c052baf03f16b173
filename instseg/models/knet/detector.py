"""K-Net (Zhang et al., NeurIPS 2021) for instance segmentation: a box-free detector in mmdet 3.x idiom.

Reference (ZwwWayne/K-Net @ 5e50ee5): knet/det/knet.py (``KNet``): backbone + FPN, the RPN-like
kernel stage (``rpn_head``, kernel_head.py) and the iterative update stages (``roi_head``,
kernel_iter_head.py); GT masks padded to the batch and bilinearly resized to 1/mask_stride
(mask_assign_stride 4, L46-93: soft targets, no binarisation). Boxes, which K-Net does not predict,
come from the binary masks (mmdet's mask2bbox), so the bbox metric can be computed too.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from mmdet.models.detectors.base import BaseDetector
from mmdet.structures import SampleList
from mmengine.structures import InstanceData
from torch import Tensor

from instseg.registry import MODELS


@MODELS.register_module()
class KNet(BaseDetector):

    def __init__(self, backbone: dict, neck: dict, rpn_head: dict, roi_head: dict, mask_stride: int = 4,
                 train_cfg=None, test_cfg=None, data_preprocessor=None, init_cfg=None) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.backbone = MODELS.build(backbone)
        self.neck = MODELS.build(neck)
        train_cfg = train_cfg or {}
        self.rpn_head = MODELS.build({**rpn_head, 'train_cfg': train_cfg.get('rpn')})
        self.roi_head = MODELS.build({**roi_head, 'train_cfg': train_cfg.get('rcnn'), 'test_cfg': test_cfg})
        self.mask_stride = mask_stride
        # The first update stage is matched on the RPN-like stage's masks, as that stage itself: with one
        # assigner for both (the reference's), that stage's matching is handed on, not computed twice.
        self.share_rpn_matching = train_cfg.get('rpn') is not None and train_cfg.get('rpn') == train_cfg.get('rcnn')

    def extract_feat(self, batch_inputs: Tensor) -> Tuple[Tensor, ...]:
        return self.neck(self.backbone(batch_inputs))

    def loss(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> Dict[str, Tensor]:
        gts = [self._mask_targets(sample, batch_inputs.device) for sample in batch_data_samples]
        (kernels, features, mask_logits, matches), losses = self.rpn_head.loss(self.extract_feat(batch_inputs), gts)
        losses.update(self.roi_head.loss(features, kernels, mask_logits, gts,
                                         first_matches=matches if self.share_rpn_matching else None))
        return losses

    def predict(self, batch_inputs: Tensor, batch_data_samples: SampleList, rescale: bool = True) -> SampleList:
        kernels, features, mask_logits, _ = self.rpn_head(self.extract_feat(batch_inputs))
        metas = [sample.metainfo for sample in batch_data_samples]
        results = self.roi_head.predict(features, kernels, mask_logits, metas, rescale=rescale)
        return self.add_pred_to_datasample(batch_data_samples, results)

    def _forward(self, batch_inputs: Tensor, batch_data_samples: SampleList = None) -> List[Tuple[Tensor, Tensor]]:
        """(class logits, mask logits) of every update stage."""
        kernels, features, mask_logits, _ = self.rpn_head(self.extract_feat(batch_inputs))
        return self.roi_head(features, kernels, mask_logits)

    def _mask_targets(self, sample, device) -> InstanceData:
        """GT labels and float masks of the padded batch input at 1/mask_stride (bilinear, so soft)."""
        pad_h, pad_w = sample.metainfo['batch_input_shape']
        size = (pad_h // self.mask_stride, pad_w // self.mask_stride)
        gt = sample.gt_instances
        masks = gt.masks.to_tensor(torch.float32, device)
        if len(masks) == 0:
            masks = masks.new_zeros((0, *size))
        else:  # the data preprocessor pads masks when training; padded here too for direct callers
            masks = F.pad(masks, (0, pad_w - masks.shape[-1], 0, pad_h - masks.shape[-2]))
            masks = F.interpolate(masks[None], size=size, mode='bilinear', align_corners=False)[0]
        return InstanceData(labels=gt.labels.to(device), masks=masks)
