"""PANet (Liu et al., CVPR 2018): adaptive feature pooling and fully-connected fusion as RoI parts.

The bottom-up path augmentation is mmdet's PAFPN neck; these modules are the rest of the paper."""
from instseg.models.panet.bbox_head import PANetBBoxHead
from instseg.models.panet.mask_head import PANetMaskHead
from instseg.models.panet.roi_head import PANetRoIHead

__all__ = ['PANetBBoxHead', 'PANetMaskHead', 'PANetRoIHead']
