"""BlendMask (Chen et al., CVPR 2020): an FCOS detector whose mask head blends shared bases.

Built as mmdet's CondInst is: a SingleStageInstanceSegmentor whose bbox_head (BlendMaskBboxHead)
hands its positive locations (training) or detections (inference) to the mask_head (BlendMaskHead).
Reference: AdelaiDet adet/modeling/blendmask/blendmask.py.
"""
from mmdet.models.detectors.single_stage_instance_seg import SingleStageInstanceSegmentor

from instseg.registry import MODELS


@MODELS.register_module()
class BlendMask(SingleStageInstanceSegmentor):
    """backbone + neck (P3-P7) + bbox_head (FCOS and the top layer) + mask_head (bases and blender)."""
