"""PANet's box head: adaptive feature pooling's fusion on fc6 (Liu et al., CVPR 2018, Sec. 3.2).

Reference (ShuLiu1993/PANet @ f055f71, lib/modeling/fast_rcnn_heads.py, `roi_2mlp_head_gn_panet`):
L387-394 build one fc1 (= fc6) per FPN level as Linear(+GN)+ReLU, so the ReLU comes *before* the
fusion; L434-438 apply each level's fc1 to that level's pooled RoI and fuse by element-wise
`torch.max`; L439 then the shared fc2 (= fc7). Our heads have no GN (mmdet's Shared2FCBBoxHead has
none either); the ReLU sits where the reference puts it.
"""
from functools import reduce
from typing import List, Sequence, Union

import torch
from mmdet.models.roi_heads.bbox_heads import Shared2FCBBoxHead
from torch import Tensor, nn

from instseg.registry import MODELS


@MODELS.register_module()
class PANetBBoxHead(Shared2FCBBoxHead):
    """Shared2FCBBoxHead whose fc6 is one Linear per pyramid level, fused by element-wise max.

    With ``num_levels=1`` it is Shared2FCBBoxHead unchanged (parameters, state_dict keys, forward).
    With ``num_levels=L>1`` the forward takes the list of L pooled features of the same RoIs (one per
    level); fc6 lives in ``level_fcs`` and ``shared_fcs`` keeps only the fcs after the fusion (fc7).
    """

    def __init__(self, *args, num_levels: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_levels = num_levels
        if num_levels == 1:
            return
        fc6 = self.shared_fcs[0]
        self.level_fcs = nn.ModuleList(
            nn.Linear(fc6.in_features, fc6.out_features) for _ in range(num_levels))
        self.shared_fcs = nn.ModuleList(self.shared_fcs[1:])
        if kwargs.get('init_cfg') is None:  # same init as the fc6 it replaces
            self.init_cfg.append(
                dict(type='Xavier', distribution='uniform', override=dict(name='level_fcs')))

    def fuse_levels(self, level_feats: Sequence[Tensor]) -> Tensor:
        """Each level's own fc6 + ReLU, then the element-wise max over levels: (N, fc_out_channels)."""
        assert len(level_feats) == self.num_levels, (len(level_feats), self.num_levels)
        per_level = [self.relu(fc(self._flatten(feats)))
                     for fc, feats in zip(self.level_fcs, level_feats)]
        return reduce(torch.maximum, per_level)

    def _flatten(self, feats: Tensor) -> Tensor:
        return (self.avg_pool(feats) if self.with_avg_pool else feats).flatten(1)

    def forward(self, x: Union[Tensor, List[Tensor]]) -> tuple:
        if self.num_levels == 1:
            return super().forward(x)
        x = self.fuse_levels(x)
        for fc in self.shared_fcs:  # fc7
            x = self.relu(fc(x))
        # Shared2FC has no cls/reg-specific convs or fcs: the predictors read the shared feature.
        cls_score = self.fc_cls(x) if self.with_cls else None
        bbox_pred = self.fc_reg(x) if self.with_reg else None
        return cls_score, bbox_pred
