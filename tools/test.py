#!/usr/bin/env python
"""Test a checkpoint: python tools/test.py checkpoint=PATH [overrides] [format_only=true]."""
import instseg  # noqa: F401  (first: faster-coco-eval stands in for pycocotools)
from instseg.cli import main
from instseg.engine.runner import run_test

if __name__ == '__main__':
    main('test', run_test)
