"""BlendMask's bottom module: K bases at 1/4 of the input from the FPN's P3-P5 (paper sec. 3.2).

Reference: AdelaiDet adet/modeling/blendmask/basis_module.py (ProtoNet) with its defaults in
adet/config/defaults.py (BASIS_MODULE.*): each level refined by a 3x3 conv, summed at P3's size,
a tower of 3x3 convs, x2 bilinear upsampling, a 3x3 conv and a 1x1 conv to K bases; optionally an
auxiliary semantic head on P3 (LOSS_ON), trained on a per-pixel map of the instances' classes.
"""
from typing import Optional, Tuple

import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule
from torch import Tensor

from instseg.registry import MODELS


@MODELS.register_module()
class BlendMaskBasisModule(BaseModule):
    """Args:
        in_channels: FPN width.
        num_levels: FPN levels used, from the first (P3): AdelaiDet's IN_FEATURES p3-p5.
        channels: width of the refine convs and the tower (CONVS_DIM).
        num_convs: 3x3 convs before the upsampling (NUM_CONVS).
        num_bases: K (NUM_BASES).
        norm_cfg: normalisation after each conv (NORM; AdelaiDet uses SyncBN).
        semantic_loss: ``dict(num_classes=C, loss_weight=w)`` adds the auxiliary semantic head on
            the first level (C thing classes plus background); None turns it off.
    """

    def __init__(self, in_channels: int, num_levels: int = 3, channels: int = 128, num_convs: int = 3,
                 num_bases: int = 4, norm_cfg: dict = dict(type='BN', requires_grad=True),
                 semantic_loss: Optional[dict] = None, init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.num_bases = num_bases

        def conv(in_ch):
            return ConvModule(in_ch, channels, 3, padding=1, norm_cfg=norm_cfg)

        self.refine = nn.ModuleList(conv(in_channels) for _ in range(num_levels))
        self.tower = nn.Sequential(
            *(conv(channels) for _ in range(num_convs)),
            nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False),
            conv(channels),
            nn.Conv2d(channels, num_bases, 1))
        self.semantic_loss_weight = semantic_loss['loss_weight'] if semantic_loss else 0.0
        self.semantic_head = None
        if semantic_loss:
            self.semantic_head = nn.Sequential(
                conv(in_channels), conv(channels), nn.Conv2d(channels, semantic_loss['num_classes'] + 1, 1))

    def init_weights(self) -> None:
        super().init_weights()
        # AdelaiDet's conv_with_kaiming_uniform (Caffe2's XavierFill) for the bases' convs.
        for module in [*self.refine.modules(), *self.tower.modules()]:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, feats: Tuple[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """FPN features (first = P3) -> bases (B, K, 2 H3, 2 W3) and, while training with the
        semantic loss on, semantic logits at P3's size (B, C + 1, H3, W3); else None."""
        fused = self.refine[0](feats[0])
        for refine, feat in zip(self.refine[1:], feats[1:]):
            fused = fused + F.interpolate(refine(feat), fused.shape[-2:], mode='bilinear', align_corners=False)
        bases = self.tower(fused)
        semantic_logits = None
        if self.training and self.semantic_head is not None:
            semantic_logits = self.semantic_head(feats[0])
        return bases, semantic_logits
