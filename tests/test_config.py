"""Composition (Hydra's compose API) and translation to mmengine's config."""
import re

import pytest
from conftest import cpu_schedule_file, shared
from omegaconf import OmegaConf

from instseg.cli import compose, group_options
from instseg.config import to_mmengine
from instseg.data.synthetic import CLASSES


def test_default_composition():
    cfg = compose('train')
    assert cfg.model.name == 'mask_rcnn' and cfg.data.name == 'synthetic'
    assert cfg.model.backbone.depth == 18
    # num_classes is written once (data) and interpolated into every head.
    assert cfg.data.num_classes == len(CLASSES)
    assert cfg.model.roi_head.bbox_head.num_classes == cfg.model.roi_head.mask_head.num_classes == len(CLASSES)
    # the CPU fit (fit=cpu: half-width ResNet, narrow FPN) applies by default
    assert list(cfg.model.neck.in_channels) == [32, 64, 128, 256]
    assert cfg.model.neck.out_channels == 64 == cfg.model.roi_head.mask_head.in_channels
    assert cfg.work_dir.startswith('work_dirs/mask_rcnn_synthetic/')


def test_backbone_group_rewires_the_neck():
    cfg = compose('train', ['model/backbone=r50', 'model.backbone.base_channels=64'])
    assert cfg.model.backbone.depth == 50 and list(cfg.model.neck.in_channels) == [256, 512, 1024, 2048]
    cfg = compose('train', ['model/backbone=r101', 'model.backbone.base_channels=16'])
    assert cfg.model.backbone.depth == 101 and list(cfg.model.neck.in_channels) == [64, 128, 256, 512]
    assert group_options('model/backbone') == ['r101', 'r18', 'r50']


def test_coco_data_reads_classes_from_annotations():
    root = shared('fruit')
    cfg = compose('train', ['data=coco', f'data.root={root}', 'data.train.ann=trainval.json',
                            'data.train.img=images', 'data.val.ann=trainval.json', 'data.val.img=images'])
    assert list(cfg.data.classes) == ['date', 'fig', 'hazelnut']
    assert cfg.model.roi_head.mask_head.num_classes == 3

    cfg = compose('train', ['data=coco', f'data.root={root}', 'data.train.ann=trainval.json',
                            'data.classes=[date, hazelnut]'])
    assert cfg.model.roi_head.bbox_head.num_classes == 2


def test_recipe_matches_mmdet_reference():
    cfg = compose('train', ['experiment=mask_rcnn_r50_fpn_1x_coco'])
    mm = to_mmengine(cfg)
    assert cfg.data.num_classes == 80 and cfg.model.backbone.depth == 50
    assert mm.optim_wrapper.optimizer == dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001)
    assert mm.train_cfg == dict(type='ResumableEpochBasedTrainLoop', max_epochs=12, val_interval=1)
    assert mm.param_scheduler == [
        dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
        dict(type='MultiStepLR', by_epoch=True, begin=0, end=12, milestones=[8, 11], gamma=0.1)]
    assert mm.train_dataloader.batch_size == 2 and cfg.schedule.base_batch_size == 16
    resize = [t for t in mm.train_dataloader.dataset.pipeline if t['type'] == 'Resize'][0]
    assert resize['scale'] == (1333, 800) and resize['keep_ratio'] is True
    assert mm.model.backbone.frozen_stages == 1 and mm.model.backbone.norm_eval is True


def test_translation_of_the_cpu_default():
    cfg = compose('train', ['work_dir=/tmp/x', 'seed=3', 'deterministic=true'])
    mm = to_mmengine(cfg)
    assert mm.default_scope == 'instseg' and mm.work_dir == '/tmp/x'
    assert mm.randomness == dict(seed=3, deterministic=True)
    assert mm.train_cfg == dict(type='ResumableIterBasedTrainLoop', max_iters=cfg.schedule.max_iters,
                                val_interval=cfg.schedule.val_interval)
    assert 'name' not in mm.model
    # from scratch: no pretrained init, every stage trains, BatchNorm learns its statistics
    assert 'init_cfg' not in mm.model.backbone
    assert mm.model.backbone.frozen_stages == -1 and mm.model.backbone.norm_eval is False
    assert mm.val_evaluator.type == 'InstsegCocoMetric' and mm.val_evaluator.metric == ['bbox', 'segm']
    assert mm.train_dataloader.dataset.metainfo.classes == CLASSES
    assert [s['type'] for s in mm.param_scheduler] == ['LinearLR', 'CosineAnnealingLR']


