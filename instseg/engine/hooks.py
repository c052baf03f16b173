"""Hooks instseg adds to every run (see instseg.config.to_mmengine)."""
from __future__ import annotations

import json
import logging
import os
import os.path as osp
import random
import signal
import sys
import threading
from glob import escape, glob

import numpy as np
import torch
from mmdet.engine.hooks import CheckInvalidLossHook
from mmengine.dist import all_reduce, get_world_size, is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from instseg.config import COCO_STAT_NAMES
from instseg.engine.checkpoint import (CheckpointLoadError, CheckpointSaveError, mismatched_keys, publish,
                                       temporary_path, write_atomically)
from instseg.engine.loops import batches_into_epoch
from instseg.engine.optim import merge_saved_param_groups
from instseg.registry import HOOKS


class NonFiniteError(Exception):
    """A loss or weight became NaN or infinite; the message is one line naming it and the last good
    checkpoint."""


class TrainingInterrupted(SystemExit):
    """SIGINT or SIGTERM stopped training after saving a checkpoint: exits with 128 + the signal
    number (130, 143), as a shell reports a process that the signal ended."""


def last_checkpoint(work_dir: str) -> str | None:
    """The checkpoint ``resume=true`` continues from: mmengine's ``work_dir/last_checkpoint``."""
    path = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def _last_good(runner) -> str:
    path = last_checkpoint(runner.work_dir)
    return f'the last good checkpoint is {path}' if path else 'no checkpoint was saved before it'


def bare_model(runner) -> torch.nn.Module:
    return runner.model.module if is_model_wrapper(runner.model) else runner.model


# ----------------------------------------------------------------------------- random states
def _rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


