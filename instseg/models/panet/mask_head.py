"""PANet's mask head: adaptive feature pooling's fusion after the first conv, and fully-connected
fusion (Liu et al., CVPR 2018, Sec. 3.2-3.3).

Reference (ShuLiu1993/PANet @ f055f71, lib/modeling/mask_rcnn_heads.py,
`mask_rcnn_fcn_head_v1upXconvs_gn_adp_ff`, the head of configs/panet/e2e_panet_R-50-FPN_2x_mask.yaml):
- L513-520: one first conv per level, each Conv+GN+ReLU, so the ReLU comes *before* the fusion;
  L587-591: element-wise `torch.max` over levels; L504/L592: two more convs (conv2, conv3).
- L594: the FCN branch is conv4 -> deconv -> ReLU; L527-535: the fc branch is conv4_fc (C) and
  conv5_fc (C/2), both Conv+GN+ReLU, taken from conv3's output, so conv4_fc runs parallel to the last
  FCN conv. L537-539 + L595: the fc reads conv5_fc's map at the RoI size (ROI_XFORM_RESOLUTION**2,
  14x14, no downsampling) and is followed by a ReLU, giving RESOLUTION**2 = 28x28 values.
  We keep the "parallel to the last conv" rule for any num_convs >= 2: the fc branch reads the last
  conv's input (conv3's output with the reference's 4 convs; conv1's with the CPU fit's 2).
- L62-69 (`mask_rcnn_outputs.forward`): the fc output is viewed as (N, 1, 28, 28), repeated over the
  classes and added to the FCN branch's per-class logits (UPSAMPLE_RATIO is 1: nothing after).
- L558-560: Linear weights ~ N(0, 0.01), bias 0.
"""
from functools import reduce
from typing import List, Sequence, Union

import torch
from mmcv.cnn import ConvModule
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from mmengine.model import ModuleList
from torch import Tensor, nn

from instseg.registry import MODELS


@MODELS.register_module()
class PANetMaskHead(FCNMaskHead):
    """FCNMaskHead with PANet's per-level first conv (``num_levels > 1``) and fc fusion (``fc_fusion``).

    With ``num_levels=1, fc_fusion=False`` it is FCNMaskHead unchanged. With ``num_levels=L>1`` the
    forward takes the list of L pooled features of the same RoIs; the first conv lives in
    ``level_convs`` and ``convs`` keeps only the convs after the fusion. The fc-fusion branch reads
    the last conv's input (conv3's output for 4 convs). Loss and predict are FCNMaskHead's: only the
    logits differ.
    """

    def __init__(self, *args, num_levels: int = 1, fc_fusion: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_levels = num_levels
        self.fc_fusion = fc_fusion
        if num_levels > 1:
            assert self.num_convs >= 1, 'adaptive pooling fuses after the first conv'
            self.level_convs = ModuleList(
                self._conv(self.in_channels, self.conv_out_channels) for _ in range(num_levels))
            self.convs = ModuleList(self.convs[1:])
        if fc_fusion:
            assert self.num_convs >= 2, "the fc branch reads the last conv's input: a conv's output"
            fc_channels = self.conv_out_channels // 2
            self.fusion_convs = nn.Sequential(  # conv4_fc, conv5_fc
                self._conv(self.conv_out_channels, self.conv_out_channels),
                self._conv(self.conv_out_channels, fc_channels))
            roi_h, roi_w = self.roi_feat_size
            scale = self.scale_factor or 1
            self.fc_mask_size = (roi_h * scale, roi_w * scale)  # 28x28: the FCN logits' size
            self.fusion_fc = nn.Linear(fc_channels * roi_h * roi_w, self.fc_mask_size[0] * self.fc_mask_size[1])

    def _conv(self, in_channels: int, out_channels: int) -> ConvModule:
        """A conv like FCNMaskHead's own: conv (+norm) + ReLU."""
        return ConvModule(in_channels, out_channels, self.conv_kernel_size,
                          padding=(self.conv_kernel_size - 1) // 2,
                          conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg)

    def init_weights(self) -> None:
        super().init_weights()
        if self.fc_fusion:
            nn.init.normal_(self.fusion_fc.weight, std=0.01)
            nn.init.zeros_(self.fusion_fc.bias)

    def fuse_levels(self, level_feats: Sequence[Tensor]) -> Tensor:
        """Each level's own first conv (+ReLU), then the element-wise max over levels."""
        assert len(level_feats) == self.num_levels, (len(level_feats), self.num_levels)
        return reduce(torch.maximum, [conv(feats) for conv, feats in zip(self.level_convs, level_feats)])

    def fc_mask(self, last_conv_input: Tensor) -> Tensor:
        """The class-agnostic fc-fusion mask logits (N, 1, 28, 28), to broadcast over the classes."""
        fc_out = self.relu(self.fusion_fc(self.fusion_convs(last_conv_input).flatten(1)))
        return fc_out.view(last_conv_input.size(0), 1, *self.fc_mask_size)  # size(0): works for 0 RoIs

    def fcn_logits(self, x: Tensor) -> Tensor:
        """FCNMaskHead's tail: upsample (+ReLU after a deconv) and the per-class 1x1 conv."""
        if self.upsample is not None:
            x = self.upsample(x)
            if self.upsample_method == 'deconv':
                x = self.relu(x)
        return self.conv_logits(x)

    def forward(self, x: Union[Tensor, List[Tensor]]) -> Tensor:
        if self.num_levels > 1:
            x = self.fuse_levels(x)  # the first conv, per level
        for conv in self.convs[:-1]:
            x = conv(x)
        fc_mask = self.fc_mask(x) if self.fc_fusion else None  # parallel to the last conv
        for conv in self.convs[-1:]:  # none left when num_convs == 1 and the levels took the first
            x = conv(x)
        logits = self.fcn_logits(x)
        return logits if fc_mask is None else logits + fc_mask