def test_smoke_schedule_and_knobs():
    cfg = compose('train', ['schedule=smoke', 'schedule.max_iters=7', 'runtime.checkpoint_interval=3'])
    mm = to_mmengine(cfg)
    assert mm.train_cfg.max_iters == 7 and mm.train_cfg.val_interval == 7
    assert mm.default_hooks.checkpoint.interval == 3


@pytest.mark.parametrize('overrides, message', [
    (['model=nope'], f"model=nope: no such option; valid choices: {', '.join(group_options('model'))}"),
    (['model/backbone=r34'], 'valid choices: r101, r18, r50'),
    (['schedule.max_iter=3'], "unknown key 'schedule.max_iter'; valid keys of schedule: by_epoch, max_iters"),
    (['model.backbone.norm_cfg={type: GN, num_groups: 16}'],  # a mapping with a key the default's lacks
     "model.backbone.norm_cfg: unknown key 'model.backbone.norm_cfg.num_groups'; valid keys of model.backbone.norm_cfg:"
     " type, requires_grad; to replace the whole mapping: ~model.backbone.norm_cfg '+model.backbone.norm_cfg=...'"),
    (['seed=abc'], "seed: expected an integer, got 'abc'"),
    (['amp=maybe'], "amp: expected a boolean (true/false), got 'maybe'"),
    (['schedule.optimizer.lr=fast'], "schedule.optimizer.lr: expected a number, got 'fast'"),
    (['data=coco'], 'data.classes (read from data.root/data.train.ann): annotation file not found'),
    (['format_only=true'], 'missing value: checkpoint=... is required'),
])
def test_bad_overrides_fail_with_one_line(overrides, message):
    from instseg.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        compose('test' if 'format_only=true' in overrides else 'train', overrides)
    assert message in str(info.value) and '\n' not in str(info.value)


def test_a_mapping_replaced_whole_as_the_error_says():
    cfg = compose('train', ['~model.backbone.norm_cfg', '+model.backbone.norm_cfg={type: GN, num_groups: 16}'])
    assert to_mmengine(cfg).model.backbone.norm_cfg == {'type': 'GN', 'num_groups': 16}


def test_ema_is_a_schedule_option():
    assert not any(h['type'] == 'EMAHook' for h in to_mmengine(compose('train')).custom_hooks)
    hooks = to_mmengine(compose('train', ['schedule.ema={momentum: 0.001}'])).custom_hooks
    assert hooks[-1] == dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=0.001, gamma=2000,
                             update_buffers=True, priority=49)
    from instseg.errors import ConfigError
    for bad, message in [('{momentum: 2}', 'schedule.ema.momentum: expected a number in (0, 1), got 2'),
                         ('{momentum: 0.001, decay: 1}', 'schedule.ema: unknown key(s) decay (valid: momentum, gamma)'),
                         ('0.001', 'schedule.ema: expected a mapping such as {momentum: 0.001}, got 0.001'),
                         ('{momentum: 0.001, gamma: 0}', 'schedule.ema.gamma: expected a positive number, got 0')]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            to_mmengine(compose('train', [f'schedule.ema={bad}']))


def test_a_run_shorter_than_the_warmup_warms_up_throughout():
    mm = to_mmengine(compose('train', ['schedule.max_iters=50']))  # cpu schedule warms up for 100
    assert mm.param_scheduler == [dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50)]
    mm = to_mmengine(compose('train', ['schedule.max_iters=300']))
    assert mm.param_scheduler[1]['begin'] == 100 and mm.param_scheduler[1]['T_max'] == 200


