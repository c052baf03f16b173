"""The optimizer's per-parameter settings (``schedule.paramwise_cfg``), built by mmengine."""
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from instseg.errors import ConfigError
from instseg.registry import OPTIM_WRAPPER_CONSTRUCTORS


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class CheckedOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor, except that a ``custom_keys`` entry matching no parameter name
    is refused: mmengine would train that part at the base lr without a word (e.g. ``backbon``)."""

    def __call__(self, model: nn.Module):
        names = [name for name, _ in model.named_parameters()]
        for key in self.paramwise_cfg.get('custom_keys', {}):
            if not any(key in name for name in names):
                parts = sorted({name.split('.')[1 if name.startswith('module.') else 0] for name in names})
                raise ConfigError(f"schedule.paramwise_cfg.custom_keys.{key}: matches no parameter of the "
                                  f"model (a part of a parameter's name, e.g. one of: {', '.join(parts)})")
        return super().__call__(model)
