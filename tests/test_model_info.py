import pytest
from conftest import run_tool

from instseg.cli import compose
from instseg.models import build_model


def test_recipe_has_the_reference_parameter_count():
    # mmdet 3.3's mask-rcnn_r50_fpn_1x_coco: 44,396,336 parameters with COCO's 80 classes.
    proc = run_tool('model_info', 'experiment=mask_rcnn_r50_fpn_1x_coco')
    assert proc.stdout.rstrip().splitlines()[-1] == 'params: 44396336'


@pytest.mark.parametrize('experiment, params', [
    ('cascade_mask_rcnn_r50_fpn_1x_coco', 77_324_606),      # mmdet 3.3's cascade-mask-rcnn_r50_fpn_1x_coco
    ('htc_r50_fpn_1x_coco', 80_258_293),                    # htc_r50_fpn_1x_coco
    ('htc_without_semantic_r50_fpn_1x_coco', 77_456_190),   # htc-without-semantic_r50_fpn_1x_coco
    ('condinst_r50_fpn_1x_coco', 34_164_299),               # condinst_r50_fpn_ms-poly-90k_coco_instance
])
def test_recipes_build_mmdets_reference_networks(experiment, params):
    model = build_model(compose('train', [f'experiment={experiment}']))
    assert sum(p.numel() for p in model.parameters()) == params


def test_default_model_summary():
    proc = run_tool('model_info')
    lines = proc.stdout.rstrip().splitlines()
    assert lines[0].startswith('model: mask_rcnn (MaskRCNN), 5 classes')
    assert lines[-1].startswith('params: ') and int(lines[-1].split()[1]) > 1_000_000
