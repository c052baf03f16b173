from conftest import run_tool


def test_recipe_has_the_reference_parameter_count():
    # mmdet 3.3's mask-rcnn_r50_fpn_1x_coco: 44,396,336 parameters with COCO's 80 classes.
    proc = run_tool('model_info', 'experiment=mask_rcnn_r50_fpn_1x_coco')
    assert proc.stdout.rstrip().splitlines()[-1] == 'params: 44396336'


def test_default_model_summary():
    proc = run_tool('model_info')
    lines = proc.stdout.rstrip().splitlines()
    assert lines[0].startswith('model: mask_rcnn (MaskRCNN), 5 classes')
    assert lines[-1].startswith('params: ') and int(lines[-1].split()[1]) > 1_000_000