@pytest.mark.parametrize('overrides, fitted', [
    ([], True),
    (['data=coco', 'data.root=ROOT', 'data.train.ann=trainval.json', 'data.scale=[128,128]'], True),
    (['schedule=smoke'], True),
    (['fit=reference'], False),
    (['schedule=1x'], False),
    (['schedule=20e', 'data=coco', 'data.root=ROOT', 'data.train.ann=trainval.json'], False),
    (['schedule=2x', 'fit=cpu'], True),
    (['experiment=mask_rcnn_r50_fpn_1x_coco'], False),
])
def test_cpu_fit_follows_the_budget_not_the_data_set(overrides, fitted):
    """fit=cpu (default) gives every model its CPU fit on any data; paper schedules and recipes give
    the reference network; either can be chosen on the command line."""
    root = str(shared('fruit')) if any('ROOT' in o for o in overrides) else ''
    overrides = [o.replace('ROOT', root) for o in overrides]
    cfg = compose('train', overrides)
    assert (cfg.model.neck.out_channels == 64) is fitted
    assert (cfg.model.roi_head.mask_head.num_convs == 2) is fitted
    if not fitted:  # exactly the model file
        assert cfg.model == compose('train', [*overrides, 'fit=reference']).model


def test_necks_are_a_group_across_detectors():
    assert group_options('model/neck') == ['fpn', 'pafpn']
    assert compose('train', ['model/neck=pafpn']).model.neck.type == 'PAFPN'
    panet = compose('train', ['model=panet'])
    assert panet.model.neck.type == 'PAFPN' and panet.model.neck.out_channels == 64  # fit applies
    assert compose('train', ['model=panet', 'model/neck=fpn']).model.neck.type == 'FPN'
    r50 = compose('train', ['model=cascade_mask_rcnn', 'model/backbone=r50', 'model/neck=pafpn', 'fit=reference'])
    assert r50.model.neck == dict(type='PAFPN', in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5)


def _mm(experiment, *overrides):
    return to_mmengine(compose('train', [f'experiment={experiment}', *overrides]))


SGD_1X = [dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
          dict(type='MultiStepLR', by_epoch=True, begin=0, end=12, milestones=[8, 11], gamma=0.1)]
SGD_20E = [SGD_1X[0], dict(type='MultiStepLR', by_epoch=True, begin=0, end=20, milestones=[16, 19], gamma=0.1)]
SGD_2X = [SGD_1X[0], dict(type='MultiStepLR', by_epoch=True, begin=0, end=24, milestones=[16, 22], gamma=0.1)]


@pytest.mark.parametrize('experiment, model_type, schedulers', [
    ('cascade_mask_rcnn_r50_fpn_1x_coco', 'CascadeRCNN', SGD_1X),
    ('cascade_mask_rcnn_r50_fpn_20e_coco', 'CascadeRCNN', SGD_20E),
    ('htc_r50_fpn_1x_coco', 'HybridTaskCascade', SGD_1X),
    ('htc_without_semantic_r50_fpn_1x_coco', 'HybridTaskCascade', SGD_1X),
    ('htc_r50_fpn_20e_coco', 'HybridTaskCascade', SGD_20E),
    ('panet_r50_fpn_1x_coco', 'MaskRCNN', SGD_1X),
    ('panet_r50_fpn_ms_2x_coco', 'MaskRCNN', SGD_2X),
])
def test_two_stage_recipes_match_their_references(experiment, model_type, schedulers):
    mm = _mm(experiment)
    assert mm.model.type == model_type and mm.model.backbone.depth == 50
    assert mm.model.backbone.frozen_stages == 1 and mm.model.backbone.norm_eval is True
    assert mm.optim_wrapper.optimizer == dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001)
    assert mm.param_scheduler == schedulers
    assert mm.train_dataloader.batch_size == 2 and mm.auto_scale_lr.base_batch_size == 16
    assert mm.model.roi_head.bbox_head if model_type == 'MaskRCNN' else len(mm.model.roi_head.bbox_head) == 3
    train_resize = [t for t in mm.train_dataloader.dataset.pipeline if 'Resize' in t['type']][0]
    test_resize = [t for t in mm.test_dataloader.dataset.pipeline if 'Resize' in t['type']][0]
    if experiment == 'panet_r50_fpn_ms_2x_coco':  # PANet's e2e_panet_R-50-FPN_2x_mask.yaml
        assert train_resize == dict(type='RandomChoiceResize', keep_ratio=True, scales=[
            (1400, 1200), (1400, 1200), (1400, 1000), (1400, 800), (1400, 600), (1400, 400)])
        assert test_resize['scale'] == (1400, 1000)
    else:
        assert train_resize == dict(type='Resize', scale=(1333, 800), keep_ratio=True) == test_resize


