import pytest
from conftest import built_optim_wrapper, param_group_of
from torch import nn

from instseg.cli import compose
from instseg.config import to_mmengine
from instseg.errors import ConfigError


class TwoParts(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.neck = nn.Conv2d(4, 4, 1)


def _optim_wrapper(*overrides, model=None):
    return built_optim_wrapper(model or TwoParts(), *overrides)


def _lr_and_decay(wrapper, param):
    group = param_group_of(wrapper, param)
    return group['lr'], group['weight_decay']


def test_without_paramwise_cfg_every_parameter_has_the_base_lr():
    wrapper = _optim_wrapper()
    assert len(wrapper.optimizer.param_groups) == 1 and wrapper.optimizer.param_groups[0]['lr'] == 2e-3


def test_custom_keys_and_norm_decay_reach_the_parameter_groups():
    model = TwoParts()
    wrapper = _optim_wrapper('schedule.paramwise_cfg={custom_keys: {neck: {lr_mult: 0.25}}, norm_decay_mult: 0.0}',
                             model=model)
    conv, norm = model.backbone
    assert _lr_and_decay(wrapper, conv.weight) == (2e-3, 0.05)
    assert _lr_and_decay(wrapper, norm.weight) == _lr_and_decay(wrapper, norm.bias) == (2e-3, 0.0)
    assert _lr_and_decay(wrapper, model.neck.weight) == (pytest.approx(5e-4), 0.05)


@pytest.mark.parametrize('paramwise, message', [
    ('{bias_lr: 2}', "schedule.paramwise_cfg: unknown key 'bias_lr'; valid keys: custom_keys,"),
    ('{custom_keys: {backbone: {lr: 0.1}}}',
     "schedule.paramwise_cfg.custom_keys.backbone: unknown key 'lr'; valid keys: lr_mult, decay_mult"),
    ('{custom_keys: {backbone: 0.25}}',
     'schedule.paramwise_cfg.custom_keys.backbone: expected a mapping such as {lr_mult: 0.25}, got 0.25'),
    ('{custom_keys: {backbone: {lr_mult: fast}}}',
     "schedule.paramwise_cfg.custom_keys.backbone.lr_mult: expected a number, got 'fast'"),
])
def test_bad_paramwise_cfg_fails_in_one_line(paramwise, message):
    with pytest.raises(ConfigError) as info:
        to_mmengine(compose('train', [f'schedule.paramwise_cfg={paramwise}']))
    assert message in str(info.value) and '\n' not in str(info.value)


def test_an_argument_the_optimizer_does_not_take_fails_in_one_line():
    cfg = compose('train', ['schedule.optimizer.type=RMSprop'])  # the CPU schedule's AdamW is fused
    with pytest.raises(ConfigError, match=r'^schedule\.optimizer\.fused: RMSprop takes no such argument '
                                          r'\(valid: lr, alpha, eps, .*\); schedule\.optimizer\.fused=null removes it$'):
        to_mmengine(cfg)
    assert 'fused' not in to_mmengine(compose('train', ['schedule.optimizer.type=RMSprop',
                                                        'schedule.optimizer.fused=null'])).optim_wrapper.optimizer
    assert to_mmengine(compose('train', ['schedule.optimizer.type=SGD'])).optim_wrapper.optimizer['fused']


def test_a_custom_key_matching_no_parameter_is_refused():
    with pytest.raises(ConfigError) as info:
        _optim_wrapper('schedule.paramwise_cfg={custom_keys: {bakbone: {lr_mult: 0.25}}}')
    assert str(info.value) == ('schedule.paramwise_cfg.custom_keys.bakbone: matches no parameter of the model '
                               "(a part of a parameter's name, e.g. one of: backbone, neck)")
