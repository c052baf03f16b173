"""K-Net: the matcher, the kernel update, loss and predict modes, building from the configs (tiny, CPU)."""
import numpy as np
import pytest
import torch
from conftest import built_optim_wrapper, param_group_of, run_tool
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData
from omegaconf import OmegaConf

from instseg.cli import compose
from instseg.config import to_mmengine
from instseg.models import build_model
from instseg.models.knet import KNet, KernelIterHead
from instseg.models.knet.kernel_update_head import box_offsets, grid_group
from instseg.models.knet.losses import extent_targets, match
from instseg.registry import MODELS, TASK_UTILS

NUM_CLASSES = 5
TINY = ['model.backbone.base_channels=8', 'model.neck.out_channels=32', 'model.rpn_head.num_proposals=6',
        'model.roi_head.mask_head.num_heads=2', 'model.roi_head.mask_head.feedforward_channels=64']
# docs/knet_cpu.md's line for the CPU fit without what it adds to the reference's head
WITHOUT_ADDITIONS = ['model.roi_head.mask_head.group_grid=0', 'model.roi_head.mask_head.box_coords=false',
                     'model.roi_head.denoising_weight=0', 'model.train_cfg.rpn.assigner.num_copies=1',
                     'model.test_cfg.nms=null']


def _tiny_model() -> KNet:
    torch.manual_seed(0)
    model = build_model(compose('train', ['model=knet', *TINY]))
    model.init_weights()
    return model


def _sample(boxes, labels, img_shape=(64, 64), ori_shape=None) -> DetDataSample:
    """A data sample with rectangular GT masks (boxes as x1, y1, x2, y2 in image pixels)."""
    h, w = img_shape
    ori_shape = ori_shape or img_shape
    sample = DetDataSample(metainfo=dict(img_shape=img_shape, ori_shape=ori_shape,
                                         scale_factor=(w / ori_shape[1], h / ori_shape[0])))
    masks = np.zeros((len(boxes), h, w), np.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes):
        mask[y1:y2, x1:x2] = 1
    sample.gt_instances = InstanceData(labels=torch.tensor(labels, dtype=torch.long),
                                       bboxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                       masks=BitmapMasks(masks, h, w))
    return sample


def _batch(samples, training: bool, model: KNet):
    images = [torch.randint(0, 256, (3, *s.metainfo['img_shape']), dtype=torch.uint8) for s in samples]
    return model.data_preprocessor(dict(inputs=images, data_samples=samples), training)


# ----------------------------------------------------------------------------- matching
def test_matcher_finds_the_obvious_assignment():
    init_default_scope('instseg')
    cfg = compose('train', ['model=knet', 'fit=reference'])  # one-to-one, as the reference
    assigner = TASK_UTILS.build(OmegaConf.to_container(cfg.model.train_cfg.rcnn.assigner))
    left = torch.zeros(8, 8)
    left[:, :4] = 1
    corner = torch.zeros(8, 8)
    corner[4:, 4:] = 1
    gt = InstanceData(labels=torch.tensor([1, 3]), masks=torch.stack([left, corner]))
    # prediction 0 is nothing; 1 is the corner with class 3; 2 is the left half with class 1
    mask_logits = torch.stack([torch.full((8, 8), -8.0), corner * 16 - 8, left * 16 - 8])[None]
    cls_logits = torch.full((1, 3, NUM_CLASSES), -6.0)
    cls_logits[0, 1, 3] = cls_logits[0, 2, 1] = 6.0
    [(pred_inds, gt_inds)] = match(assigner, mask_logits, cls_logits, [gt], NUM_CLASSES)
    assert dict(zip(pred_inds.tolist(), gt_inds.tolist())) == {1: 1, 2: 0}
    # the masks alone decide when there are no class scores (the first stages)
    [(pred_inds, gt_inds)] = match(assigner, mask_logits, None, [gt], NUM_CLASSES)
    assert dict(zip(pred_inds.tolist(), gt_inds.tolist())) == {1: 1, 2: 0}
    # and the class decides between two equal masks: 0 and 1 are both the left half, 1 with its class
    twin_masks = torch.stack([left * 16 - 8, left * 16 - 8, corner * 16 - 8])[None]
    twin_cls = torch.full((1, 3, NUM_CLASSES), -6.0)
    twin_cls[0, 0, 3] = twin_cls[0, 1, 1] = twin_cls[0, 2, 3] = 6.0
    [(pred_inds, gt_inds)] = match(assigner, twin_masks, twin_cls, [gt], NUM_CLASSES)
    assert dict(zip(pred_inds.tolist(), gt_inds.tolist())) == {1: 0, 2: 1}


