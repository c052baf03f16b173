from instseg.evaluation.coco import CocoSummary, evaluate, evaluate_files
from instseg.evaluation.metric import InstsegCocoMetric

__all__ = ['CocoSummary', 'evaluate', 'evaluate_files', 'InstsegCocoMetric']
