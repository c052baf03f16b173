"""Safe checkpoints for mmengine on torch >= 2.6.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; torch now defaults to
``weights_only=True`` and refuses mmengine's checkpoints, whose metadata holds NumPy arrays and
mmengine's ``HistoryBuffer`` (pickled with bound methods, which would need ``getattr`` allowed).
Instead of switching the safety off:
- saving pickles a ``HistoryBuffer`` as its constructor call on plain arrays;
- the local-file loader is replaced by one that allows exactly those types, during each load only.
"""
from __future__ import annotations

import copyreg
import pickle

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader


def _numpy_globals() -> list:
    """What pickled NumPy arrays, dtypes and scalars reference (module paths differ by version)."""
    core = getattr(np, '_core', None) or np.core
    names = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    names += [type(np.dtype(t)) for t in ('b1', 'u1', 'i1', 'i2', 'i4', 'i8', 'u4', 'u8', 'f2', 'f4', 'f8')]
    return names


def _reduce_history_buffer(buffer: HistoryBuffer):
    return HistoryBuffer, (buffer._log_history, buffer._count_history, buffer.max_length)


copyreg.pickle(HistoryBuffer, _reduce_history_buffer)
SAFE_GLOBALS = [HistoryBuffer, *_numpy_globals()]


class UnsafeCheckpointError(pickle.UnpicklingError):
    pass


def load_checkpoint_file(filename: str, map_location=None):
    """torch.load with ``weights_only=True`` and just mmengine's metadata types allowed."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(filename, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            detail = next((line.strip() for line in str(e).splitlines() if 'Unsupported global' in line), '')
            raise UnsafeCheckpointError(f'{filename}: refused by the weights-only loader, it holds a type '
                                        f'outside the allow-list ({detail})') from None


# '' is mmengine's scheme for local paths; force replaces its default loader.
CheckpointLoader.register_scheme(prefixes='', force=True)(load_checkpoint_file)