def test_one_to_many_matching_gives_each_gt_its_best_predictions():
    init_default_scope('instseg')
    costs = [dict(type='DiceCost', weight=4.0, pred_act=True, naive_dice=False),
             dict(type='KNetMaskCost', weight=1.0, pred_act=True)]
    assigner = TASK_UTILS.build(dict(type='OneToManyHungarianAssigner', num_copies=2, match_costs=costs))
    top, bottom = torch.zeros(8, 8), torch.zeros(8, 8)
    top[:4], bottom[4:] = 1, 1
    gt = InstanceData(labels=torch.tensor([1, 3]), masks=torch.stack([top, bottom]))
    # 0 and 3 cover the top half (3 a row short), 1 the bottom, 4 most of it, 2 nothing
    short_top, short_bottom = top.clone(), bottom.clone()
    short_top[3], short_bottom[4] = 0, 0
    mask_logits = torch.stack([top, bottom, torch.zeros(8, 8), short_top, short_bottom]) * 16 - 8
    [(pred_inds, gt_inds)] = match(assigner, mask_logits[None], None, [gt], NUM_CLASSES)
    assert dict(zip(pred_inds.tolist(), gt_inds.tolist())) == {0: 0, 1: 1, 3: 0, 4: 1}
    # never more predictions than there are: 3 copies of 2 GTs on 5 kernels leave one GT with 2
    assigner.num_copies = 3
    [(pred_inds, gt_inds)] = match(assigner, mask_logits[None], None, [gt], NUM_CLASSES)
    assert len(pred_inds) == 5 and sorted(gt_inds.bincount().tolist()) == [2, 3]
    # an image without GT: everything background
    empty = InstanceData(labels=torch.zeros(0, dtype=torch.long), masks=torch.zeros(0, 8, 8))
    assert [len(p) for p, _ in match(assigner, mask_logits[None], None, [empty], NUM_CLASSES)] == [0]
    # one copy is mmdet's one-to-one matching
    assigner.num_copies = 1
    one_to_one = TASK_UTILS.build(dict(type='HungarianAssigner', match_costs=costs))
    for assign in (assigner, one_to_one):
        [(pred_inds, gt_inds)] = match(assign, mask_logits[None], None, [gt], NUM_CLASSES)
        assert dict(zip(pred_inds.tolist(), gt_inds.tolist())) == {0: 0, 1: 1}


def test_mask_cost_is_the_references_agreement():
    init_default_scope('instseg')
    cost = TASK_UTILS.build(dict(type='KNetMaskCost', weight=1.0, pred_act=False))
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    pred = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    values = cost(InstanceData(masks=pred), InstanceData(masks=target, labels=torch.zeros(1, dtype=torch.long)))
    assert torch.allclose(values.flatten(), torch.tensor([-1.0, 0.0, -0.5]))


# ----------------------------------------------------------------------------- kernel update
def test_kernel_update_shapes_and_kernels_change_every_stage():
    init_default_scope('instseg')
    torch.manual_seed(0)
    head = MODELS.build(dict(type='KernelIterHead', num_stages=3, mask_head=dict(
        type='KernelUpdateHead', num_classes=NUM_CLASSES, in_channels=16, num_heads=2,
        feedforward_channels=32, updator_channels=16)))
    head.init_weights()
    features, kernels = torch.randn(2, 16, 8, 8), torch.randn(2, 7, 16)
    mask_logits = torch.randn(2, 7, 4, 4)  # coarser than the features: resized for the grouping
    stages = [kernels]
    for stage in head.mask_head:
        cls_logits, mask_logits, kernels = stage(features, kernels, mask_logits)
        assert cls_logits.shape == (2, 7, NUM_CLASSES)
        assert mask_logits.shape == (2, 7, 8, 8)
        assert kernels.shape == (2, 7, 16)
        assert not torch.allclose(kernels, stages[-1])
        stages.append(kernels)
    outputs = head(features, stages[0], torch.randn(2, 7, 4, 4))
    assert len(outputs) == 3 and outputs[-1][1].shape == (2, 7, 8, 8)


