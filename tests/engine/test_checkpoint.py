"""Checkpoints load with weights_only=True and exactly the types mmengine's metadata needs, are
written atomically, and fail in one line when missing, damaged or made by another model; random
states resume where the uninterrupted run had them. (The tools end to end: test_faults.py.)"""
import collections
import errno
import os
import pickle
import random
import signal

import numpy as np
import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import _load_checkpoint

from instseg.engine.checkpoint import CheckpointError, CheckpointLoadError, load_checkpoint_file, write_atomically
from instseg.engine.hooks import CheckpointMatchHook, RNGStateHook, SafeCheckpointHook


def _mmengine_like_checkpoint():
    buffer = HistoryBuffer()
    buffer.update(1.5)
    return dict(meta=dict(iter=3, seed=0, rng=np.random.get_state(), arr=np.arange(4, dtype=np.float32),
                          hub=dict(log_scalars={'loss': buffer})),
                state_dict=collections.OrderedDict(w=torch.ones(2)))


def test_mmengine_metadata_loads_safely(tmp_path):
    path = tmp_path / 'ckpt.pth'
    torch.save(_mmengine_like_checkpoint(), path)
    with pytest.raises(pickle.UnpicklingError):  # torch's safe default refuses it as is
        torch.load(path)
    loaded = _load_checkpoint(str(path), map_location='cpu')  # mmengine's path -> our loader
    assert loaded['meta']['hub']['log_scalars']['loss'].current() == 1.5
    assert np.array_equal(loaded['meta']['arr'], np.arange(4))
    assert torch.equal(loaded['state_dict']['w'], torch.ones(2))


class Arbitrary:
    def __reduce__(self):
        return (print, ('this must never run',))


def test_anything_else_is_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'meta': Arbitrary()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint_file(str(path))


def test_rng_state_round_trip():
    class Runner:
        _resume = True
    hook, checkpoint = RNGStateHook(), {}
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    hook.before_save_checkpoint(Runner(), checkpoint)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    hook.after_load_checkpoint(Runner(), checkpoint)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_unsafe_checkpoints_are_reported_in_one_line(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'meta': Arbitrary()}, path)
    with pytest.raises(CheckpointError, match=r'evil.pth: refused by the weights-only loader') as error:
        _load_checkpoint(str(path))  # mmengine's path, as load_from and resume take it
    assert '\n' not in str(error.value)


def test_missing_and_damaged_files_are_named_in_one_line(tmp_path):
    with pytest.raises(CheckpointLoadError, match=r'^checkpoint \S+/none.pth: file not found$'):
        _load_checkpoint(str(tmp_path / 'none.pth'))
    path = tmp_path / 'ckpt.pth'
    torch.save(_mmengine_like_checkpoint(), path)
    whole = path.read_bytes()
    for damaged in (whole[:len(whole) // 2], b'', b'not a checkpoint' * 8):
        path.write_bytes(damaged)
        with pytest.raises(CheckpointLoadError, match=r'ckpt.pth is truncated or corrupt \(.+\); use an earlier') \
                as error:
            load_checkpoint_file(str(path))
        assert '\n' not in str(error.value)


def test_an_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    path = tmp_path / 'last_checkpoint'
    write_atomically(str(path), 'old')
    write_atomically(str(path), 'new')
    assert path.read_text() == 'new'

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'fsync', full_disk)
    with pytest.raises(OSError):
        write_atomically(str(path), 'newer')
    assert path.read_text() == 'new' and [p.name for p in tmp_path.iterdir()] == ['last_checkpoint']


class _Loop:
    def __init__(self, batches):
        self.dataloader_iterator = iter(batches)


def test_resume_restores_random_states_after_the_replayed_batches():
    """mmengine replays the batches before the checkpoint, drawing random numbers (flips) that the
    uninterrupted run drew before it: the states apply right before the first new batch."""
    class Runner:
        _resume = True
        train_loop = _Loop(range(5))
    hook, checkpoint = RNGStateHook(), dict(meta=dict(iter=3))
    np.random.seed(1), torch.manual_seed(1)
    hook.before_save_checkpoint(Runner(), checkpoint)
    expected = (np.random.rand(), torch.rand(1))
    np.random.seed(2), torch.manual_seed(2)
    hook.after_load_checkpoint(Runner(), checkpoint)
    for _ in range(3):  # the replay, flipping images
        next(Runner.train_loop.dataloader_iterator), np.random.rand(), torch.rand(1)
    assert next(Runner.train_loop.dataloader_iterator) == 3
    assert (np.random.rand(), torch.rand(1)) == expected


def test_validation_leaves_the_random_states_as_it_found_them():
    hook = RNGStateHook()
    np.random.seed(1), torch.manual_seed(1), random.seed(1)
    expected = (np.random.rand(), torch.rand(1), random.random())
    np.random.seed(1), torch.manual_seed(1), random.seed(1)
    hook.before_val(None)
    np.random.rand(), torch.rand(1), random.random()
    checkpoint = {}
    hook.before_save_checkpoint(None, checkpoint)  # mmengine's save_best saves during validation
    hook.after_val(None)
    assert (np.random.rand(), torch.rand(1), random.random()) == expected
    np.random.seed(3)
    hook.after_load_checkpoint(type('Runner', (), {'_resume': True})(), checkpoint)
    assert np.random.rand() == expected[0]


def _match_runner(model, resume=False, load_from='ckpt.pth', work_dir='.'):
    return type('Runner', (), dict(model=model, _resume=resume, _load_from=load_from, work_dir=work_dir))()


def _net(classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)), torch.nn.Linear(4, classes))


