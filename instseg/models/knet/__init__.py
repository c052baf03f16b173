"""K-Net (Zhang et al., NeurIPS 2021) for instance segmentation: box-free, N learnable kernels that
segment and classify one instance each, refined over iterative kernel-update stages.

Reference: ZwwWayne/K-Net @ 5e50ee5 (knet/det/, knet/kernel_updator.py). Backbone, FPN, the Hungarian
assigner with its focal and dice costs, and the losses are mmdet's; these modules are the rest."""
from instseg.models.knet.detector import KNet
from instseg.models.knet.kernel_head import ConvKernelHead
from instseg.models.knet.kernel_iter_head import KernelIterHead
from instseg.models.knet.kernel_update_head import KernelUpdateHead, KernelUpdator
from instseg.models.knet.losses import KNetMaskCost
from instseg.models.knet.semantic_fpn import KNetSemanticFPN

__all__ = ['KNet', 'ConvKernelHead', 'KernelIterHead', 'KernelUpdateHead', 'KernelUpdator', 'KNetMaskCost',
           'KNetSemanticFPN']
