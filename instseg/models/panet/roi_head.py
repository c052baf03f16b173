"""PANet's RoI head: adaptive feature pooling (Liu et al., CVPR 2018, Sec. 3.2).

Reference (ShuLiu1993/PANet @ f055f71, lib/modeling/model_builder.py, `roi_feature_transform`):
with ``panet=True`` L274-277 pool the *same* RoIs on every level k_min..k_max (FPN.ROI_MIN_LEVEL=2
to ROI_MAX_LEVEL=5, strides 4-32; lib/core/config.py L705-707) and L307-308 return the list of
per-level features instead of FPN's one-level-per-RoI assignment. The heads fuse the list (see
bbox_head.py, mask_head.py). Here the extractor stays mmdet's SingleRoIExtractor; only its RoI layers
are used, one per level.
"""
from typing import List, Optional, Tuple

from mmdet.models.roi_heads import StandardRoIHead
from mmdet.utils import ConfigType, OptConfigType, OptMultiConfig
from torch import Tensor

from instseg.registry import MODELS


@MODELS.register_module()
class PANetRoIHead(StandardRoIHead):
    """StandardRoIHead that pools every RoI from all levels and hands the heads the list.

    ``adaptive_pooling=True`` builds the heads with ``num_levels`` = the extractor's level count;
    ``False`` is StandardRoIHead exactly (heads must then have ``num_levels=1``, their default).
    """

    def __init__(self,
                 bbox_roi_extractor: OptMultiConfig = None,
                 bbox_head: OptMultiConfig = None,
                 mask_roi_extractor: OptMultiConfig = None,
                 mask_head: OptMultiConfig = None,
                 shared_head: OptConfigType = None,
                 train_cfg: OptConfigType = None,
                 test_cfg: OptConfigType = None,
                 init_cfg: OptMultiConfig = None,
                 adaptive_pooling: bool = True) -> None:
        self.adaptive_pooling = adaptive_pooling  # read by init_*_head, which the base __init__ calls
        super().__init__(bbox_roi_extractor, bbox_head, mask_roi_extractor, mask_head,
                         shared_head, train_cfg, test_cfg, init_cfg)

    def _build_head(self, head_cfg: ConfigType, featmap_strides) -> object:
        """Builds a head for this pooling mode; a copy of the config gets ``num_levels``."""
        num_levels = len(featmap_strides) if self.adaptive_pooling else 1
        if self.adaptive_pooling:
            head_cfg = {**head_cfg, 'num_levels': num_levels}
        head = MODELS.build(head_cfg)
        if getattr(head, 'num_levels', 1) != num_levels:
            raise ValueError(f'{type(head).__name__} has num_levels={head.num_levels}, but '
                             f'adaptive_pooling={self.adaptive_pooling} needs {num_levels}')
        return head

    def init_bbox_head(self, bbox_roi_extractor: ConfigType, bbox_head: ConfigType) -> None:
        self.bbox_roi_extractor = MODELS.build(bbox_roi_extractor)
        self.bbox_head = self._build_head(bbox_head, self.bbox_roi_extractor.featmap_strides)

    def init_mask_head(self, mask_roi_extractor: OptConfigType, mask_head: ConfigType) -> None:
        self.share_roi_extractor = mask_roi_extractor is None
        self.mask_roi_extractor = (self.bbox_roi_extractor if self.share_roi_extractor
                                   else MODELS.build(mask_roi_extractor))
        self.mask_head = self._build_head(mask_head, self.mask_roi_extractor.featmap_strides)

    @staticmethod
    def pool_all_levels(extractor, x: Tuple[Tensor], rois: Tensor) -> List[Tensor]:
        """Every RoI pooled from every level the extractor reads: L tensors (n, C, h, w)."""
        feats = x[:extractor.num_inputs]
        rois = rois.type_as(feats[0])  # as SingleRoIExtractor: fp16 features under AMP
        return [roi_layer(level_feats, rois) for roi_layer, level_feats in zip(extractor.roi_layers, feats)]

    def _bbox_forward(self, x: Tuple[Tensor], rois: Tensor) -> dict:
        if not self.adaptive_pooling:
            return super()._bbox_forward(x, rois)
        bbox_feats = self.pool_all_levels(self.bbox_roi_extractor, x, rois)
        if self.with_shared_head:
            bbox_feats = [self.shared_head(feats) for feats in bbox_feats]
        cls_score, bbox_pred = self.bbox_head(bbox_feats)
        return dict(cls_score=cls_score, bbox_pred=bbox_pred, bbox_feats=bbox_feats)

    def _mask_forward(self,
                      x: Tuple[Tensor],
                      rois: Tensor = None,
                      pos_inds: Optional[Tensor] = None,
                      bbox_feats: Optional[List[Tensor]] = None) -> dict:
        if not self.adaptive_pooling:
            return super()._mask_forward(x, rois, pos_inds, bbox_feats)
        assert (rois is not None) ^ (pos_inds is not None and bbox_feats is not None)
        if rois is not None:
            mask_feats = self.pool_all_levels(self.mask_roi_extractor, x, rois)
            if self.with_shared_head:
                mask_feats = [self.shared_head(feats) for feats in mask_feats]
        else:  # shared extractor: the positives' rows of the box branch's per-level features
            mask_feats = [feats[pos_inds.bool()] for feats in bbox_feats]
        mask_preds = self.mask_head(mask_feats)
        return dict(mask_preds=mask_preds, mask_feats=mask_feats)