class RestoreAfterReplay:
    """Stands in for IterBasedTrainLoop's (and ResumableEpochBasedTrainLoop's) batch iterator on
    resume. The loop reaches the checkpoint's place in the data by taking the batches trained before
    it: skipped unloaded (instseg.engine.loops) or, with a batch sampler that cannot skip, fetched
    (replayed), which draws random numbers the uninterrupted run drew before the checkpoint: the
    pipeline's flips (in this process with num_workers=0) and a new epoch's DataLoader seed. So the
    states saved with the checkpoint are restored after them, right before the first new batch."""

    def __init__(self, iterator, replayed: int, state: dict) -> None:
        self._iterator, self._replayed, self._state = iterator, replayed, state

    def __iter__(self):
        return self

    def __next__(self):
        if self._replayed > 0:
            self._replayed -= 1
        elif self._state is not None:
            set_rng_state(self._state)
            self._state = None
        return next(self._iterator)


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Saves Python's, NumPy's and torch's (CPU and CUDA) random states in each checkpoint and
    restores them on resume, which mmengine alone does not (it only re-seeds), where the
    uninterrupted run had them: before the first batch after the checkpoint. Validation leaves them
    as it found them, so a resumed run (which skips the validation right after its checkpoint) and
    a run evaluated more or less often train the same. With ``deterministic=true`` on CPU, a
    resumed run ends with the weights of the uninterrupted one, bit for bit."""

    def __init__(self) -> None:
        self._before_val = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # During validation (mmengine's save_best), training continues from the state before it.
        state = self._before_val or _rng_state()
        checkpoint.setdefault('meta', {})['rng_state'] = state

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get('meta', {}).get('rng_state')
        if state is None or not runner._resume:  # plain load_from: weights only
            return
        loop = getattr(runner, 'train_loop', None)
        if hasattr(loop, 'dataloader_iterator'):  # iteration-based: mmengine replays the data first
            loop.dataloader_iterator = RestoreAfterReplay(loop.dataloader_iterator,
                                                          checkpoint['meta']['iter'], state)
        elif hasattr(loop, 'rng_state_after_skip') and \
                batches_into_epoch(checkpoint['meta']['iter'], checkpoint['meta']['epoch'], loop.dataloader) > 0:
            loop.rng_state_after_skip = state  # mid-epoch: after the epoch's trained batches are skipped
        else:  # epoch-based, at an epoch's end: the next epoch starts afresh
            set_rng_state(state)

    def before_val(self, runner) -> None:
        self._before_val = _rng_state()

    def after_val(self, runner) -> None:
        if self._before_val is not None:
            set_rng_state(self._before_val)
            self._before_val = None


# ----------------------------------------------------------------------------- safe checkpoints
class _StopAtFailedFetch:
    """Stands in for IterBasedTrainLoop's batch iterator while training. Ctrl-C reaches the data
    loader's worker processes too, which quit, so fetching the next batch fails; with a stop
    requested, that failure becomes the stop (the model is between iterations)."""

    def __init__(self, iterator, hook: 'SafeCheckpointHook', runner) -> None:
        self._iterator, self._hook, self._runner = iterator, hook, runner

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._iterator)
        except Exception:
            if not self._hook.stop_signal:
                raise
            self._hook.stop(self._runner, finished=self._runner.iter)


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """mmengine's CheckpointHook, made so that nothing trained is lost:

    - a checkpoint, then ``last_checkpoint``, is written atomically (``publish``/``write_atomically``),
      and checkpoints beyond ``max_keep_ckpts`` are removed only after the new one is complete: a
      kill or a full disk while saving leaves the previous checkpoint loadable and named by
      ``last_checkpoint``; temporary files a kill left behind are removed when training starts;
    - a failed write (e.g. a full disk) stops the run with one line naming both checkpoints;
    - weights that are not finite are never saved: the run stops, naming the tensor;
    - SIGINT (Ctrl-C) and SIGTERM save the iteration being trained once it ends, then exit with
      130 / 143 (``TrainingInterrupted``); a second signal stops at once. On an epoch-based schedule
      the checkpoint is ``epoch_<E>_iter_<I>.pth``, resumed inside epoch E (ResumableEpochBasedTrainLoop).

    Remote storage (another file backend than local files) is written by mmengine as it is.
    """

    STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stop_signal = 0
        self._previous_handlers: dict = {}
        self._saved_step = None

    # -------------------------------------------------------------- saving
    def _save_checkpoint_with_step(self, runner, step, meta):
        if not isinstance(self.file_backend, LocalBackend):
            return super()._save_checkpoint_with_step(runner, step, meta)
        what = f'{"epoch" if self.by_epoch else "iteration"} {step}'
        self._check_finite(runner, what)
        outdated = self._keep_step(runner, step)
        self._write(runner, self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(step)), meta)
        self._saved_step = step
        if is_main_process() and outdated is not None:
            old = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(outdated))
            if osp.isfile(old):
                os.remove(old)

    def _write_checkpoint(self, runner, filename: str, epoch: int, iteration: int) -> None:
        """A checkpoint outside the schedule's interval (a stop signal's), kept beside the others."""
        self._check_finite(runner, f'iteration {iteration}')
        self._write(runner, self.file_backend.join_path(self.out_dir, filename), dict(epoch=epoch, iter=iteration))

    @staticmethod
    def _check_finite(runner, what: str) -> None:
        for name, value in bare_model(runner).state_dict().items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                kind = 'nan' if value.isnan().any() else 'inf'
                raise NonFiniteError(f'the weights hold {kind} after {what} ({name}); no checkpoint is '
                                     f'saved with them; {_last_good(runner)}')

    def _write(self, runner, path: str, meta: dict) -> None:
        """Writes the checkpoint at ``path`` atomically and points ``last_checkpoint`` at it."""
        self.last_ckpt = path
        runner.message_hub.update_info('last_ckpt', path)
        previous = last_checkpoint(runner.work_dir)
        tmp, error = None, None
        try:
            if is_main_process():  # mmengine writes on the main process only
                tmp = temporary_path(path)
            runner.save_checkpoint(self.out_dir, osp.basename(tmp or path), self.file_client_args,
                                   save_optimizer=self.save_optimizer, save_param_scheduler=self.save_param_scheduler,
                                   meta=meta, by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args)
            if tmp:
                publish(tmp, path)
                write_atomically(osp.join(runner.work_dir, 'last_checkpoint'), path)
        except OSError as e:
            reason = e.strerror[:1].lower() + e.strerror[1:] if e.strerror else str(e)
            kept = f'the previous checkpoint {previous} is intact' if previous else 'no checkpoint was saved before'
            error = f'could not save checkpoint {path}: {reason}; {kept}'
        finally:
            if tmp and osp.exists(tmp):  # not published: a failure
                os.remove(tmp)
        if get_world_size() > 1:  # the other ranks stop too, rather than wait for the main one
            failed = torch.tensor(int(error is not None))
            all_reduce(failed, op='max')
            error = error or (f'could not save checkpoint {path} (see the main process)' if failed else None)
        if error:
            raise CheckpointSaveError(error)

    def _keep_step(self, runner, step):
        """mmengine's ``max_keep_ckpts`` book-keeping; returns the step whose checkpoint is now
        outdated, to remove once the new one is complete (mmengine removes it before saving)."""
        if self.max_keep_ckpts <= 0 or (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            return None
        outdated = self.keep_ckpt_ids.popleft() if len(self.keep_ckpt_ids) == self.max_keep_ckpts else None
        self.keep_ckpt_ids.append(step)
        runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        return outdated

    # -------------------------------------------------------------- stopping on signals
    def before_train(self, runner) -> None:
        super().before_train(runner)
        if is_main_process() and isinstance(self.file_backend, LocalBackend):
            leftovers = glob(osp.join(escape(self.out_dir), '.*.pth.*.tmp'))  # temporary_path's names
            for tmp in leftovers + glob(osp.join(escape(runner.work_dir), '.last_checkpoint.*.tmp')):
                os.remove(tmp)
        self.stop_signal = 0
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = {s: signal.signal(s, self._request_stop) for s in self.STOP_SIGNALS}
        loop = runner.train_loop
        if hasattr(loop, 'dataloader_iterator'):
            loop.dataloader_iterator = _StopAtFailedFetch(loop.dataloader_iterator, self, runner)

    def after_train(self, runner) -> None:
        super().after_train(runner)
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def _request_stop(self, signum, frame) -> None:
        self.stop_signal = signum
        previous = self._previous_handlers.get(signum)
        # The next one stops at once, even where the process was started ignoring it (a background job).
        signal.signal(signum, previous if previous not in (None, signal.SIG_IGN) else signal.SIG_DFL)
        os.write(2, f'\n{signal.Signals(signum).name}: saving a checkpoint when this iteration ends, then '
                    'stopping (send it again to stop at once)\n'.encode())

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        super().after_train_iter(runner, batch_idx, data_batch, outputs)
        if self._stop_requested():
            self.stop(runner, finished=runner.iter + 1)

    def after_val(self, runner) -> None:
        if self._previous_handlers and self._stop_requested():  # a signal during training's validation
            self.stop(runner, finished=runner.iter)

    def _stop_requested(self) -> bool:
        if get_world_size() > 1:  # every rank stops at the same point
            flag = torch.tensor(self.stop_signal)
            all_reduce(flag, op='max')
            self.stop_signal = int(flag)
        return bool(self.stop_signal)

    def stop(self, runner, finished: int) -> None:
        """Saves the state after ``finished`` iterations (unless saved already) and exits."""
        self._restore_handlers()
        name = signal.Signals(self.stop_signal).name
        if self.by_epoch:
            batches = runner.train_dataloader
            epoch_ended = batches_into_epoch(finished, runner.epoch, batches) == len(batches)
            if epoch_ended and self._saved_step == runner.epoch + 1:
                pass  # that epoch's checkpoint is the state already
            elif epoch_ended:  # mmengine counts the epoch as done once after_train_epoch ran
                self._write_checkpoint(runner, f'epoch_{runner.epoch + 1}.pth', runner.epoch + 1, finished)
            else:  # inside epoch E (runner.epoch + 1): resumed there by ResumableEpochBasedTrainLoop
                self._write_checkpoint(runner, f'epoch_{runner.epoch + 1}_iter_{finished}.pth', runner.epoch,
                                       finished)
        elif self._saved_step != finished:
            self._save_checkpoint_with_step(runner, finished, meta=dict(epoch=runner.epoch, iter=finished))
        message = (f'stopped by {name} after iteration {finished}: saved {self.last_ckpt}; continue with '
                   f'resume=true work_dir={runner.work_dir}')
        if is_main_process():
            print(message, file=sys.stderr, flush=True)
        raise TrainingInterrupted(128 + self.stop_signal)


# ----------------------------------------------------------------------------- faults
@HOOKS.register_module()
class NonFiniteLossHook(CheckInvalidLossHook):
    """mmdet's CheckInvalidLossHook, every iteration, stopping with one line that names the loss
    terms that are NaN or infinite and the last good checkpoint (not an assert, which ``-O`` drops).
    It runs before the CheckpointHook, so the weights this iteration's step spoilt are never saved."""

    priority = 'ABOVE_NORMAL'

    def __init__(self, interval: int = 1) -> None:
        super().__init__(interval)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if not self.every_n_train_iters(runner, self.interval) or not isinstance(outputs, dict):
            return
        names = [k for k, v in outputs.items() if 'loss' in k and torch.is_tensor(v)]
        if not names:
            return
        values = torch.stack([outputs[k].detach().float().reshape(()) for k in names])
        kinds = torch.where(values.isnan(), 2, torch.where(values.isinf(), 1, 0))
        if get_world_size() > 1:  # every rank stops at the same iteration
            all_reduce(kinds, op='max')
        bad = {k: ('nan', 'inf')[2 - c] for k, c in zip(names, kinds.tolist()) if c}
        if not bad:
            return
        terms = {k: v for k, v in bad.items() if k != 'loss'} or bad  # the total only if no term is
        raise NonFiniteError(', '.join(f'{k} is {v}' for k, v in terms.items()) +
                             f' at iteration {runner.iter + 1}; {_last_good(runner)}')