def test_grid_grouping_sums_each_cell_of_the_mask_box_and_keeps_the_layout():
    features = torch.zeros(1, 3, 6, 8)
    features[0, 0] = 1.0                                     # counts pixels
    features[0, 1] = torch.arange(8.0)[None].expand(6, 8)    # x
    features[0, 2] = torch.arange(6.0)[:, None].expand(6, 8)  # y
    masks = torch.zeros(1, 3, 6, 8)
    masks[0, 0, 1:5, 2:6] = 1       # a 4x4 square: 2x2 pixels in each cell of a 2x2 grid
    masks[0, 1, 0, 7] = 1           # one pixel: the centre of its own box
    cells = grid_group(masks, features, 2).reshape(1, 3, 4, 3)
    assert cells[0, 0, :, 0].tolist() == [4, 4, 4, 4]
    assert cells[0, 0, :, 1].tolist() == [2 + 2 + 3 + 3, 4 + 4 + 5 + 5] * 2  # left cells, then right
    assert cells[0, 0, :, 2].tolist() == [1 + 1 + 2 + 2] * 2 + [3 + 3 + 4 + 4] * 2  # top cells, then bottom
    assert grid_group(masks, features, 3).reshape(1, 3, 9, 3)[0, 1, :, 0].tolist() == [0] * 4 + [1] + [0] * 4
    assert not cells[0, 2].any()  # an empty mask groups nothing
    # the cells add up to the reference's bag of features, whatever the grid
    bag = torch.einsum('bnhw,bchw->bnc', masks, features)
    for grid in (1, 3):
        assert torch.allclose(grid_group(masks, features, grid).reshape(1, 3, grid * grid, 3).sum(2), bag)


def test_a_stage_with_grid_grouping_takes_the_wider_group_feature():
    init_default_scope('instseg')
    head = MODELS.build(dict(type='KernelUpdateHead', num_classes=NUM_CLASSES, in_channels=16, num_heads=2,
                             feedforward_channels=32, updator_channels=16, group_grid=3))
    head.init_weights()
    assert head.kernel_updator.dynamic_layer.in_features == 9 * 16
    features = torch.randn(2, 16, 8, 8, requires_grad=True)
    cls_logits, mask_logits, kernels = head(features, torch.randn(2, 7, 16), torch.randn(2, 7, 8, 8))
    assert cls_logits.shape == (2, 7, NUM_CLASSES) and mask_logits.shape == (2, 7, 8, 8)
    cls_logits.sum().backward()  # the class reaches the features through the grouping
    assert features.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- loss and predict
def test_box_offsets_are_each_pixels_offset_from_its_mask_box_centre_in_half_widths():
    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 0, 2:6, 1:3] = 1   # rows 2-5, columns 1-2: centre at (2, 4) in pixel-corner units
    along_x, along_y = box_offsets(masks)
    assert along_x[0, 0].tolist() == [-1.5, -0.5, 0.5, 1.5, 2, 2, 2, 2]  # clipped at 2 half widths
    assert along_y[0, 0].tolist() == [-1.75, -1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 1.75]
    assert not along_x[0, 1].any() and not along_y[0, 1].any()  # an empty mask: no offsets


