#!/usr/bin/env python
"""Train: python tools/train.py [Hydra overrides], e.g. model=mask_rcnn data=coco schedule=1x."""
import instseg  # noqa: F401  (first: faster-coco-eval stands in for pycocotools)
from instseg.cli import main
from instseg.engine.runner import train

if __name__ == '__main__':
    main('train', train)
