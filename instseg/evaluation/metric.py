"""mmdet's CocoMetric with standard COCO statistics: all 12 at full precision, maxDets 1/10/100,
and AP per class, under the names metrics.json uses (bbox_AP, segm_AP50, segm_AP/<class>, ...)."""
from __future__ import annotations

import os.path as osp
import tempfile

from mmdet.evaluation import CocoMetric
from mmengine.fileio import load
from mmengine.logging import MMLogger

from instseg.evaluation.coco import evaluate
from instseg.registry import METRICS


@METRICS.register_module()
class InstsegCocoMetric(CocoMetric):
    """Keeps mmdet's conversion of predictions to COCO results (``process``, ``results2json``) and
    evaluates them with :func:`instseg.evaluation.coco.evaluate`, the same code tools/evaluate.py uses."""

    def compute_metrics(self, results: list) -> dict:
        logger = MMLogger.get_current_instance()
        _, predictions = zip(*results)
        if self.cat_ids is None:
            self.cat_ids = self._coco_api.get_cat_ids(cat_names=self.dataset_meta['classes'])
        if self.img_ids is None:
            self.img_ids = self._coco_api.get_img_ids()
        with tempfile.TemporaryDirectory() as tmp:
            prefix = self.outfile_prefix or osp.join(tmp, 'results')
            result_files = self.results2json(predictions, prefix)
            if self.format_only:
                logger.info(f'results written: {", ".join(sorted(set(result_files.values())))}')
                return {}
            metrics = {}
            for iou_type in self.metrics:
                summary = evaluate(self._coco_api, load(result_files[iou_type]), iou_type,
                                   cat_ids=self.cat_ids, img_ids=self.img_ids)
                logger.info(f'COCO {iou_type} evaluation:\n{summary.text}\n{summary.table()}')
                metrics.update({f'{iou_type}_{k}': v for k, v in summary.stats.items()})
                if self.classwise:
                    metrics.update({f'{iou_type}_AP/{name}': ap for name, ap in summary.per_class.items()})
        return metrics