def test_a_stage_with_box_coords_adds_a_quadratic_in_the_offsets_to_each_mask():
    init_default_scope('instseg')
    head = MODELS.build(dict(type='KernelUpdateHead', num_classes=NUM_CLASSES, in_channels=16, num_heads=2,
                             feedforward_channels=32, updator_channels=16, box_coords=True))
    head.init_weights()
    assert head.fc_mask.out_features == 16 + 4
    with torch.no_grad():  # no feature term; the offsets' squares weighted -1: a bump on each box's centre
        head.fc_mask.weight.zero_()
        head.fc_mask.bias.copy_(torch.tensor([0.0] * 16 + [0, 0, -1, -1]))
    previous = torch.full((1, 2, 8, 8), -5.0)
    previous[0, 0, 2:6, 1:3] = 5.0
    _, mask_logits, _ = head(torch.randn(1, 16, 8, 8), torch.randn(1, 2, 16), previous)
    along_x, along_y = box_offsets((previous > 0).float())
    assert torch.allclose(mask_logits, -(along_y[..., :, None] ** 2 + along_x[..., None, :] ** 2))
    assert mask_logits[0, 0].argmax() // 8 in (3, 4) and mask_logits[0, 0].argmax() % 8 in (1, 2)
    head.fc_mask.bias.grad = None
    mask_logits.sum().backward()  # the offsets' weights learn
    assert head.fc_mask.bias.grad[16:].abs().sum() > 0


def test_loss_is_finite_and_reaches_the_kernels_with_an_image_without_gt():
    model = _tiny_model()
    model.train()
    samples = [_sample([[4, 4, 30, 20], [30, 30, 60, 62]], [0, 4]), _sample([], [])]
    losses = model(**_batch(samples, True, model), mode='loss')
    expected = {'loss_rpn_mask', 'loss_rpn_dice', 'loss_rpn_seg'} | {
        f's{s}_{group}loss_{k}' for s in range(3) for group in ('', 'dn_') for k in ('cls', 'mask', 'dice')}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    for param in (model.rpn_head.init_kernels.weight, model.roi_head.mask_head[2].fc_cls.weight,
                  model.roi_head.mask_head[0].kernel_updator.dynamic_layer.weight, model.backbone.conv1.weight):
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    # a batch without any GT still gives finite (zero mask) losses
    losses = model(**_batch([_sample([], [])], True, model), mode='loss')
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses['s2_loss_dice'].item() == 0.0


@pytest.mark.parametrize('fit', ['cpu', 'reference'])
def test_the_first_stage_reuses_the_rpn_like_stages_matching_with_the_same_losses(fit):
    samples = [_sample([[4, 4, 30, 20], [30, 30, 60, 62], [40, 2, 62, 20]], [0, 4, 2]), _sample([[8, 8, 40, 40]], [1])]
    losses = {}
    for share in (True, False):
        torch.manual_seed(0)
        model = build_model(compose('train', ['model=knet', f'fit={fit}', *TINY]))
        assert model.share_rpn_matching  # one assigner for both, in either fit
        model.init_weights()
        model.train()
        model.share_rpn_matching = share
        losses[share] = model(**_batch(samples, True, model), mode='loss')
    assert all(torch.equal(losses[True][k], losses[False][k]) for k in losses[False]), losses


def test_the_first_stage_matches_on_its_own_with_an_assigner_of_its_own():
    model = build_model(compose('train', ['model=knet', 'fit=reference', *TINY,
                                          'model.train_cfg.rcnn.assigner.match_costs.0.weight=1.0']))
    assert not model.share_rpn_matching


def test_extent_targets_are_each_pixels_distances_to_its_own_objects_box_edges():
    masks = torch.zeros(2, 8, 10)
    masks[0, 2:5, 1:7] = 1
    masks[1, 4:8, 6:10] = 1  # overlaps the first at (4, 6): the later GT wins
    targets, foreground = extent_targets([InstanceData(masks=masks, labels=torch.tensor([0, 1])),
                                          InstanceData(masks=masks[:0], labels=torch.tensor([]))])
    scale = torch.tensor([10, 8, 10, 8.])  # (left, top, right, bottom) as fractions of the width, height
    assert targets[0, :, 2, 1].mul(scale).tolist() == [0, 0, 6, 3]  # the first box's top-left pixel
    assert targets[0, :, 4, 5].mul(scale).tolist() == [4, 2, 2, 1]
    assert targets[0, :, 4, 6].mul(scale).tolist() == [0, 0, 4, 4]  # the second's
    assert foreground[0].sum() == 18 + 16 - 1 and not foreground[1].any()
    assert targets[0, :, 0, 0].abs().sum() == 0


