"""Composed Hydra config -> mmengine Config: the one place that knows both shapes.

The YAML under configs/ is mmdet-shaped where mmdet has a shape (model, optimizer) and plain
knobs elsewhere (data paths, scale, schedule length, intervals). This module turns the knobs into
mmengine's dataloaders, loops, hooks and schedulers; nothing else in instseg builds those dicts.
"""
from __future__ import annotations

import copy
import difflib
import functools
import inspect
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from instseg.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / 'configs'
# COCO's 12 summary statistics, in pycocotools' order; the keys of metrics.json.
COCO_STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
                   'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')
# data.flip_directions, as mmcv's RandomFlip names them (diagonal: both at once, a 180 degree turn).
FLIP_DIRECTIONS = ('horizontal', 'vertical', 'diagonal')
# Keys of a model file that are instseg's, not mmdet's: dropped before the registry builds the model.
# name: the config option; stage/per_stage: cascade stages written once (see model/cascade_mask_rcnn.yaml);
# semantic: HTC's switch for its semantic branch.
INSTSEG_MODEL_KEYS = ('name', 'stage', 'per_stage', 'semantic')


def cache_dir() -> Path:
    return Path(os.environ.get('INSTSEG_CACHE', Path.home() / '.cache' / 'instseg'))


# ----------------------------------------------------------------------------- resolvers
def _synthetic_root(spec) -> str:
    from instseg.data import synthetic
    return str(synthetic.dataset_dir(cache_dir() / 'data', synthetic_spec(spec)))


def synthetic_spec(spec):
    """``data.synthetic`` as the generator's spec, with a one-line error for unknown fields."""
    from instseg.data import synthetic
    try:
        return synthetic.SyntheticSpec(**OmegaConf.to_container(spec))
    except TypeError as e:
        raise ConfigError(f'data.synthetic: {e}') from None


def _synthetic_classes():
    from instseg.data import synthetic
    return list(synthetic.CLASSES)


def _coco_classes(root, ann) -> list:
    from instseg.data.coco import category_names
    try:
        return category_names(Path(root) / ann)
    except ConfigError as e:
        raise ConfigError(f'data.classes (read from data.root/data.train.ann): {e}') from None


def _coco80():
    from mmdet.datasets import CocoDataset
    return list(CocoDataset.METAINFO['classes'])


def _synthetic_semantic_classes() -> int:
    from instseg.data import synthetic
    return synthetic.SEMANTIC_CLASSES


def _stages(template, per_stage) -> list:
    """One config per stage: ``template`` with, at each leaf of ``per_stage`` (a mapping shaped like
    the template whose leaves are lists with one value per stage), the stage's value."""
    template = OmegaConf.to_container(template, resolve=True)
    per_stage = OmegaConf.to_container(per_stage, resolve=True)
    leaves = list(_leaves(per_stage))
    counts = {len(values) for _, values in leaves}
    if len(counts) != 1:
        raise ConfigError(f'per_stage: every list needs one value per stage; got lengths {sorted(counts)}')
    stages = []
    for i in range(counts.pop()):
        stage = copy.deepcopy(template)
        for path, values in leaves:
            node = stage
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = values[i]
        stages.append(stage)
    return stages


def _leaves(tree: dict, path=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, path + (key,))
        else:
            yield path + (key,), value


def _resnet_channels(depth: int, base_channels: int) -> list:
    """Output widths of a ResNet's four stages (basic blocks below depth 50, bottlenecks above)."""
    expansion = 1 if depth < 50 else 4
    return [base_channels * expansion * 2 ** i for i in range(4)]