def test_cascade_reference_stages():
    roi, train = _mm('cascade_mask_rcnn_r50_fpn_1x_coco').model.roi_head, None
    train = _mm('cascade_mask_rcnn_r50_fpn_1x_coco').model.train_cfg
    assert roi.num_stages == 3 and roi.stage_loss_weights == [1, 0.5, 0.25]
    assert [h['bbox_coder']['target_stds'] for h in roi.bbox_head] == [
        [0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]
    assert all(h['fc_out_channels'] == 1024 and h['reg_class_agnostic'] for h in roi.bbox_head)
    assert [(s['assigner']['pos_iou_thr'], s['assigner']['neg_iou_thr'], s['assigner']['min_pos_iou'])
            for s in train.rcnn] == [(0.5, 0.5, 0.5), (0.6, 0.6, 0.6), (0.7, 0.7, 0.7)]
    assert all(not s['assigner']['match_low_quality'] and s['sampler']['num'] == 512 for s in train.rcnn)
    assert train.rpn_proposal.max_per_img == 2000 and train.rpn.allowed_border == 0


def test_htc_reference_semantic_branch_and_maps():
    mm = _mm('htc_r50_fpn_1x_coco', 'data.root=/coco')
    roi = mm.model.roi_head
    assert roi.interleaved and roi.mask_info_flow and mm.model.test_cfg.rcnn.score_thr == 0.001
    assert [h['with_conv_res'] for h in roi.mask_head] == [False, True, True]
    assert roi.semantic_head['num_classes'] == 183 and roi.semantic_head['seg_scale_factor'] == 0.125
    assert roi.semantic_roi_extractor['featmap_strides'] == [8] and mm.model.data_preprocessor.pad_seg
    dataset = mm.train_dataloader.dataset
    assert dataset.data_prefix == dict(img='train2017/', seg='stuffthingmaps/train2017/')
    assert dict(type='LoadAnnotationsChecked', with_bbox=True, with_mask=True, with_seg=True) in dataset.pipeline
    assert 'seg' not in mm.val_dataloader.dataset.data_prefix

    mm = _mm('htc_without_semantic_r50_fpn_1x_coco', 'data.root=/coco')
    assert mm.model.roi_head.semantic_head is None and mm.model.roi_head.semantic_roi_extractor is None
    assert 'seg' not in mm.train_dataloader.dataset.data_prefix and not mm.model.data_preprocessor.pad_seg
    assert not {'stage', 'per_stage', 'semantic', 'name'} & set(mm.model)


def test_htc_without_semantic_maps_fails_in_one_line(tmp_path):
    from instseg.engine.runner import prepare_data
    from instseg.errors import ConfigError
    root = shared('fruit')
    cfg = compose('train', ['model=htc', 'data=coco', f'data.root={root}', 'data.train.ann=trainval.json',
                            'data.train.img=images', 'data.val.ann=trainval.json', 'data.val.img=images'])
    with pytest.raises(ConfigError) as info:
        prepare_data(cfg, ('train', 'val'))
    assert 'data.train.seg=stuffthingmaps/train2017/ is not a directory' in str(info.value)
    assert 'model.semantic=false' in str(info.value) and '\n' not in str(info.value)
    prepare_data(compose('train', ['model=htc', 'model.semantic=false', 'data=coco', f'data.root={root}',
                                   'data.train.ann=trainval.json', 'data.train.img=images',
                                   'data.val.ann=trainval.json', 'data.val.img=images']), ('train', 'val'))


@pytest.mark.parametrize('experiment, iters, steps', [
    ('condinst_r50_fpn_1x_coco', 90_000, [60_000, 80_000]),         # mmdet's ms-poly-90k
    ('condinst_r50_fpn_ms_3x_coco', 270_000, [210_000, 250_000]),   # AdelaiDet's MS_R_50_3x
])
def test_condinst_recipes_match_their_references(experiment, iters, steps):
    mm = _mm(experiment)
    assert mm.model.type == 'CondInst' and mm.model.backbone.depth == 50 and mm.model.neck.start_level == 1
    assert mm.optim_wrapper.optimizer == dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001)
    assert mm.train_cfg == dict(type='ResumableIterBasedTrainLoop', max_iters=iters, val_interval=10000)
    assert mm.param_scheduler == [
        dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
        dict(type='MultiStepLR', by_epoch=False, begin=0, end=iters, milestones=steps, gamma=0.1)]
    assert mm.train_dataloader.batch_size == 2 and mm.default_hooks.checkpoint.interval == 10000
    resize = [t for t in mm.train_dataloader.dataset.pipeline if 'Resize' in t['type']][0]
    assert resize == dict(type='RandomChoiceResize', keep_ratio=True,
                          scales=[(1333, s) for s in (640, 672, 704, 736, 768, 800)])
    assert mm.model.test_cfg == dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05,
                                     nms=dict(type='nms', iou_threshold=0.6), max_per_img=100, mask_thr=0.5)