def test_the_optional_extent_loss_trains_its_conv_and_the_features():
    torch.manual_seed(0)
    model = build_model(compose('train', ['model=knet', *TINY,
                                          'model.rpn_head.loss_extent={type: L1Loss, loss_weight: 10.0}']))
    model.init_weights()
    model.train()
    samples = [_sample([[4, 4, 30, 20]], [0]), _sample([], [])]
    losses = model(**_batch(samples, True, model), mode='loss')
    assert losses['loss_rpn_extent'] > 0
    losses['loss_rpn_extent'].backward()
    for param in (model.rpn_head.conv_extent.weight, model.backbone.conv1.weight):
        assert param.grad.abs().sum() > 0
    assert _tiny_model().rpn_head.conv_extent is None  # off by default, as the reference


def test_denoising_group_learns_each_gt_from_its_own_mask_and_leaves_the_rest_alone():
    model = build_model(compose('train', ['model=knet', *TINY, 'model.roi_head.denoising_weight=0.5']))
    model.init_weights()
    model.train()
    samples = [_sample([[4, 4, 30, 20], [30, 30, 60, 62], [40, 2, 60, 20]], [0, 4, 2]), _sample([], [])]
    batch = _batch(samples, True, model)
    torch.manual_seed(0)
    losses = model(**batch, mode='loss')
    denoising = {k for k in losses if '_dn_' in k}
    assert denoising == {f's{s}_dn_loss_{k}' for s in range(3) for k in ('cls', 'mask', 'dice')}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert losses['s0_dn_loss_dice'] > 0
    # the group only adds losses: the matched predictions' losses are those without it
    model.roi_head.denoising_weight = 0.0
    torch.manual_seed(0)
    plain = model(**batch, mode='loss')
    assert set(plain) == set(losses) - denoising
    for key, value in plain.items():
        torch.testing.assert_close(losses[key], value)
    # the group: the matched kernels, their first masks the GT masks (not the RPN's), one key kept per image
    kernels = torch.randn(2, 4, 32)
    gt = InstanceData(labels=torch.tensor([1, 3]), masks=torch.zeros(2, 8, 8))
    gt.masks[0, :4, :4] = 1
    gt.masks[1, 4:, 4:] = 1
    matches = [(torch.tensor([2, 0]), torch.tensor([1, 0])), (torch.tensor([], dtype=torch.long),) * 2]
    group_kernels, logits, padding, group_matches = model.roi_head._denoising_group(
        kernels, matches, [gt, gt[:0]], (8, 8))
    assert torch.equal(group_kernels[0], kernels[0, [2, 0]]) and not group_kernels[1].any()
    assert torch.equal(logits[0] > 0, gt.masks[[1, 0]].bool()) and not (logits[1] > 0).any()
    assert padding.tolist() == [[False, False], [False, True]]
    assert [m[0].tolist() for m in group_matches] == [[0, 1], []] and group_matches[0][1].tolist() == [1, 0]
    assert model.roi_head._denoising_group(kernels, matches, [gt, gt[:0]], (4, 4))[1].shape == (2, 2, 4, 4)
    # one-to-many matching gives a GT several kernels: the group has one per GT, its first
    many = [(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0, 1, 0])), matches[1]]
    group_kernels, _, padding, group_matches = model.roi_head._denoising_group(kernels, many, [gt, gt[:0]], (8, 8))
    assert torch.equal(group_kernels[0], kernels[0, [0, 1]]) and group_matches[0][1].tolist() == [1, 0]
    assert padding.shape == (2, 2)


