"""Every detector as the config builds it (CPU fit) trains on batches with and without ground truth and
predicts masks at the original image size; Cascade's stages and HTC's semantic branch as configured."""
import pytest
import torch
from conftest import det_sample
from mmengine.registry import init_default_scope

from instseg.cli import compose, group_options
from instseg.models import build_model

DETECTORS = group_options('model')
SEMANTIC_CLASSES = 6  # the synthetic set's: 5 shapes and background


@pytest.fixture(autouse=True)
def _setup(one_thread):
    init_default_scope('instseg')
    torch.manual_seed(0)


def build(name, *overrides):
    return build_model(compose('train', [f'model={name}', *overrides]))


def images(count, size=64):
    return [torch.randint(0, 256, (3, size, size), dtype=torch.uint8) for _ in range(count)]


def loss_batch(model, samples):
    return model.data_preprocessor(dict(inputs=images(len(samples)), data_samples=samples), training=True)


def with_gt(**kw):
    return det_sample([[4, 6, 30, 40], [32, 20, 60, 58]], [0, 2], **kw)


def without_gt(**kw):
    return det_sample([], [], **kw)


@pytest.mark.parametrize('name', DETECTORS)
@pytest.mark.parametrize('batch', ['one_image_has_gt', 'no_image_has_gt'])
def test_trains_on_images_without_ground_truth(name, batch):
    model = build(name)
    semantic = dict(num_semantic_classes=SEMANTIC_CLASSES) if name == 'htc' else {}
    samples = [with_gt(**semantic), without_gt(**semantic)] if batch == 'one_image_has_gt' \
        else [without_gt(**semantic)]
    total, log_vars = model.parse_losses(model(**loss_batch(model, samples), mode='loss'))
    assert all(torch.isfinite(torch.as_tensor(v)) for v in log_vars.values()), log_vars
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


# Every candidate kept, so an untrained model still predicts something to check.
KEEP_ALL = {'condinst': ['model.test_cfg.score_thr=0.0'], 'blendmask': ['model.test_cfg.score_thr=0.0'],
            'knet': []}


@pytest.mark.parametrize('name', DETECTORS)
def test_predicts_masks_at_the_original_image_size(name):
    model = build(name, *KEEP_ALL.get(name, ['model.test_cfg.rcnn.score_thr=0.0'])).eval()
    batch = model.data_preprocessor(dict(inputs=images(1), data_samples=[without_gt(ori_shape=(32, 48))]))
    with torch.no_grad():
        result = model(**batch, mode='predict')[0].pred_instances
    assert len(result) > 0
    assert result.masks.shape[1:] == (32, 48) and result.masks.dtype == torch.bool
    assert result.bboxes.shape == (len(result), 4) and (result.bboxes[:, 2:] <= torch.tensor([48, 32])).all()


def test_cascade_builds_one_head_per_stage_from_the_written_once_template():
    model = build('cascade_mask_rcnn')
    heads = model.roi_head.bbox_head
    assert len(heads) == 3 and model.roi_head.stage_loss_weights == [1, 0.5, 0.25]
    assert [list(h.bbox_coder.stds) for h in heads] == [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1],
                                                        [0.033, 0.033, 0.067, 0.067]]
    assert {h.fc_out_channels for h in heads} == {256}  # the CPU fit edits the template once
    assert [a.pos_iou_thr for a in model.roi_head.bbox_assigner] == [0.5, 0.6, 0.7]


def test_htc_semantic_branch_receives_the_maps_and_learns_from_them():
    model = build('htc')
    assert model.roi_head.with_semantic and model.data_preprocessor.pad_seg
    batch = loss_batch(model, [with_gt(num_semantic_classes=SEMANTIC_CLASSES)] * 2)
    optimizer = torch.optim.SGD(model.roi_head.semantic_head.parameters(), lr=0.05, momentum=0.9)
    seg_losses = []
    for _ in range(15):
        losses = model(**batch, mode='loss')
        seg_losses.append(float(losses['loss_semantic_seg']))
        optimizer.zero_grad()
        losses['loss_semantic_seg'].backward()
        optimizer.step()
    assert seg_losses[-1] < 0.5 * seg_losses[0], seg_losses


def test_htc_without_semantic_has_no_branch_and_needs_no_maps():
    model = build('htc', 'model.semantic=false')
    assert not model.roi_head.with_semantic and not model.data_preprocessor.pad_seg
    losses = model(**loss_batch(model, [with_gt(), without_gt()]), mode='loss')
    assert 'loss_semantic_seg' not in losses