@HOOKS.register_module()
class CheckpointMatchHook(Hook):
    """Refuses a checkpoint made by another model than the config's (missing or unknown tensors,
    other shapes), which mmengine loads with a warning, leaving those tensors at their random
    initialisation (an AP of 0 after testing). With ``partial_load_from``, ``load_from`` may give
    tensors of another shape (fine-tuning to other classes): they keep their initialisation, with a
    warning, unless they are most of the model."""

    def __init__(self, partial_load_from: bool = False) -> None:
        self.partial_load_from = partial_load_from

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = bare_model(runner)
        diff = mismatched_keys(checkpoint, model)
        if not any(diff.values()):
            return
        resuming = runner._resume
        path = runner._load_from or (last_checkpoint(runner.work_dir) if resuming else None)
        reshaped = ', '.join(f'{k}: {list(a)} in the checkpoint, {list(b)} in the model'
                             for k, a, b in diff['shape'][:3]) + (', ...' if len(diff['shape']) > 3 else '')
        if self.partial_load_from and not resuming and not diff['missing'] and not diff['unexpected'] \
                and len(diff['shape']) * 2 < len(model.state_dict()):
            print_log(f'load_from {path}: {len(diff["shape"])} tensors of another shape keep their '
                      f'initialisation ({reshaped})', logger='current', level=logging.WARNING)
            return
        parts = [f'{len(diff["missing"])} tensors of the model are missing ({_first(diff["missing"])})'
                 if diff['missing'] else '',
                 f'{len(diff["unexpected"])} are unknown to it ({_first(diff["unexpected"])})'
                 if diff['unexpected'] else '',
                 f'{len(diff["shape"])} have another shape ({reshaped})' if diff['shape'] else '']
        raise CheckpointLoadError(f'checkpoint {path} was saved from another model than this config builds: '
                                  + ', '.join(p for p in parts if p) +
                                  '; the config must match the run that saved it (its config.yaml)')


@HOOKS.register_module()
class MergedParamGroupsHook(Hook):
    """Resumes a run saved with one optimizer group per parameter (instseg before its constructor merged
    them, instseg.engine.optim) into the merged groups, its LR schedule included."""

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        optimizer = getattr(runner.optim_wrapper, 'optimizer', None)
        if optimizer is not None and runner._resume and \
                merge_saved_param_groups(checkpoint, len(optimizer.param_groups)):
            print_log('the checkpoint has one optimizer group per parameter: merged into '
                      f'{len(optimizer.param_groups)} by their settings', logger='current', level=logging.INFO)


def _first(keys: list, n: int = 3) -> str:
    return ', '.join(keys[:n]) + (', ...' if len(keys) > n else '')


# ----------------------------------------------------------------------------- metrics
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