def test_predict_gives_masks_at_the_original_size_and_boxes_enclosing_them():
    model = _tiny_model()
    model.eval()
    sample = _sample([], [], img_shape=(64, 96), ori_shape=(100, 150))  # resized by 0.64
    with torch.no_grad():
        [result] = model(**_batch([sample], False, model), mode='predict')
    pred = result.pred_instances
    assert pred.masks.dtype == torch.bool and pred.masks.shape[1:] == (100, 150)
    assert len(pred) == min(100, 6 * NUM_CLASSES)
    assert pred.bboxes.shape == (len(pred), 4) and pred.labels.max() < NUM_CLASSES
    assert torch.all(pred.scores[:-1] >= pred.scores[1:])  # top-k, best first
    nonempty = [i for i, m in enumerate(pred.masks) if m.any()]
    assert nonempty, 'an untrained model should still predict some foreground'
    for i in nonempty:
        ys, xs = torch.nonzero(pred.masks[i], as_tuple=True)
        x1, y1, x2, y2 = pred.bboxes[i].tolist()
        assert (x1, y1, x2, y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # tight and enclosing
    tensors = model(**_batch([sample], False, model), mode='tensor')
    assert len(tensors) == 3 and tensors[-1][0].shape == (1, 6, NUM_CLASSES)


def _iter_head(**test_cfg) -> KernelIterHead:
    init_default_scope('instseg')
    return MODELS.build(dict(type='KernelIterHead', num_stages=1, test_cfg=test_cfg, mask_head=dict(
        type='KernelUpdateHead', num_classes=NUM_CLASSES, in_channels=16, num_heads=2,
        feedforward_channels=32, updator_channels=16)))


def test_upsampled_logits_put_the_boundary_where_they_cross_zero():
    # two logit cells, -1 and 8, resized to 8 pixels: the logits cross zero a ninth of the way from the
    # first cell's centre to the second's; sigmoid-first, the map crosses 0.5 a pixel further right
    logits = torch.tensor([-1.0, 8.0]).reshape(1, 1, 2)
    meta = dict(img_shape=(1, 8), batch_input_shape=(1, 8), ori_shape=(1, 8))
    from_logits = KernelIterHead._masks_at_image_size(logits, meta, True, upsample_logits=True)
    from_probs = KernelIterHead._masks_at_image_size(logits, meta, True, upsample_logits=False)
    expected = torch.nn.functional.interpolate(logits[None], size=(1, 8), mode='bilinear', align_corners=False)[0]
    assert torch.allclose(from_logits, expected.sigmoid())
    assert (from_logits > 0.5).flatten().tolist() == [False, False, True, True, True, True, True, True]
    assert (from_probs > 0.5).flatten().tolist() == [False, False, False, True, True, True, True, True]


@pytest.mark.parametrize('mask_score', [False, True])
def test_mask_score_ranks_the_sure_mask_first(mask_score):
    head = _iter_head(max_per_img=2, mask_thr=0.5, mask_score=mask_score)
    head.init_weights()
    # two kernels of one class score: kernel 0's mask is barely above the threshold, kernel 1's sure
    mask_logits = torch.full((1, 2, 8, 8), -8.0)
    mask_logits[0, 0, :4] = 0.5
    mask_logits[0, 1, 4:] = 8.0
    cls_logits = torch.full((1, 2, NUM_CLASSES), -8.0)
    cls_logits[0, :, 2] = 2.0
    head.forward = lambda *args: [(cls_logits, mask_logits)]
    meta = dict(img_shape=(8, 8), batch_input_shape=(8, 8), ori_shape=(8, 8))
    [result] = head.predict(None, None, None, [meta])
    class_score = torch.sigmoid(torch.tensor(2.0))
    if mask_score:  # the class score times the mean probability inside each mask
        assert result.masks[0][4:].all() and not result.masks[0][:4].any()
        assert torch.allclose(result.scores, class_score * torch.sigmoid(torch.tensor([8.0, 0.5])))
    else:  # the class score alone: a tie, in kernel order
        assert torch.allclose(result.scores, class_score.expand(2))
    assert result.labels.tolist() == [2, 2]


def test_nms_lowers_a_duplicates_score_and_keeps_other_classes():
    head = _iter_head(max_per_img=3, mask_thr=0.5, nms=dict(kernel='gaussian', sigma=2.0))
    head.init_weights()
    # kernels 0 and 1 are one mask of class 2 (one-to-many matching trains such pairs); kernel 2 the
    # same mask of class 4, kernel 1 the lower score of the twins
    mask_logits = torch.full((1, 3, 8, 8), -8.0)
    mask_logits[0, :, :4] = 8.0
    cls_logits = torch.full((1, 3, NUM_CLASSES), -8.0)
    cls_logits[0, 0, 2], cls_logits[0, 1, 2], cls_logits[0, 2, 4] = 3.0, 2.0, 1.0
    head.forward = lambda *args: [(cls_logits, mask_logits)]
    meta = dict(img_shape=(8, 8), batch_input_shape=(8, 8), ori_shape=(8, 8))
    [result] = head.predict(None, None, None, [meta])
    sure, twin, other = torch.sigmoid(torch.tensor([3.0, 2.0, 1.0]))
    assert torch.allclose(result.scores, torch.stack([sure, other, twin * torch.exp(torch.tensor(-2.0))]))
    assert result.labels.tolist() == [2, 4, 2]
    assert result.bboxes.tolist() == [[0.0, 0.0, 8.0, 4.0]] * 3


# ----------------------------------------------------------------------------- configs and tools
def test_builds_through_the_registry_with_the_cpu_fit():
    cfg = compose('train', ['model=knet'])
    model = build_model(cfg)
    assert isinstance(model, KNet) and isinstance(model.roi_head, KernelIterHead)
    assert len(model.roi_head.mask_head) == 3
    assert model.rpn_head.init_kernels.out_channels == cfg.model.rpn_head.num_proposals == 30  # tuning/cpu_knet
    assert cfg.model.neck.out_channels == 64 and cfg.model.neck.num_outs == 4
    assert cfg.model.mask_stride == 2 and cfg.model.test_cfg.upsample_logits and cfg.model.test_cfg.mask_score
    # grid grouping, the box's offsets, one-to-many matching with matrix NMS at test, the denoising group
    assert all(head.group_grid == 3 and head.box_coords for head in model.roi_head.mask_head)
    assert model.rpn_head.assigner.num_copies == model.roi_head.assigner.num_copies == 3
    assert model.roi_head.test_cfg['nms'] == dict(kernel='gaussian', sigma=2.0)
    assert model.roi_head.denoising_weight == 1.0
    # docs/knet_cpu.md's line switches them all off (one copy: one-to-one matching)
    plain = build_model(compose('train', ['model=knet', *WITHOUT_ADDITIONS]))
    assert all(head.group_grid == 0 and not head.box_coords for head in plain.roi_head.mask_head)
    assert plain.rpn_head.assigner.num_copies == plain.roi_head.assigner.num_copies == 1
    assert plain.roi_head.denoising_weight == 0.0 and plain.roi_head.test_cfg['nms'] is None
    reference = compose('train', ['model=knet', 'fit=reference'])
    assert reference.model.rpn_head.num_proposals == 100 and reference.model.neck.out_channels == 256
    assert reference.model.roi_head.denoising_weight == 0.0 and reference.model.roi_head.mask_head.group_grid == 0
    assert not reference.model.roi_head.mask_head.box_coords
    assert reference.model.train_cfg.rcnn.assigner.type == 'HungarianAssigner'
    # the reference's test: class scores alone, sigmoid before resizing; targets at 1/4
    assert reference.model.mask_stride == 4 and reference.model.test_cfg == dict(
        max_per_img=100, mask_thr=0.5, mask_score=False, upsample_logits=False, nms=None)


def test_the_rpn_like_stages_convs_start_at_the_references_0_01_or_at_kaimings_init():
    from mmcv.cnn import ConvModule

    def kaiming(conv):  # mmcv's ConvModule: normal, fan_out, relu
        return (2 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1])) ** 0.5

    for overrides, expected in (([], lambda conv: 0.01), (['fit=reference'], lambda conv: 0.01),
                                (['model.rpn_head.conv_init_std=null'], kaiming)):
        torch.manual_seed(0)
        model = build_model(compose('train', ['model=knet', *TINY, *overrides]))
        model.init_weights()
        convs = [m.conv for m in model.rpn_head.modules() if isinstance(m, ConvModule)]
        assert len(convs) == 11  # the semantic FPN's 1 + 1 + 2 + 3 level convs and 2 outputs, loc and seg
        for conv in convs:
            assert conv.weight.std().item() == pytest.approx(expected(conv), rel=0.15), (overrides, conv)
        assert model.rpn_head.init_kernels.weight.std().item() == pytest.approx(1.0, rel=0.15)  # always N(0, 1)


