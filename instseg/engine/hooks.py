"""Hooks instseg adds to every run (see instseg.config.to_mmengine)."""
from __future__ import annotations

import json
import os.path as osp
import random

import numpy as np
import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook

from instseg.config import COCO_STAT_NAMES
from instseg.registry import HOOKS


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Saves Python's, NumPy's and torch's (CPU and CUDA) random states in each checkpoint and
    restores them on resume, which mmengine alone does not (it only re-seeds)."""

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
        if torch.cuda.is_available():
            state['cuda'] = torch.cuda.get_rng_state_all()
        checkpoint.setdefault('meta', {})['rng_state'] = state

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get('meta', {}).get('rng_state')
        if state is None or not runner._resume:  # plain load_from: weights only
            return
        random.setstate(state['python'])
        np.random.set_state(state['numpy'])
        torch.set_rng_state(state['torch'])
        if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state['cuda'])


def metrics_by_iou_type(metrics: dict) -> dict:
    """``{'coco/segm_AP': .5, 'coco/segm_AP/circle': .6, ...}`` -> metrics.json's shape:
    ``{'bbox': {AP, ..., ARl}, 'segm': {...}, 'classwise': {'segm': {'circle': .6}}}``."""
    out, classwise = {}, {}
    for key, value in metrics.items():
        name = key.split('/', 1)[-1] if key.startswith('coco/') else key
        iou_type, _, stat = name.partition('_')
        if iou_type not in ('bbox', 'segm'):
            continue
        if stat in COCO_STAT_NAMES:
            out.setdefault(iou_type, {})[stat] = float(value)
        elif stat.startswith('AP/'):
            classwise.setdefault(iou_type, {})[stat[3:]] = float(value)
    if classwise:
        out['classwise'] = classwise
    return out


@HOOKS.register_module()
class MetricsFileHook(Hook):
    """Writes the latest evaluation to ``work_dir/metrics.json`` (after validation and test)."""

    priority = 'LOWEST'

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._write(runner, metrics, step=runner.iter)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._write(runner, metrics, step=None)

    def _write(self, runner, metrics, step) -> None:
        summary = metrics_by_iou_type(metrics or {})
        if not summary or not is_main_process():
            return
        if step is not None:
            summary['iter'] = step
        with open(osp.join(runner.work_dir, 'metrics.json'), 'w') as f:
            json.dump(summary, f, indent=2)
