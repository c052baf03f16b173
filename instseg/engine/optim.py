"""The optimizer's per-parameter settings (``schedule.paramwise_cfg``), built by mmengine."""
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from instseg.errors import ConfigError
from instseg.registry import OPTIM_WRAPPER_CONSTRUCTORS


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class CheckedOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor, except that a ``custom_keys`` entry matching no parameter name
    is refused: mmengine would train that part at the base lr without a word (e.g. ``backbon``), and
    that parameters with the same settings share one group (``merge_param_groups``)."""

    def __call__(self, model: nn.Module):
        names = [name for name, _ in model.named_parameters()]
        for key in self.paramwise_cfg.get('custom_keys', {}):
            if not any(key in name for name in names):
                parts = sorted({name.split('.')[1 if name.startswith('module.') else 0] for name in names})
                raise ConfigError(f"schedule.paramwise_cfg.custom_keys.{key}: matches no parameter of the "
                                  f"model (a part of a parameter's name, e.g. one of: {', '.join(parts)})")
        wrapper = super().__call__(model)
        merge_param_groups(wrapper.optimizer)
        return wrapper


def _settings(group: dict) -> tuple:
    return tuple(sorted((key, repr(value)) for key, value in group.items() if key != 'params'))


def _merged_indices(groups: list) -> list:
    """Indices of ``groups`` by their settings (all but ``params``), in order of first appearance."""
    merged = {}
    for index, group in enumerate(groups):
        merged.setdefault(_settings(group), []).append(index)
    return list(merged.values())


def _merged_groups(groups: list, merged_indices: list) -> list:
    """Each merged group: the settings of its first group, the parameters of all, in their order."""
    return [{**groups[indices[0]], 'params': [p for i in indices for p in groups[i]['params']]}
            for indices in merged_indices]


def merge_param_groups(optimizer) -> None:
    """One group per distinct setting instead of mmengine's one group per parameter: the same update,
    but AdamW's fused kernel and the step's Python run once a group (K-Net's CPU fit: 244 groups -> 2,
    10 -> 5 ms a step). Parameters keep their order, so the flat state a checkpoint indexes is alike."""
    groups = optimizer.param_groups
    optimizer.param_groups = []
    for group in _merged_groups(groups, _merged_indices(groups)):
        optimizer.add_param_group(group)


def merge_saved_param_groups(checkpoint: dict, live_groups: int) -> bool:
    """Turns a checkpoint saved with one optimizer group per parameter (before ``merge_param_groups``)
    into the merged layout, so that such runs still resume: its groups merged as the live ones are,
    and its LR schedulers' per-group values (``base_values``, ``_last_value``; the optimizer wrapper's
    base settings follow the groups there) taken once a group.
    Returns whether it changed anything."""
    saved = (checkpoint.get('optimizer') or {}).get('param_groups')
    if not saved or len(saved) <= live_groups:
        return False
    merged = _merged_indices(saved)
    if len(merged) != live_groups:
        return False  # another model or optimizer: torch's load refuses it
    checkpoint['optimizer']['param_groups'] = _merged_groups(saved, merged)
    for scheduler in checkpoint.get('param_schedulers') or []:
        for key in ('base_values', '_last_value'):
            values = scheduler.get(key)
            if isinstance(values, list) and len(values) >= len(saved):  # + mmengine's base settings (base_lr)
                scheduler[key] = [values[indices[0]] for indices in merged] + values[len(saved):]
    return True