def test_the_cpu_schedule_gives_the_feature_parts_4x_the_update_stages_lr():
    model = build_model(compose('train', ['model=knet']))
    wrapper = built_optim_wrapper(model, 'model=knet')
    for part, lr in ((model.backbone, 2e-3), (model.neck, 2e-3), (model.rpn_head, 2e-3), (model.roi_head, 5e-4)):
        lrs = {param_group_of(wrapper, p)['lr'] for p in part.parameters()}
        assert len(lrs) == 1 and lrs.pop() == pytest.approx(lr)
    # the paper schedules keep the reference's multipliers (test_recipes_follow_the_reference_schedule)
    assert compose('train', ['model=knet', 'schedule=1x']).schedule.paramwise_cfg is None


def test_the_cpu_schedule_warms_up_over_2000_iterations():
    schedulers = to_mmengine(compose('train', ['model=knet'])).param_scheduler
    assert schedulers[0] == dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=2000)
    assert schedulers[1]['type'] == 'CosineAnnealingLR' and schedulers[1]['begin'] == 2000
    assert to_mmengine(compose('train')).param_scheduler[0]['end'] == 100  # the CPU default's, Mask R-CNN's


def test_recipes_follow_the_reference_schedule():
    cfg = compose('train', ['experiment=knet_r50_fpn_1x_coco'])
    s = cfg.schedule
    assert cfg.model.name == 'knet' and cfg.model.backbone.depth == 50 and cfg.data.num_classes == 80
    assert cfg.model.rpn_head.num_proposals == 100 and cfg.model.neck.out_channels == 256  # fit=reference
    # SGD's momentum from schedule/1x is removed by the recipe's null
    assert to_mmengine(cfg).optim_wrapper.optimizer == {'type': 'AdamW', 'lr': 1e-4, 'weight_decay': 0.05}
    assert to_mmengine(cfg).optim_wrapper.paramwise_cfg == {'custom_keys': {'backbone': {'lr_mult': 0.25}}}
    assert s.clip_grad.max_norm == 1 and s.warmup_iters == 1000 and s.max_epochs == 12 and list(s.steps) == [8, 11]
    assert s.batch_size == 2 and s.base_batch_size == 16 and s.by_epoch
    ms = compose('train', ['experiment=knet_r50_fpn_ms_3x_coco'])
    assert ms.schedule.max_epochs == 36 and list(ms.schedule.steps) == [27, 33]
    assert ms.schedule.paramwise_cfg == s.paramwise_cfg
    assert [short for _, short in ms.data.train_scales] == [640, 672, 704, 736, 768, 800]


def test_model_info_tool():
    lines = run_tool('model_info', 'model=knet').stdout.rstrip().splitlines()
    assert lines[0] == f'model: knet (KNet), {NUM_CLASSES} classes'
    assert lines[-1].startswith('params: ') and int(lines[-1].split()[1]) > 1_000_000


def test_recipe_parameter_count():
    # Counted by hand from the reference's layer list (see the K-Net report): R50 23,508,032, FPN
    # 3,344,384, kernel stage with semantic FPN 4,442,704, 3 update stages 6,187,248 (80 classes).
    lines = run_tool('model_info', 'experiment=knet_r50_fpn_1x_coco').stdout.rstrip().splitlines()
    assert lines[-1] == 'params: 37482368'
