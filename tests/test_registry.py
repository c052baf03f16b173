from mmengine.registry import DefaultScope, init_default_scope

from instseg.registry import HOOKS, METRICS, MODELS, SCOPE


def test_scope_is_a_child_of_mmdet():
    assert SCOPE == 'instseg' and MODELS.parent.scope == 'mmdet'


def test_mmdet_and_instseg_parts_build_from_one_scope():
    init_default_scope('instseg')
    assert DefaultScope.get_current_instance().scope_name == 'instseg'
    assert MODELS.get('MaskRCNN').__module__.startswith('mmdet.')  # found through the parent
    assert METRICS.get('InstsegCocoMetric').__module__ == 'instseg.evaluation.metric'
    assert HOOKS.get('RNGStateHook').__module__ == 'instseg.engine.hooks'
    head = MODELS.build(dict(type='FCNMaskHead', num_convs=1, in_channels=8, conv_out_channels=8, num_classes=3))
    assert type(head).__name__ == 'FCNMaskHead'
