"""instseg's own detector parts (registered in instseg.registry.MODELS on import) and model building.

Mask R-CNN, Cascade, HTC and CondInst are mmdet's; modules mmdet lacks will live here."""
from omegaconf import DictConfig


def build_model(cfg: DictConfig):
    """Builds the detector of a composed config through the registry (weights not initialised)."""
    from mmengine.registry import init_default_scope

    from instseg.config import to_mmengine
    from instseg.registry import MODELS

    init_default_scope('instseg')
    return MODELS.build(to_mmengine(cfg).model)
