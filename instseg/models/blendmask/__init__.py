"""BlendMask (Chen et al., CVPR 2020): FCOS, a basis module, a top layer and a blender.

The detector is mmdet's SingleStageInstanceSegmentor shape (like CondInst); see configs/model/blendmask.yaml."""
from instseg.models.blendmask.basis import BlendMaskBasisModule
from instseg.models.blendmask.detector import BlendMask
from instseg.models.blendmask.head import BlendMaskBboxHead
from instseg.models.blendmask.mask_head import BlendMaskHead

__all__ = ['BlendMask', 'BlendMaskBasisModule', 'BlendMaskBboxHead', 'BlendMaskHead']
