#!/usr/bin/env python
"""Build a model from the config and print its parts and size: python tools/model_info.py [overrides].

Needs no data on disk. The last line is exactly `params: N` (all parameters, frozen ones included).
"""
import sys

import instseg  # noqa: F401  (first: faster-coco-eval stands in for pycocotools)
from instseg.cli import compose, fail
from instseg.errors import ConfigError
from instseg.models import build_model


def main(overrides):
    try:
        cfg = compose('train', overrides)
        model = build_model(cfg)
    except ConfigError as e:
        fail(e)
    print(f'model: {cfg.model.name} ({type(model).__name__}), {cfg.data.num_classes} classes')
    for name, child in model.named_children():
        count = sum(p.numel() for p in child.parameters())
        if count:
            print(f'  {name:<20} {type(child).__name__:<28} {count:>12,}')
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'trainable: {trainable}')
    print(f'params: {sum(p.numel() for p in model.parameters())}')


if __name__ == '__main__':
    main(sys.argv[1:])
