"""instseg: Hydra-composed instance segmentation experiments on MMDetection and MMEngine."""
# faster-coco-eval must stand in for pycocotools before mmdet imports it, so mmdet's CocoMetric
# evaluates with it (same numbers, several times faster).
import faster_coco_eval

faster_coco_eval.init_as_pycocotools()

__version__ = '0.1.0'
