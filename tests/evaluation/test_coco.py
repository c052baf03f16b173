"""COCO evaluation: faster-coco-eval (what instseg runs) must give pycocotools' numbers."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import shared

from instseg.config import COCO_STAT_NAMES
from instseg.errors import ConfigError
from instseg.evaluation import evaluate_files

# The reference: plain pycocotools, in a process where faster-coco-eval never stood in for it.
REFERENCE = textwrap.dedent('''
    import json, sys, contextlib, io
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    assert 'faster_coco_eval' not in sys.modules
    gt_file, det_file, iou_type = sys.argv[1:]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        dets = json.load(open(det_file))
        if iou_type == 'segm':
            dets = [{k: v for k, v in d.items() if k != 'bbox'} for d in dets]
        e = COCOeval(gt, gt.loadRes(dets), iou_type)
        e.evaluate(); e.accumulate(); e.summarize()
    print(json.dumps([float(s) for s in e.stats]))
''')


@pytest.fixture(scope='module')
def detections(tmp_path_factory):
    """Noisy copies of the ground truth (jittered boxes and masks, some wrong classes, random
    scores) plus false positives: a realistic mix of hits and misses across sizes."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    gt_file = shared('tiny_coco') / 'annotations' / 'instances_val2017.json'
    gt = COCO(str(gt_file))
    rng = np.random.default_rng(0)
    cat_ids = gt.getCatIds()
    dets = []
    for ann in gt.loadAnns(gt.getAnnIds(iscrowd=False)):
        img = gt.imgs[ann['image_id']]
        mask = gt.annToMask(ann)
        shift = rng.integers(-3, 4, 2)
        mask = np.roll(mask, tuple(shift), axis=(0, 1))
        for _ in range(2):
            rle = mask_utils.encode(np.asfortranarray(mask))
            x, y, w, h = ann['bbox']
            box = [x + rng.normal(0, 0.05 * w), y + rng.normal(0, 0.05 * h), w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
            cat = ann['category_id'] if rng.random() < 0.85 else int(rng.choice(cat_ids))
            dets.append(dict(image_id=img['id'], category_id=cat, bbox=box, score=float(rng.random()),
                             segmentation=dict(size=rle['size'], counts=rle['counts'].decode())))
            mask = np.roll(mask, (int(img['height'] * 0.3), 0), axis=(0, 1))  # second copy: a miss
    path = tmp_path_factory.mktemp('eval') / 'dets.json'
    path.write_text(json.dumps(dets))
    return gt_file, path


@pytest.mark.parametrize('iou_type', ['bbox', 'segm'])
def test_faster_coco_eval_equals_pycocotools(detections, iou_type):
    gt_file, det_file = detections
    ours = evaluate_files(str(gt_file), str(det_file), iou_type)
    reference = subprocess.run([sys.executable, '-c', REFERENCE, str(gt_file), str(det_file), iou_type],
                               capture_output=True, text=True, check=True)
    expected = json.loads(reference.stdout)
    assert list(ours.stats) == list(COCO_STAT_NAMES)
    assert 0.1 < ours.stats['AP'] < 0.9  # a mix of hits and misses, not a degenerate case
    assert [ours.stats[k] for k in COCO_STAT_NAMES] == pytest.approx(expected, abs=1e-12)
    assert len(ours.per_class) == 80


def test_results_naming_unknown_categories_are_refused(detections, tmp_path):
    gt_file, det_file = detections
    dets = json.loads(det_file.read_text())
    dets[0]['category_id'] = 999
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps(dets))
    with pytest.raises(ConfigError, match=r'category ids \[999\]'):
        evaluate_files(str(gt_file), str(bad), 'bbox')
    with pytest.raises(ConfigError, match='file not found'):
        evaluate_files(str(gt_file), str(tmp_path / 'missing.json'), 'bbox')