def test_a_model_can_lengthen_its_cpu_schedule_and_the_command_line_still_wins():
    knet = compose('train', ['model=knet']).schedule
    assert knet.max_iters == cpu_schedule_file('knet').max_iters != 1400   # schedule/model/cpu_knet.yaml
    assert (knet.optimizer.lr, knet.clip_grad.max_norm) == (5e-4, 1)
    assert knet.optimizer.type == 'AdamW' and knet.optimizer.weight_decay == 0.05  # the rest is cpu.yaml's
    smoke = compose('train', ['model=knet', 'schedule=smoke']).schedule
    assert (smoke.max_iters, smoke.optimizer.lr) == (4, 0.01)  # only the cpu schedule is lengthened
    assert compose('train', ['model=knet', 'schedule.max_iters=50']).schedule.max_iters == 50
    assert compose('train', ['model=mask_rcnn']).schedule.max_iters == 1400


def _train_flip(cfg) -> dict:
    return next(t for t in to_mmengine(cfg).train_dataloader.dataset.pipeline if t['type'] == 'RandomFlip')


def test_flip_directions_share_the_flip_probability():
    flip = _train_flip(compose('train'))
    assert flip == dict(type='RandomFlip', prob=0.5, direction=['horizontal'])
    cfg = compose('train', ['data.flip_directions=[horizontal,vertical,diagonal]', 'data.flip_prob=0.75'])
    flip = _train_flip(cfg)
    assert flip == dict(type='RandomFlip', prob=0.75, direction=['horizontal', 'vertical', 'diagonal'])
    from instseg.errors import ConfigError
    with pytest.raises(ConfigError, match=r"data.flip_directions: \['sideways'\] must name one or more of: "
                                          r"horizontal, vertical, diagonal$"):
        to_mmengine(compose('train', ['data.flip_directions=[sideways]']))
    # a run saved before the key existed (its config.yaml) still builds, flipping horizontally
    old = compose('train')
    OmegaConf.set_struct(old, False)
    del old.data['flip_directions']
    assert _train_flip(old)['direction'] == ['horizontal']
