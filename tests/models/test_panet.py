"""PANet's RoI parts: the fusions compute what the paper's code does, each part turns off into mmdet's
plain module, and a whole tiny PANet trains (loss + backward) and predicts end to end on CPU."""
from functools import reduce

import pytest
import torch
from conftest import det_sample
from mmdet.models.roi_heads.bbox_heads import Shared2FCBBoxHead
from mmdet.models.roi_heads.mask_heads import FCNMaskHead
from mmengine.config import ConfigDict
from mmengine.registry import init_default_scope

from instseg.models.panet import PANetBBoxHead, PANetMaskHead, PANetRoIHead
from instseg.registry import MODELS

WIDTH = 8  # FPN / RoI feature channels
NUM_CLASSES = 3
STRIDES = [4, 8, 16, 32]


@pytest.fixture(autouse=True)
def _scope_seed_and_one_thread():
    init_default_scope('instseg')
    torch.manual_seed(0)
    # Toy tensors gain nothing from threads, and under a busy CPU (a training run beside the tests)
    # thread contention makes them ~20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bbox_head_kwargs(**extra):
    return dict(in_channels=WIDTH, fc_out_channels=16, roi_feat_size=7, num_classes=NUM_CLASSES, **extra)


def mask_head_kwargs(**extra):
    return {**dict(num_convs=4, in_channels=WIDTH, conv_out_channels=8, num_classes=NUM_CLASSES), **extra}


