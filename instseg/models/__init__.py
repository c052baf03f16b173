"""instseg's own detector parts and model building.

Mask R-CNN, Cascade, HTC and CondInst are mmdet's; the modules mmdet lacks live in this package's
subpackages (``panet/``, ``blendmask/``, ``knet/``), each registering in ``instseg.registry.MODELS`` on
import. Every subpackage is imported here, so a new detector needs no edit outside its own folder."""
import importlib
import pkgutil

from omegaconf import DictConfig

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f'{__name__}.{_module.name}')


def build_model(cfg: DictConfig):
    """Builds the detector of a composed config through the registry (weights not initialised)."""
    from mmengine.registry import init_default_scope

    from instseg.config import to_mmengine
    from instseg.registry import MODELS

    init_default_scope('instseg')
    return MODELS.build(to_mmengine(cfg).model)
