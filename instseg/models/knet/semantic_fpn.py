"""K-Net's semantic-FPN features: the FPN levels fused into one map that every kernel convolves.

Reference (ZwwWayne/K-Net @ 5e50ee5): knet/det/semantic_fpn_wrapper.py (``SemanticFPNWrapper``) as
configs/det/_base_/models/knet_s3_r50_fpn.py L33-48 builds it: levels P2-P5 (start_level 0,
end_level 3), 3x3 conv + GN(32) + ReLU blocks, a sine positional encoding (num_feats = C/2,
normalised) added to the top level, the levels summed (fuse_by_cat False), then two 1x1 conv + GN +
ReLU outputs (``conv_pred`` and one ``aux_convs``): the localisation and the semantic features.
With upsample_times=2 the reference fuses at stride 8 (P2 goes down through one stride-2 conv), i.e.
``fuse_level=1`` here; ``fuse_level=0`` is Panoptic FPN's stride-4 fusion.
"""
from typing import List, Optional, Sequence, Tuple

from mmcv.cnn import ConvModule
from mmdet.models.layers import SinePositionalEncoding
from mmengine.model import BaseModule, normal_init
from torch import Tensor, nn

from instseg.registry import MODELS


@MODELS.register_module()
class KNetSemanticFPN(BaseModule):
    """Sums FPN levels 0..num_levels-1 at level ``fuse_level``'s resolution; returns
    (localisation features, semantic features), both (B, out_channels, H/s, W/s), s = 4 * 2**fuse_level.

    Level 0 has one conv, of stride 2 when fusing at level 1; level i >= 1 has i convs, the first i - fuse_level each followed by a 2x
    bilinear upsampling, as the reference's layout (its parameter count included).
    """

    def __init__(self, in_channels: int = 256, feat_channels: int = 256, out_channels: int = 256,
                 num_levels: int = 4, fuse_level: int = 1, positional_encoding: bool = True,
                 norm_cfg: dict = dict(type='GN', num_groups=32, requires_grad=True),
                 conv_init_std: Optional[float] = 0.01, init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.conv_init_std = conv_init_std
        assert fuse_level in (0, 1), 'levels above 1 would have to go down, which the layout has no convs for'
        self.fuse_level = fuse_level
        # The encoding is added to the top level, so its 2 * num_feats channels must match it.
        self.positional_encoding = (SinePositionalEncoding(num_feats=in_channels // 2, normalize=True)
                                    if positional_encoding else None)

        def conv(cin, stride=1):
            return ConvModule(cin, feat_channels, 3, stride=stride, padding=1, norm_cfg=norm_cfg, inplace=False)

        self.level_convs = nn.ModuleList()
        for level in range(num_levels):
            if level == 0:
                layers = [conv(in_channels, stride=2 if fuse_level else 1)]
            else:
                layers = []
                for j in range(level):
                    layers.append(conv(in_channels if j == 0 else feat_channels))
                    if j < level - fuse_level:
                        layers.append(nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False))
            self.level_convs.append(nn.Sequential(*layers))
        self.loc_out = ConvModule(feat_channels, out_channels, 1, norm_cfg=norm_cfg)
        self.sem_out = ConvModule(feat_channels, out_channels, 1, norm_cfg=norm_cfg)

    def init_weights(self) -> None:
        super().init_weights()  # ConvModule's own: Kaiming, what conv_init_std=None keeps
        if self.conv_init_std is None:
            return
        for m in self.modules():  # the reference's init: every conv N(0, 0.01)
            if isinstance(m, nn.Conv2d):
                normal_init(m, std=self.conv_init_std)

    def forward(self, feats: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        levels: List[Tensor] = list(feats[:len(self.level_convs)])
        if self.positional_encoding is not None:
            # No padding mask, as the reference: the encoding spans the whole padded map.
            levels[-1] = levels[-1] + self.positional_encoding(None, levels[-1])
        fused = sum(convs(x) for convs, x in zip(self.level_convs, levels))
        return self.loc_out(fused), self.sem_out(fused)
