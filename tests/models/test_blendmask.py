"""BlendMask: the blender's arithmetic, loss and predict modes on tiny widths, and the config path."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_SYNTHETIC, run_tool
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmengine.structures import InstanceData

from instseg.cli import compose
from instseg.config import to_mmengine
from instseg.models import build_model
from instseg.models.blendmask import BlendMask
from instseg.models.blendmask.blender import blend, blend_loss, crop_bases
from instseg.models.blendmask.mask_head import semantic_targets

# Narrow enough for a few seconds on CPU; GN's 32 groups need FPN widths that are multiples of 32.
TINY = ['model.backbone.base_channels=8', 'model.neck.out_channels=32', 'model.bbox_head.stacked_convs=1',
        'model.mask_head.basis_module.channels=16', 'model.mask_head.basis_module.num_convs=1']


def tiny_model(*overrides):
    torch.manual_seed(0)
    return build_model(compose('train', ['model=blendmask', *SMALL_SYNTHETIC, *TINY, *overrides]))


# ----------------------------------------------------------------------------- blender
def test_blender_shapes():
    bases = torch.randn(2, 4, 16, 16)
    boxes = [torch.tensor([[0., 0., 32., 32.], [8., 8., 40., 60.], [1., 2., 3., 4.]]),
             torch.tensor([[10., 10., 50., 30.], [0., 0., 64., 64.]])]
    crops = crop_bases(bases, boxes, resolution=8, stride=4)
    assert crops.shape == (5, 4, 8, 8)
    assert blend(crops, torch.randn(5, 4 * 3 * 3), attention_size=3).shape == (5, 8, 8)
    assert crop_bases(bases, [torch.zeros(0, 4), torch.zeros(0, 4)], 8, 4).shape == (0, 4, 8, 8)


def test_blender_attention_is_a_softmax_over_bases():
    crops, attentions = torch.randn(3, 4, 8, 8), torch.randn(3, 4 * 2 * 2)
    # Equal bases: any per-pixel weights summing to 1 over K give that basis back.
    assert torch.allclose(blend(crops[:, :1].expand(-1, 4, -1, -1), attentions, 2), crops[:, 0], atol=1e-5)
    # The weights, recovered with one-hot bases, are each pixel's softmax over K of the attentions.
    one_hot = torch.eye(4)[:, :, None, None].expand(4, 4, 8, 8)
    weights = torch.stack([blend(one_hot[k].expand(3, -1, -1, -1), attentions, 2) for k in range(4)], 1)
    assert torch.allclose(weights.sum(dim=1), torch.ones(3, 8, 8), atol=1e-5)
    expected = F.interpolate(attentions.view(3, 4, 2, 2), (8, 8), mode='bilinear', align_corners=False).softmax(1)
    assert torch.allclose(weights, expected, atol=1e-5)
    # A dominant attention picks its basis.
    picked = torch.full((3, 4, 2, 2), -50.0)
    picked[:, 2] = 50.0
    assert torch.allclose(blend(crops, picked.flatten(1), 2), crops[:, 2], atol=1e-4)


def test_blended_crop_is_aligned_with_the_box():
    region = torch.zeros(32, 32)
    region[8:20, 4:16] = 1  # rows y 8..20, columns x 4..16
    bases = region.expand(1, 4, 32, 32)
    attentions = torch.randn(2, 4 * 14 * 14)
    boxes = [torch.tensor([[0., 0., 32., 32.], [4., 8., 16., 20.]])]
    whole = blend(crop_bases(bases, boxes, resolution=32, stride=1), attentions, 14)[0]
    assert torch.allclose(whole, region, atol=1e-5)  # pixel for pixel, no shift
    inside = blend(crop_bases(bases, boxes, resolution=12, stride=1), attentions, 14)[1]
    assert torch.allclose(inside, torch.ones(12, 12), atol=1e-5)  # the box is the region
    shifted = blend(crop_bases(bases, [boxes[0][1:] + 2], resolution=12, stride=1), attentions[1:], 14)[0]
    # The box moved by 2 px down-right: the region fills its top-left 10 x 10, nothing beyond.
    assert torch.allclose(shifted[:10, :10], torch.ones(10, 10)) and shifted[10:].sum() == shifted[:, 10:].sum() == 0
    # At the bases' 1/4 scale, a box over the whole image is their bilinear x4 upsampling.
    coarse = torch.randn(1, 4, 8, 8)
    crop = crop_bases(coarse, [torch.tensor([[0., 0., 32., 32.]])], 32, stride=4)
    assert torch.allclose(crop, F.interpolate(coarse, scale_factor=4, mode='bilinear', align_corners=False),
                          atol=1e-5)


def test_blend_loss_is_the_weighted_mean_of_per_mask_bce():
    logits, targets = torch.randn(3, 4, 4), (torch.rand(3, 4, 4) > 0.5).float()
    weights = torch.tensor([0.5, 1.0, 0.0])
    per_mask = [F.binary_cross_entropy_with_logits(logits[i], targets[i]) for i in range(3)]
    expected = (0.5 * per_mask[0] + per_mask[1]) / 1.5
    assert torch.allclose(blend_loss(logits, targets, weights, avg_factor=1.5), expected)


# ----------------------------------------------------------------------------- the detector
def batch(model, shapes, objects, training=True):
    """Images and data samples through the model's preprocessor. ``objects``: per image, a list of
    (x0, y0, x1, y1, label) rectangles; ``shapes``: (ori_h, ori_w, h, w) per image."""
    inputs, samples = [], []
    for (ori_h, ori_w, h, w), rects in zip(shapes, objects):
        masks = np.zeros((len(rects), h, w), dtype=np.uint8)
        for i, (x0, y0, x1, y1, _) in enumerate(rects):
            masks[i, y0:y1, x0:x1] = 1
        gt = InstanceData(bboxes=torch.tensor([r[:4] for r in rects], dtype=torch.float32).reshape(-1, 4),
                          labels=torch.tensor([r[4] for r in rects], dtype=torch.long),
                          masks=BitmapMasks(masks, h, w))
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(ori_h, ori_w),
                                             scale_factor=(w / ori_w, h / ori_h)))
        sample.gt_instances = gt
        samples.append(sample)
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
    return model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training=training)


def test_loss_mode_with_an_image_without_ground_truth():
    model = tiny_model()
    model.train()
    data = batch(model, [(64, 64, 64, 64), (64, 64, 64, 64)],
                 [[(4, 6, 30, 40, 1), (36, 20, 60, 44, 3)], []])
    losses = model(**data, mode='loss')
    assert {'loss_cls', 'loss_bbox', 'loss_centerness', 'loss_mask', 'loss_semantic'} <= set(losses)
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert losses['loss_mask'].item() > 0
    sum(losses.values()).backward()
    basis_grad = model.mask_head.basis_module.refine[0].conv.weight.grad
    top_grad = model.bbox_head.top_layer.weight.grad
    assert basis_grad is not None and basis_grad.abs().sum() > 0
    assert top_grad is not None and top_grad.abs().sum() > 0


def test_top_layer_at_given_locations_equals_the_conv_there():
    head = tiny_model().bbox_head
    torch.nn.init.normal_(head.top_layer.weight)  # the normal(0.01) init would pass a wrong window too
    torch.nn.init.normal_(head.top_layer.bias)
    towers = [torch.randn(3, head.feat_channels, h, w) for h, w in [(6, 5), (3, 3), (2, 1)]]
    everywhere = torch.cat([head.top_layer(t).flatten(2).transpose(1, 2) for t in towers], 1)  # (B, points, K*M*M)
    image = torch.tensor([0, 2, 1, 1, 0, 2, 1])
    point = torch.tensor([0, 4, 29, 30, 38, 40, 17])  # level 0's corners and an inner point, level 1's ends, level 2's last
    assert torch.allclose(head.top_layer_at(towers, image, point), everywhere[image, point], atol=1e-4)
    assert head.top_layer_at(towers, image[:0], point[:0]).shape == (0, everywhere.shape[-1])


def test_semantic_targets_paint_the_later_instance_where_masks_overlap():
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, :4, :4] = 1
    masks[1, 2:6, 2:6] = 1
    gt = InstanceData(labels=torch.tensor([3, 1]), masks=BitmapMasks(masks, 8, 8))
    empty = InstanceData(labels=torch.zeros(0, dtype=torch.long), masks=BitmapMasks(np.zeros((0, 8, 8), np.uint8), 8, 8))
    maps = semantic_targets([gt, empty], (8, 8))
    expected = torch.zeros(8, 8, dtype=torch.long)
    expected[:4, :4] = 4        # label 3 + 1
    expected[2:6, 2:6] = 2      # the later instance (label 1) where they overlap
    assert torch.equal(maps[0], expected) and not maps[1].any()
    assert semantic_targets([gt], (4, 4))[0].tolist()[0] == [4, 4, 0, 0]  # nearest-downsampled


def test_semantic_loss_switches_off():
    model = tiny_model('model.mask_head.basis_module.semantic_loss=null')
    assert model.mask_head.basis_module.semantic_head is None
    model.train()
    data = batch(model, [(64, 64, 64, 64)] * 2, [[(4, 6, 30, 40, 1)], [(20, 20, 50, 40, 2)]])
    losses = model(**data, mode='loss')
    assert 'loss_semantic' not in losses and math.isfinite(losses['loss_mask'].item())


def test_predict_gives_masks_at_the_original_size():
    model = tiny_model()
    model.eval()
    model.bbox_head.test_cfg['score_thr'] = 0.0  # an untrained head scores below the reference threshold
    data = batch(model, [(96, 80, 64, 53), (40, 60, 64, 96)], [[(4, 6, 30, 40, 1)], []], training=False)
    with torch.no_grad():
        results = model(**data, mode='predict')
    for sample, (ori_h, ori_w) in zip(results, [(96, 80), (40, 60)]):
        pred = sample.pred_instances
        assert 0 < len(pred) <= 100
        assert pred.masks.dtype == torch.bool and pred.masks.shape == (len(pred), ori_h, ori_w)
        assert pred.bboxes.shape == (len(pred), 4) and pred.scores.shape == pred.labels.shape == (len(pred),)
        assert 'attentions' not in pred
        assert pred.bboxes[:, 2].max() <= ori_w + 1e-3 and pred.bboxes[:, 3].max() <= ori_h + 1e-3


# ----------------------------------------------------------------------------- configs
def test_builds_through_the_registry():
    cfg = compose('train', ['model=blendmask', *SMALL_SYNTHETIC])
    model = build_model(cfg)
    assert isinstance(model, BlendMask)
    assert model.bbox_head.top_layer.out_channels == 4 * 14 * 14
    assert list(cfg.model.neck.in_channels) == [32, 64, 128, 256]  # the CPU fit's half-width ResNet-18


@pytest.mark.parametrize('recipe', ['blendmask_r50_fpn_1x_coco', 'blendmask_r50_fpn_ms_3x_coco'])
def test_recipes_compose(recipe):
    cfg = compose('train', [f'experiment={recipe}'])
    assert cfg.model.name == 'blendmask' and cfg.model.backbone.depth == 50 and cfg.model.neck.out_channels == 256
    assert cfg.schedule.optimizer.lr == 0.01 and cfg.schedule.warmup_iters == 1000
    assert to_mmengine(cfg).optim_wrapper.paramwise_cfg == {'norm_decay_mult': 0.0}  # WEIGHT_DECAY_NORM 0
    assert [s[1] for s in cfg.data.train_scales] == [640, 672, 704, 736, 768, 800]
    iters, steps = (90_000, [60_000, 80_000]) if '1x' in recipe else (270_000, [210_000, 250_000])
    assert not cfg.schedule.by_epoch and cfg.schedule.batch_size == 2 and cfg.schedule.base_batch_size == 16
    assert cfg.schedule.max_iters == iters and list(cfg.schedule.steps) == steps


def test_model_info_tool():
    lines = run_tool('model_info', 'model=blendmask', *SMALL_SYNTHETIC).stdout.rstrip().splitlines()
    assert lines[0].startswith('model: blendmask (BlendMask), 5 classes')
    assert int(lines[-1].split()[1]) > 1_000_000
