from instseg.config import COCO_STAT_NAMES
from instseg.engine.hooks import metrics_by_iou_type


def test_metrics_are_grouped_as_metrics_json():
    metrics = {f'coco/{t}_{k}': 0.5 for t in ('bbox', 'segm') for k in COCO_STAT_NAMES}
    metrics.update({'coco/segm_AP/circle': 0.7, 'coco/bbox_AP/circle': 0.6, 'loss': 1.0})
    grouped = metrics_by_iou_type(metrics)
    assert list(grouped['segm']) == list(COCO_STAT_NAMES) and grouped['bbox']['ARl'] == 0.5
    assert grouped['classwise'] == {'segm': {'circle': 0.7}, 'bbox': {'circle': 0.6}}
    assert 'loss' not in grouped
