"""COCO evaluation of detections, shared by the training metric and tools/evaluate.py.

Runs on whatever ``pycocotools`` is importable as: faster-coco-eval once instseg is imported
(see instseg/__init__.py), the reference implementation otherwise. Same 12 numbers either way.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from instseg.config import COCO_STAT_NAMES
from instseg.errors import ConfigError

IOU_TYPES = ('bbox', 'segm')


@dataclass
class CocoSummary:
    iou_type: str
    stats: dict                                    # COCO_STAT_NAMES -> value, -1 where undefined
    per_class: dict = field(default_factory=dict)  # class name -> AP (IoU .50:.95, all areas)
    text: str = ''                                 # pycocotools' 12-line summary

    def table(self) -> str:
        rows = [f'{"class":<24}{"AP":>8}'] + [f'{name:<24}{ap:8.3f}' for name, ap in self.per_class.items()]
        return '\n'.join(rows)


def evaluate(coco_gt, detections: list, iou_type: str, cat_ids=None, img_ids=None) -> CocoSummary:
    """Evaluates ``detections`` (COCO results dicts) against the COCO object ``coco_gt``."""
    from pycocotools.cocoeval import COCOeval

    if iou_type not in IOU_TYPES:
        raise ConfigError(f"iou_type: '{iou_type}' is not one of: {', '.join(IOU_TYPES)}")
    if iou_type == 'segm':
        # Without boxes, loadRes takes each instance's area from its mask, as COCO defines
        # small/medium/large for masks; with boxes it would use the box area.
        detections = [{k: v for k, v in d.items() if k != 'bbox'} for d in detections]
    coco_dt = coco_gt.loadRes(detections) if detections else None
    if coco_dt is None:  # no detections at all: every statistic is 0 (pycocotools can't load [])
        return CocoSummary(iou_type, {k: 0.0 for k in COCO_STAT_NAMES},
                           {coco_gt.loadCats(c)[0]['name']: 0.0 for c in (cat_ids or coco_gt.getCatIds())})
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    if cat_ids is not None:
        evaluator.params.catIds = list(cat_ids)
    if img_ids is not None:
        evaluator.params.imgIds = list(img_ids)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(v) for name, v in zip(COCO_STAT_NAMES, evaluator.stats)}
    # precision: [IoU thresholds, recall points, classes, area ranges, max detections]
    precision = evaluator.eval['precision']
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[coco_gt.loadCats(cat_id)[0]['name']] = float(np.mean(p)) if p.size else float('nan')
    return CocoSummary(iou_type, stats, per_class, text.getvalue())


def evaluate_files(gt_file: str, results_file: str, iou_type: str) -> CocoSummary:
    """tools/evaluate.py: checks the results file against the ground truth, then evaluates it."""
    from pycocotools.coco import COCO

    for name, path in (('gt', gt_file), ('results', results_file)):
        if not Path(path).is_file():
            raise ConfigError(f'{name}: file not found: {path}')
    try:
        with open(results_file) as f:
            detections = json.load(f)
    except ValueError as e:
        raise ConfigError(f'results: {results_file} is not valid JSON ({e})') from None
    if not isinstance(detections, list):
        raise ConfigError(f'results: {results_file} must hold a list of detections (COCO results format)')
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
    need = 'segmentation' if iou_type == 'segm' else 'bbox'
    lacking = sum(need not in d for d in detections)
    if lacking:
        raise ConfigError(f"results: {lacking} detections in {results_file} have no '{need}' "
                          f'(needed for iou_type={iou_type})')
    unknown_cats = sorted({d['category_id'] for d in detections} - set(coco_gt.getCatIds()))
    if unknown_cats:
        raise ConfigError(f'results: category ids {unknown_cats[:10]} of {results_file} are not in '
                          f'{gt_file} (valid: {sorted(coco_gt.getCatIds())[:20]}...)')
    unknown_imgs = sorted({d['image_id'] for d in detections} - set(coco_gt.getImgIds()))
    if unknown_imgs:
        raise ConfigError(f'results: image ids {unknown_imgs[:10]} of {results_file} are not in {gt_file}')
    return evaluate(coco_gt, detections, iou_type)