def same_structure_and_outputs(plain, ours, inputs):
    """`ours` has `plain`'s state_dict (keys, shapes) and, given its weights, the same outputs."""
    plain_shapes = {k: v.shape for k, v in plain.state_dict().items()}
    assert plain_shapes == {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(plain.state_dict())
    plain.eval(), ours.eval()
    with torch.no_grad():
        expected, got = plain(inputs), ours(inputs)
    for e, g in zip(expected if isinstance(expected, tuple) else (expected,),
                    got if isinstance(got, tuple) else (got,)):
        assert torch.equal(e, g)


def test_bbox_adaptive_pooling_is_the_max_over_per_level_fc6():
    head = PANetBBoxHead(**bbox_head_kwargs(num_levels=4))
    assert len(head.level_fcs) == 4 and len(head.shared_fcs) == 1  # fc6 per level, fc7 shared
    levels = [torch.randn(5, WIDTH, 7, 7) for _ in range(4)]
    by_hand = torch.stack([torch.relu(fc(f.flatten(1))) for fc, f in zip(head.level_fcs, levels)]).amax(0)
    assert torch.allclose(head.fuse_levels(levels), by_hand)
    cls_score, bbox_pred = head(levels)
    fc7 = torch.relu(head.shared_fcs[0](by_hand))
    assert torch.allclose(cls_score, head.fc_cls(fc7)) and torch.allclose(bbox_pred, head.fc_reg(fc7))


def test_mask_adaptive_pooling_is_the_max_over_per_level_first_convs():
    head = PANetMaskHead(**mask_head_kwargs(num_levels=4, fc_fusion=False))
    assert len(head.level_convs) == 4 and len(head.convs) == 3
    levels = [torch.randn(5, WIDTH, 14, 14) for _ in range(4)]
    by_hand = reduce(torch.maximum, [conv(f) for conv, f in zip(head.level_convs, levels)])
    assert torch.allclose(head.fuse_levels(levels), by_hand)
    assert (by_hand >= 0).all()  # the first convs' ReLU comes before the max, as in the reference
    after_convs = reduce(lambda x, conv: conv(x), head.convs, by_hand)
    assert torch.allclose(head(levels), head.fcn_logits(after_convs))


def test_fc_fusion_adds_the_class_agnostic_fc_mask_to_the_fcn_logits():
    head = PANetMaskHead(**mask_head_kwargs(fc_fusion=True))
    fcn_only = FCNMaskHead(**mask_head_kwargs())
    fcn_only.load_state_dict(head.state_dict(), strict=False)  # same convs / deconv / logits
    rois = torch.randn(5, WIDTH, 14, 14)
    with torch.no_grad():
        conv3 = reduce(lambda x, conv: conv(x), head.convs[:3], rois)
        fc_mask = torch.relu(head.fusion_fc(head.fusion_convs(conv3).flatten(1))).view(5, 1, 28, 28)
        assert head.fusion_convs[1].conv.out_channels == 4  # conv5_fc halves the channels
        assert fc_mask.abs().sum() > 0
        assert torch.allclose(head(rois), fcn_only(rois) + fc_mask)  # broadcast over the 3 classes
        assert head(rois).shape == (5, NUM_CLASSES, 28, 28)


def test_fc_fusion_with_adaptive_pooling_branches_after_the_third_conv():
    head = PANetMaskHead(**mask_head_kwargs(num_levels=4, fc_fusion=True))
    levels = [torch.randn(2, WIDTH, 14, 14) for _ in range(4)]
    with torch.no_grad():
        conv3 = head.convs[1](head.convs[0](head.fuse_levels(levels)))  # level conv, conv2, conv3
        conv4 = head.convs[2](conv3)
        assert torch.allclose(head(levels), head.fcn_logits(conv4) + head.fc_mask(conv3))


def test_fc_fusion_in_a_two_conv_head_runs_parallel_to_the_last_conv():
    head = PANetMaskHead(**mask_head_kwargs(num_convs=2, num_levels=4, fc_fusion=True))  # the CPU fit
    levels = [torch.randn(2, WIDTH, 14, 14) for _ in range(4)]
    with torch.no_grad():
        conv1 = head.fuse_levels(levels)
        assert torch.allclose(head(levels), head.fcn_logits(head.convs[0](conv1)) + head.fc_mask(conv1))


def test_parts_turned_off_are_mmdets_plain_modules():
    rois = torch.randn(3, WIDTH, 7, 7)
    same_structure_and_outputs(Shared2FCBBoxHead(**bbox_head_kwargs()),
                               PANetBBoxHead(**bbox_head_kwargs(num_levels=1)), rois)
    same_structure_and_outputs(FCNMaskHead(**mask_head_kwargs()),
                               PANetMaskHead(**mask_head_kwargs(num_levels=1, fc_fusion=False)),
                               torch.randn(3, WIDTH, 14, 14))


def test_new_layers_are_initialised_like_the_ones_they_stand_for():
    bbox_head = PANetBBoxHead(**bbox_head_kwargs(num_levels=4))
    bbox_head.init_weights()  # Xavier-uniform, zero bias: mmdet's init of the fc6 they replace
    for fc in bbox_head.level_fcs:
        assert not fc.bias.any() and fc.weight.abs().max() <= (6 / sum(fc.weight.shape)) ** 0.5
    mask_head = PANetMaskHead(**mask_head_kwargs(num_levels=4, fc_fusion=True))
    mask_head.init_weights()  # the reference's N(0, 0.01) for the fusion fc
    assert not mask_head.fusion_fc.bias.any() and abs(mask_head.fusion_fc.weight.std() - 0.01) < 0.002


def roi_head_cfg(**extra):
    extractor = dict(type='SingleRoIExtractor', out_channels=WIDTH, featmap_strides=STRIDES)
    return dict(
        type='PANetRoIHead',
        bbox_roi_extractor=dict(extractor, roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0)),
        bbox_head=dict(type='PANetBBoxHead', **bbox_head_kwargs(
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]))),
        mask_roi_extractor=dict(extractor, roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=0)),
        mask_head=dict(type='PANetMaskHead', **mask_head_kwargs(fc_fusion=True)),
        **extra)


def test_roi_head_sets_num_levels_from_the_extractor_without_touching_the_config():
    cfg = roi_head_cfg()
    head = MODELS.build(cfg)
    assert isinstance(head, PANetRoIHead)
    assert head.bbox_head.num_levels == head.mask_head.num_levels == len(STRIDES)
    assert 'num_levels' not in cfg['bbox_head'] and 'num_levels' not in cfg['mask_head']

    plain = MODELS.build(roi_head_cfg(adaptive_pooling=False))
    assert plain.bbox_head.num_levels == plain.mask_head.num_levels == 1
    assert not hasattr(plain.bbox_head, 'level_fcs') and not hasattr(plain.mask_head, 'level_convs')

    with pytest.raises(ValueError, match='num_levels'):
        bad = roi_head_cfg(adaptive_pooling=False)
        bad['bbox_head']['num_levels'] = 4
        MODELS.build(bad)


