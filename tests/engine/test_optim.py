import copy

import pytest
import torch
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


PARAMWISE = 'schedule.paramwise_cfg={custom_keys: {neck: {lr_mult: 0.25}}, norm_decay_mult: 0.0}'


def _per_parameter(model):
    """mmengine's own constructor: one group per parameter."""
    from mmengine.optim import DefaultOptimWrapperConstructor
    wrapper_cfg = to_mmengine(compose('train', [PARAMWISE])).optim_wrapper.to_dict()
    paramwise = wrapper_cfg.pop('paramwise_cfg')
    wrapper_cfg.pop('constructor')
    return DefaultOptimWrapperConstructor(wrapper_cfg, paramwise)(model)


def _grads(model, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


def test_parameters_with_the_same_settings_share_a_group_and_get_the_same_update(one_thread):
    merged_model, model = TwoParts(), TwoParts()
    model.load_state_dict(merged_model.state_dict())
    merged, per_parameter = _optim_wrapper(PARAMWISE, model=merged_model), _per_parameter(model)
    assert len(per_parameter.optimizer.param_groups) == 6
    # conv (lr 2e-3, decay 0.05), norm (decay 0), neck (lr 5e-4)
    assert [len(g['params']) for g in merged.optimizer.param_groups] == [2, 2, 2]
    for step in range(3):
        for m, wrapper in ((merged_model, merged), (model, per_parameter)):
            _grads(m, step)
            wrapper.step()
    for (name, a), b in zip(merged_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_run_saved_with_one_group_per_parameter_resumes_into_the_merged_groups(one_thread):
    from mmengine.optim import CosineAnnealingLR, LinearLR

    from instseg.engine.optim import merge_saved_param_groups

    def schedulers(wrapper):
        return [LinearLR(wrapper, start_factor=0.1, by_epoch=False, begin=0, end=2),
                CosineAnnealingLR(wrapper, T_max=6, by_epoch=False, begin=2, end=8)]

    def train(model, wrapper, scheds, steps):
        for step in steps:
            _grads(model, step)
            wrapper.step()
            for s in scheds:
                s.step()

    saved_model = TwoParts()
    saved = _per_parameter(saved_model)
    saved_schedulers = schedulers(saved)
    train(saved_model, saved, saved_schedulers, range(3))
    checkpoint = copy.deepcopy(  # as saved to a file: not the live tensors
        {'optimizer': saved.state_dict(), 'param_schedulers': [s.state_dict() for s in saved_schedulers]})

    resumed_model = TwoParts()
    resumed_model.load_state_dict(saved_model.state_dict())
    resumed = _optim_wrapper(PARAMWISE, model=resumed_model)
    resumed_schedulers = schedulers(resumed)
    assert merge_saved_param_groups(checkpoint, len(resumed.optimizer.param_groups))
    resumed.load_state_dict(checkpoint['optimizer'])
    for s, state in zip(resumed_schedulers, checkpoint['param_schedulers']):
        s.load_state_dict(state)
    assert [len(g['params']) for g in checkpoint['optimizer']['param_groups']] == [2, 2, 2]
    assert not merge_saved_param_groups(checkpoint, 3)  # already merged

    train(saved_model, saved, saved_schedulers, range(3, 6))
    train(resumed_model, resumed, resumed_schedulers, range(3, 6))
    for (name, a), b in zip(saved_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.optimizer.param_groups[2]['lr'] == param_group_of(saved, saved_model.neck.weight)['lr']