def test_a_checkpoint_of_another_model_is_refused_naming_the_keys():
    checkpoint = dict(state_dict={f'module.{k}': v for k, v in _net(3).state_dict().items()})
    CheckpointMatchHook().after_load_checkpoint(_match_runner(_net(3)), checkpoint)  # the same: loads
    with pytest.raises(CheckpointLoadError) as error:
        CheckpointMatchHook().after_load_checkpoint(_match_runner(_net(5)), checkpoint)
    assert str(error.value) == (
        'checkpoint ckpt.pth was saved from another model than this config builds: 2 have another shape '
        '(3.weight: [3, 4] in the checkpoint, [5, 4] in the model, 3.bias: [3] in the checkpoint, [5] in the '
        'model); the config must match the run that saved it (its config.yaml)')
    deeper = torch.nn.Sequential(*_net(3), torch.nn.Linear(3, 3))
    with pytest.raises(CheckpointLoadError, match=r': 2 tensors of the model are missing \(4.weight, 4.bias\);'):
        CheckpointMatchHook(partial_load_from=True).after_load_checkpoint(_match_runner(deeper), checkpoint)


def test_load_from_may_fine_tune_to_other_classes_but_not_resume():
    checkpoint = dict(state_dict=_net(3).state_dict())
    CheckpointMatchHook(partial_load_from=True).after_load_checkpoint(_match_runner(_net(5)), checkpoint)
    with pytest.raises(CheckpointLoadError, match='2 have another shape'):
        CheckpointMatchHook(partial_load_from=True).after_load_checkpoint(
            _match_runner(_net(5), resume=True), checkpoint)
    with pytest.raises(CheckpointLoadError, match='8 have another shape'):  # most of it: another model
        CheckpointMatchHook(partial_load_from=True).after_load_checkpoint(
            _match_runner(torch.nn.Sequential(*(torch.nn.Linear(5, 5) for _ in range(4)))), checkpoint)


def test_a_stop_signal_is_remembered_and_a_second_one_acts_at_once():
    hook = SafeCheckpointHook(interval=1)
    # Python's own handler before it, whatever this process inherited (a background job ignores SIGINT)
    hook._previous_handlers = {signal.SIGINT: signal.default_int_handler}
    signal.signal(signal.SIGINT, hook._request_stop)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: training saves first
        assert hook.stop_signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_a_second_stop_signal_acts_even_where_the_first_was_ignored_before():
    hook = SafeCheckpointHook(interval=1)
    hook._previous_handlers = {signal.SIGINT: signal.SIG_IGN}  # as a background job inherits it
    signal.signal(signal.SIGINT, hook._request_stop)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert hook.stop_signal == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # the next one ends the process
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