def register_resolvers() -> None:
    OmegaConf.register_new_resolver('len', len, replace=True)
    OmegaConf.register_new_resolver('instseg.synthetic_root', _synthetic_root, replace=True)
    OmegaConf.register_new_resolver('instseg.synthetic_classes', _synthetic_classes, replace=True)
    OmegaConf.register_new_resolver('instseg.coco_classes', _coco_classes, replace=True)
    OmegaConf.register_new_resolver('instseg.coco80_classes', _coco80, replace=True)
    OmegaConf.register_new_resolver('instseg.synthetic_semantic_classes', _synthetic_semantic_classes,
                                    replace=True)
    OmegaConf.register_new_resolver('instseg.resnet_channels', _resnet_channels, replace=True)
    OmegaConf.register_new_resolver('instseg.stages', _stages, replace=True)
    OmegaConf.register_new_resolver('instseg.when', lambda on, node: node if on else None, replace=True)
    OmegaConf.register_new_resolver('instseg.dirname', lambda p: str(Path(p).parent), replace=True)


register_resolvers()


# ----------------------------------------------------------------------------- translation
def to_mmengine(cfg: DictConfig, *, mode: str = 'train', checkpoint: str | None = None,
                format_only: bool = False, backbone_weights: str | None = None):
    """Builds the mmengine ``Config`` for ``mode`` ('train' or 'test') from a composed config.
    ``backbone_weights``: the local file of the backbone's ImageNet init (pretrained=true), found by
    ``instseg.engine.pretrained``; without it the init names its URL."""
    from mmengine.config import Config

    from instseg.engine import dist

    c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    check_buildable(c)
    data, schedule, runtime = c['data'], c['schedule'], c['runtime']
    by_epoch = schedule['by_epoch']
    model = {k: v for k, v in c['model'].items() if k not in INSTSEG_MODEL_KEYS}
    _set_backbone_init(model, pretrained=c['pretrained'], weights=backbone_weights)
    work_dir = str(Path(c['work_dir']).resolve())

    eval_split = data['test'] if mode == 'test' else data['val']
    evaluator = dict(type='InstsegCocoMetric', ann_file=os.path.join(data['root'], eval_split['ann']),
                     metric=['bbox', 'segm'], classwise=True, format_only=format_only,
                     outfile_prefix=os.path.join(work_dir, 'results') if mode == 'test' else None,
                     # 'gpu' gathers every rank's predictions through the process group (gloo on
                     # CPUs too); mmengine's 'cpu' needs a directory shared by all nodes.
                     collect_device='gpu')
    launcher = _launcher(c['launcher'])
    dist.check_sync_bn(model, distributed=launcher != 'none')
    mm = dict(
        default_scope='instseg',
        work_dir=work_dir,
        model=model,
        train_dataloader=_dataloader(data, data['train'], schedule, train=True,
                                     semantic=uses_semantic_maps(model)),
        val_dataloader=_dataloader(data, data['val'], schedule, train=False),
        test_dataloader=_dataloader(data, eval_split, schedule, train=False),
        val_evaluator=evaluator,
        test_evaluator=evaluator,
        train_cfg=(dict(type='ResumableEpochBasedTrainLoop', max_epochs=schedule['max_epochs'],
                        val_interval=schedule['val_interval']) if by_epoch else
                   dict(type='ResumableIterBasedTrainLoop', max_iters=schedule['max_iters'],
                        val_interval=schedule['val_interval'])),
        val_cfg=dict(type='ValLoop'),
        test_cfg=dict(type='TestLoop'),
        optim_wrapper=_optim_wrapper(schedule, amp=c['amp']),
        param_scheduler=_param_schedulers(schedule),
        auto_scale_lr=dict(enable=schedule['auto_scale_lr'], base_batch_size=schedule['base_batch_size']),
        default_hooks=dict(
            timer=dict(type='IterTimerHook'),
            logger=dict(type='LoggerHook', interval=runtime['log_interval']),
            param_scheduler=dict(type='ParamSchedulerHook'),
            # mmengine's, written atomically; saves on SIGINT/SIGTERM (instseg.engine.hooks)
            checkpoint=dict(type='SafeCheckpointHook', interval=runtime['checkpoint_interval'],
                            by_epoch=by_epoch, max_keep_ckpts=runtime['max_keep_checkpoints'],
                            save_last=True),
            sampler_seed=dict(type='DistSamplerSeedHook'),
            visualization=dict(type='DetVisualizationHook')),
        custom_hooks=[dict(type='RNGStateHook'), dict(type='MetricsFileHook'), dict(type='NonFiniteLossHook'),
                      # load_from may fine-tune to other classes; a tested checkpoint must fit exactly
                      dict(type='CheckpointMatchHook', partial_load_from=mode == 'train'),
                      dict(type='MergedParamGroupsHook'),  # resumes runs saved before the groups were merged
                      *_ema_hooks(schedule)],
        log_processor=dict(type='LogProcessor', window_size=runtime['log_interval'], by_epoch=by_epoch),
        visualizer=dict(type='DetLocalVisualizer', vis_backends=(
            [dict(type='LocalVisBackend')] + ([dict(type='TensorboardVisBackend')] if runtime['tensorboard'] else []))),
        env_cfg=dict(cudnn_benchmark=runtime['cudnn_benchmark'],
                     mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
                     dist_cfg=dict(backend=dist.backend(), timeout=dist.timeout_s())),
        launcher=launcher,
        model_wrapper_cfg=dist.model_wrapper_cfg(),
        randomness=dict(seed=c['seed'], deterministic=c['deterministic']),
        log_level='INFO',
        resume=bool(c['resume']) and mode == 'train',
        load_from=checkpoint if mode == 'test' else c['load_from'],
    )
    return Config(mm)


