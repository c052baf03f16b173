#!/usr/bin/env python
"""Evaluate a COCO results file: python tools/evaluate.py gt=GT.json results=RES.json iou_type=segm out=FILE"""
import json

import instseg  # noqa: F401  (first: faster-coco-eval stands in for pycocotools)
from instseg.cli import main
from instseg.evaluation import evaluate_files


def run(cfg):
    summary = evaluate_files(cfg.gt, cfg.results, cfg.iou_type)
    print(summary.text, end='')
    print(summary.table())
    if cfg.out:
        with open(cfg.out, 'w') as f:
            json.dump({cfg.iou_type: summary.stats, 'classwise': {cfg.iou_type: summary.per_class}}, f, indent=2)
        print(f'written: {cfg.out}')


if __name__ == '__main__':
    main('evaluate', run)
