"""Composition (Hydra's compose API) and translation to mmengine's config."""
import pytest
from conftest import shared

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
    # the synthetic tuning (half-width ResNet, narrow FPN) applies to Mask R-CNN on synthetic data only
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
    assert cfg.model.neck.out_channels == 256  # no synthetic tuning on other data
    assert list(cfg.model.neck.in_channels) == [64, 128, 256, 512]

    cfg = compose('train', ['data=coco', f'data.root={root}', 'data.train.ann=trainval.json',
                            'data.classes=[date, hazelnut]'])
    assert cfg.model.roi_head.bbox_head.num_classes == 2


def test_recipe_matches_mmdet_reference():
    cfg = compose('train', ['experiment=mask_rcnn_r50_fpn_1x_coco'])
    mm = to_mmengine(cfg)
    assert cfg.data.num_classes == 80 and cfg.model.backbone.depth == 50
    assert mm.optim_wrapper.optimizer == dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001)
    assert mm.train_cfg == dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
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
    assert mm.train_cfg == dict(type='IterBasedTrainLoop', max_iters=cfg.schedule.max_iters,
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
    (['model=nope'], 'model=nope: no such option; valid choices: mask_rcnn'),
    (['model/backbone=r34'], 'valid choices: r101, r18, r50'),
    (['schedule.max_iter=3'], "unknown key 'schedule.max_iter'; valid keys of schedule: by_epoch, max_iters"),
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


def test_a_run_shorter_than_the_warmup_warms_up_throughout():
    mm = to_mmengine(compose('train', ['schedule.max_iters=50']))  # cpu schedule warms up for 100
    assert mm.param_scheduler == [dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50)]
    mm = to_mmengine(compose('train', ['schedule.max_iters=300']))
    assert mm.param_scheduler[1]['begin'] == 100 and mm.param_scheduler[1]['T_max'] == 200