def uses_semantic_maps(model: dict) -> bool:
    """Whether the (mmdet-shaped) model trains a semantic branch on per-pixel class maps (HTC's)."""
    return bool((model.get('roi_head') or {}).get('semantic_head'))


def _dataloader(data, split, schedule, *, train: bool, semantic: bool = False) -> dict:
    scale = tuple(data['scale'])  # mmcv's Resize wants a tuple
    load = [dict(type='LoadImageChecked'),
            dict(type='LoadAnnotationsChecked', with_bbox=True, with_mask=True, with_seg=semantic)]
    resize = dict(type='Resize', scale=scale, keep_ratio=True)
    prefix = dict(img=split['img'])
    if train:
        if data.get('cache_decoded'):  # runs saved before the key have none: off
            load = [dict(type='CachedLoading', transforms=load)]
        if data.get('train_scales'):  # multi-scale training: one of the scales per image
            resize = dict(type='RandomChoiceResize', scales=[tuple(s) for s in data['train_scales']],
                          keep_ratio=True)
        if semantic:
            prefix['seg'] = split['seg']
        directions = list(data.get('flip_directions', ['horizontal']))  # runs saved before the key: horizontal
        if not directions or set(directions) - set(FLIP_DIRECTIONS):
            raise ConfigError(f'data.flip_directions: {directions} must name one or more of: '
                              f'{", ".join(FLIP_DIRECTIONS)}')
        # flip_prob is shared out evenly over the directions (mmcv's RandomFlip)
        flip = dict(type='RandomFlip', prob=data['flip_prob'], direction=directions)
        pipeline = load + [resize, flip, dict(type='PackDetInputs')]
    else:  # annotations are loaded after resizing so masks are evaluated at the original size
        pipeline = [load[0], resize, load[1], dict(
            type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
    dataset = dict(type='CocoDataset', data_root=data['root'], ann_file=split['ann'],
                   data_prefix=prefix, metainfo=dict(classes=tuple(data['classes'])),
                   pipeline=pipeline)
    if train:
        dataset['filter_cfg'] = dict(filter_empty_gt=True, min_size=8)
    else:
        dataset['test_mode'] = True
    workers = schedule['num_workers']
    return dict(batch_size=schedule['batch_size'] if train else 1, num_workers=workers,
                persistent_workers=workers > 0, drop_last=False,
                sampler=dict(type='DefaultSampler', shuffle=train),
                batch_sampler=dict(type='ResumableAspectRatioBatchSampler') if train else None,
                dataset=dataset)


# mmengine's DefaultOptimWrapperConstructor reads these and silently ignores any other key
PARAMWISE_KEYS = ('custom_keys', 'bias_lr_mult', 'bias_decay_mult', 'norm_decay_mult', 'dwconv_decay_mult',
                  'flat_decay_mult', 'dcn_offset_lr_mult', 'bypass_duplicate')
CUSTOM_KEY_MULTS = ('lr_mult', 'decay_mult')


def _optim_wrapper(schedule: dict, *, amp: bool) -> dict:
    wrapper = dict(type='AmpOptimWrapper' if amp else 'OptimWrapper',
                   optimizer=_optimizer(schedule['optimizer']), clip_grad=schedule['clip_grad'])
    paramwise = schedule.get('paramwise_cfg')  # runs saved before the key have none
    if paramwise:
        _check_paramwise(paramwise)
        # our constructor: mmengine's, refusing a custom key that names no parameter (instseg.engine.optim)
        wrapper.update(paramwise_cfg=paramwise, constructor='CheckedOptimWrapperConstructor')
    return wrapper


def _check_paramwise(paramwise) -> None:
    where = 'schedule.paramwise_cfg'
    if not isinstance(paramwise, dict):
        raise ConfigError(f'{where}: expected a mapping such as {{custom_keys: {{backbone: {{lr_mult: 0.25}}}}}}, '
                          f'got {paramwise!r}')
    unknown = sorted(set(paramwise) - set(PARAMWISE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; valid keys: {', '.join(PARAMWISE_KEYS)}")
    custom = paramwise.get('custom_keys') or {}
    if not isinstance(custom, dict):
        raise ConfigError(f'{where}.custom_keys: expected a mapping of parameter-name parts to '
                          f'{{lr_mult, decay_mult}}, got {custom!r}')
    for name, mults in custom.items():
        if not isinstance(mults, dict):
            raise ConfigError(f'{where}.custom_keys.{name}: expected a mapping such as {{lr_mult: 0.25}}, got {mults!r}')
        bad = sorted(set(mults) - set(CUSTOM_KEY_MULTS))
        if bad:
            raise ConfigError(f"{where}.custom_keys.{name}: unknown key '{bad[0]}'; valid keys: "
                              f"{', '.join(CUSTOM_KEY_MULTS)}")
        for key, value in mults.items():
            if not _is_number(value):
                raise ConfigError(f'{where}.custom_keys.{name}.{key}: expected a number, got {value!r}')


def _optimizer(optimizer: dict) -> dict:
    """A null removes a key: a recipe that swaps SGD for AdamW writes ``momentum: null``. An argument
    the optimizer does not take (``fused`` or ``momentum`` left from another type) fails here, in one line."""
    optimizer = {k: v for k, v in optimizer.items() if v is not None}
    name = optimizer.get('type')
    if isinstance(name, str) and '.' not in name:  # dotted names are never looked up: mmengine would import them
        from instseg.registry import OPTIMIZERS
        cls = OPTIMIZERS.get(name)  # the class the build will use (instseg's scope, then its parents')
        params = inspect.signature(cls.__init__).parameters if isinstance(cls, type) else {}
        if params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            valid = [arg for arg in params if arg not in ('self', 'params')]
            for key in optimizer:
                if key != 'type' and key not in valid:
                    raise ConfigError(f'schedule.optimizer.{key}: {name} takes no such argument '
                                      f'(valid: {", ".join(valid)}); schedule.optimizer.{key}=null removes it')
    return optimizer


def _ema_hooks(s) -> list:
    """mmengine's EMAHook when ``schedule.ema`` is set: validation, test and the saved ``state_dict`` use
    the averaged weights (the raw ones are kept beside them, for resuming). ExpMomentumEMA (YOLOX's,
    RTMDet's) follows the weights closely early on, its momentum decaying to ``momentum`` over ~gamma steps."""
    ema = s.get('ema')  # runs saved before the key have none
    if not ema:
        return []
    if not isinstance(ema, dict):
        raise ConfigError(f'schedule.ema: expected a mapping such as {{momentum: 0.001}}, got {ema!r}')
    unknown = sorted(set(ema) - {'momentum', 'gamma'})
    if unknown:
        raise ConfigError(f'schedule.ema: unknown key(s) {", ".join(unknown)} (valid: momentum, gamma)')
    momentum, gamma = ema.get('momentum'), ema.get('gamma', 2000)
    if not _is_number(momentum) or not 0 < momentum < 1:
        raise ConfigError(f'schedule.ema.momentum: expected a number in (0, 1), got {momentum!r}')
    if not _is_number(gamma) or gamma <= 0:
        raise ConfigError(f'schedule.ema.gamma: expected a positive number, got {gamma!r}')
    return [dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=momentum, gamma=gamma,
                 update_buffers=True, priority=49)]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # YAML's true is an int to Python


def _param_schedulers(s) -> list:
    by_epoch = s['by_epoch']
    length = s['max_epochs'] if by_epoch else s['max_iters']
    # A run shorter than the warm-up (e.g. schedule.max_iters=50 on the cpu schedule) warms up for
    # its whole length rather than failing.
    warmup = s['warmup_iters'] if by_epoch else min(s['warmup_iters'], length)
    schedulers = []
    if warmup:
        schedulers.append(dict(type='LinearLR', start_factor=s['warmup_ratio'], by_epoch=False,
                               begin=0, end=warmup))
    if s['policy'] == 'step':
        if s['steps']:
            schedulers.append(dict(type='MultiStepLR', by_epoch=by_epoch, begin=0, end=length,
                                   milestones=list(s['steps']), gamma=s['gamma']))
    elif s['policy'] == 'cosine':
        begin = 0 if by_epoch else warmup
        if length > begin:
            schedulers.append(dict(type='CosineAnnealingLR', by_epoch=by_epoch, begin=begin, end=length,
                                   T_max=length - begin, eta_min_ratio=0.01, convert_to_iter_based=by_epoch))
    else:
        raise ConfigError(f"schedule.policy: '{s['policy']}' is not one of: step, cosine")
    return schedulers


def pretrained_backbone(cfg: DictConfig) -> dict | None:
    """With ``pretrained=true``, the backbone's config (mmdet-shaped, resolved) whose ``init_cfg``
    names the ImageNet weights (``checkpoint``: a URL or a local file); ``None`` otherwise."""
    if not cfg.pretrained:
        return None
    backbone = OmegaConf.to_container(cfg.model.backbone, resolve=True) if 'backbone' in cfg.model else {}
    init = backbone.get('init_cfg') or {}
    if init.get('type') != 'Pretrained' or not init.get('checkpoint'):
        raise ConfigError('pretrained=true: model.backbone has no init_cfg {type: Pretrained, checkpoint: URL or '
                          'file}, so nothing would load; name the weights there, or set pretrained=false')
    return backbone


def _set_backbone_init(model: dict, *, pretrained: bool, weights: str | None = None) -> None:
    """pretrained=true keeps the backbone's ImageNet init, reading ``weights`` (the local copy) where
    given. Otherwise the backbone trains from scratch: all stages trainable and BatchNorm statistics
    updated (frozen random BN would never learn)."""
    backbone = model.get('backbone') or {}
    init = backbone.get('init_cfg') or {}
    if init.get('type') != 'Pretrained':
        return
    if pretrained:
        if weights:
            init['checkpoint'] = str(weights)
        return
    backbone.pop('init_cfg')
    backbone.update(frozen_stages=-1, norm_eval=False)


# ----------------------------------------------------------------------------- what may be built
# The registry scopes a config's types come from (instseg's, then its parents').
REGISTRY_SCOPES = ('instseg', 'mmdet', 'mmengine')
# Registered, but eval() one of their arguments: no config may name them.
_EVALUATES_ARGUMENTS = ('CameraMotionCompensation', 'RFSearchHook')


@functools.lru_cache(maxsize=None)
def buildable_types() -> frozenset:
    """The names a config's ``type`` may take: every type registered in instseg's registries and their
    parents (mmdet's, mmengine's, mmcv's layers), and mmcv.ops' layers and functions, which mmcv looks
    up by name itself (``roi_layer``, and ``nms`` types, which ``batched_nms`` eval()s)."""
    import mmcv.ops
    from mmengine.registry import Registry

    from instseg import registry as instseg_registries

    names = set(mmcv.ops.__all__)
    for registry in vars(instseg_registries).values():
        if isinstance(registry, Registry):
            registry.import_from_location()
            while registry is not None:
                names.update(registry.module_dict)
                registry = registry.parent
    return frozenset(names.difference(_EVALUATES_ARGUMENTS))


def check_buildable(cfg) -> None:
    """Refuses, in one line naming the key, anything in a composed config that could import or run
    code rather than build a registered type: mmengine's ``Registry.get`` imports any name it does
    not find (``type: os.system``), mmcv's ``batched_nms`` eval()s its ``type``, ``custom_imports``
    imports modules, ``_scope_`` imports ``<scope>.registry``, and ``_target_`` is Hydra's
    instantiate-anything key. Every ``type`` must be a ``buildable_types()`` name (or a class that
    instseg's code put there)."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    for path, node in mappings({k: v for k, v in tree.items() if k != 'hydra'}):
        where = f'{path}.' if path else ''
        if 'custom_imports' in node:
            raise ConfigError(f'{where}custom_imports: not allowed: a config cannot import modules (instseg, '
                              'mmdet and their parts register when instseg is imported)')
        if '_target_' in node:
            raise ConfigError(f'{where}_target_={node["_target_"]!r}: not allowed: a config builds registered '
                              'types (type: NAME), never a Python path')
        if '_scope_' in node and node['_scope_'] not in REGISTRY_SCOPES:
            raise ConfigError(f'{where}_scope_={node["_scope_"]!r} is not a registry scope '
                              f'({", ".join(REGISTRY_SCOPES)})')
        value = node.get('type')
        if 'type' in node and not isinstance(value, type) and \
                not (isinstance(value, str) and value in buildable_types()):
            close = difflib.get_close_matches(value, buildable_types(), n=1) \
                if isinstance(value, str) and '.' not in value else []
            raise ConfigError(f'{where}type={value!r} is not a registered type (types are looked up in the '
                              'instseg registry; dotted import paths are not allowed)'
                              + (f"; did you mean '{close[0]}'?" if close else ''))


def mappings(tree, path: str = ''):
    """(key path, mapping) for every mapping in a tree of dicts and lists, ``tree`` included."""
    if isinstance(tree, dict):
        yield path, tree
        children = ((f'{path}.{k}' if path else str(k), v) for k, v in tree.items())
    elif isinstance(tree, (list, tuple)):
        children = ((f'{path}[{i}]', v) for i, v in enumerate(tree))
    else:
        return
    for child_path, child in children:
        yield from mappings(child, child_path)


def _launcher(launcher: str) -> str:
    """mmengine's launcher. instseg joins the process group itself (instseg.engine.dist) from
    torchrun's, Slurm's or submitit's variables, so any launch is 'pytorch' to mmengine."""
    from instseg.engine import dist
    world = dist.world_from_environment()
    if launcher == 'none' and world is not None:
        raise ConfigError(f'launcher=none: this process is rank {world.rank} of {world.world_size} '
                          f'({world.launcher}); drop launcher=none or start one process')
    if launcher != 'auto':
        return launcher
    return 'pytorch' if world is not None else 'none'
