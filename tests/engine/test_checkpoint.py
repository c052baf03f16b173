"""Checkpoints load with weights_only=True and exactly the types mmengine's metadata needs."""
import collections
import pickle
import random

import numpy as np
import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import _load_checkpoint

from instseg.engine.checkpoint import load_checkpoint_file
from instseg.engine.hooks import RNGStateHook


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