def test_roi_head_pools_every_roi_from_every_level_and_handles_no_rois():
    head = MODELS.build(roi_head_cfg()).eval()
    feats = tuple(torch.randn(2, WIDTH, 64 // s, 64 // s) for s in STRIDES + [64])  # 5 neck outputs
    rois = torch.tensor([[0, 2., 2., 20., 30.], [1, 0., 0., 63., 63.], [1, 10., 5., 12., 9.]])
    pooled = head.pool_all_levels(head.bbox_roi_extractor, feats, rois)
    assert len(pooled) == 4 and all(p.shape == (3, WIDTH, 7, 7) for p in pooled)
    with torch.no_grad():
        boxes = head._bbox_forward(feats, rois)
        assert boxes['cls_score'].shape == (3, NUM_CLASSES + 1)
        assert head._mask_forward(feats, rois)['mask_preds'].shape == (3, NUM_CLASSES, 28, 28)
        # The mask branch on the box branch's features (shared extractor) takes the positives' rows.
        pos_inds = torch.tensor([1, 0, 1], dtype=torch.uint8)
        shared = head._mask_forward(feats, pos_inds=pos_inds, bbox_feats=head._mask_forward(feats, rois)['mask_feats'])
        assert all(f.shape[0] == 2 for f in shared['mask_feats'])
        no_rois = torch.zeros(0, 5)
        assert head._bbox_forward(feats, no_rois)['cls_score'].shape == (0, NUM_CLASSES + 1)
        assert head._mask_forward(feats, no_rois)['mask_preds'].shape == (0, NUM_CLASSES, 28, 28)


def tiny_panet_cfg():
    """configs/model/mask_rcnn.yaml + model/panet.yaml's RoI head, at toy widths and sampler sizes."""
    return ConfigDict(  # mmdet reads train_cfg.rpn etc. as attributes
        type='MaskRCNN',
        data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_mask=True, pad_size_divisor=32),
        backbone=dict(type='ResNet', depth=18, base_channels=16, num_stages=4, out_indices=(0, 1, 2, 3),
                      frozen_stages=1, norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True,
                      style='pytorch'),
        neck=dict(type='PAFPN', in_channels=[16, 32, 64, 128], out_channels=WIDTH, num_outs=5),
        rpn_head=dict(
            type='RPNHead', in_channels=WIDTH, feat_channels=WIDTH,
            anchor_generator=dict(type='AnchorGenerator', scales=[8], ratios=[0.5, 1.0, 2.0],
                                  strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        roi_head=roi_head_cfg(),
        train_cfg=dict(
            rpn=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                                   match_low_quality=True, ignore_iof_thr=-1),
                     sampler=dict(type='RandomSampler', num=64, pos_fraction=0.5, neg_pos_ub=-1,
                                  add_gt_as_proposals=False),
                     allowed_border=-1, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=200, max_per_img=50, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                                    match_low_quality=True, ignore_iof_thr=-1),
                      sampler=dict(type='RandomSampler', num=32, pos_fraction=0.25, neg_pos_ub=-1,
                                   add_gt_as_proposals=True),
                      mask_size=28, pos_weight=-1, debug=False)),
        test_cfg=dict(
            rpn=dict(nms_pre=200, max_per_img=50, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(score_thr=0.0, nms=dict(type='nms', iou_threshold=0.5), max_per_img=10, mask_thr_binary=0.5)))


def test_panet_mask_rcnn_trains_and_predicts_end_to_end():
    model = MODELS.build(tiny_panet_cfg())
    assert isinstance(model.roi_head, PANetRoIHead)
    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(2)]
    batch = model.data_preprocessor(
        dict(inputs=images, data_samples=[det_sample([[4, 6, 30, 40], [32, 20, 60, 58]], [0, 2]), det_sample([], [])]),
        training=True)
    losses = model(**batch, mode='loss')
    total, log_vars = model.parse_losses(losses)
    assert {'loss_cls', 'loss_bbox', 'loss_mask'} <= set(log_vars)
    assert all(torch.isfinite(value.detach()) for value in log_vars.values())
    total.backward()

    roi_head = model.roi_head
    for layer in [*roi_head.bbox_head.level_fcs, *(c.conv for c in roi_head.mask_head.level_convs),
                  roi_head.mask_head.fusion_fc]:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        batch = model.data_preprocessor(dict(inputs=images[:1], data_samples=[det_sample([], [], ori_shape=(32, 48))]))
        result = model(**batch, mode='predict')[0].pred_instances
    assert len(result) > 0 and result.masks.shape[1:] == (32, 48)
