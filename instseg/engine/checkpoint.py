"""Safe checkpoints for mmengine on torch >= 2.6: loaded without running code, written atomically.

Loading: mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; torch now defaults to
``weights_only=True`` and refuses mmengine's checkpoints, whose metadata holds NumPy arrays and
mmengine's ``HistoryBuffer`` (pickled with bound methods, which would need ``getattr`` allowed).
Instead of switching the safety off:
- saving pickles a ``HistoryBuffer`` as its constructor call on plain arrays;
- the local-file loader is replaced by one that allows exactly those types, during each load only,
  and that names a missing, truncated or corrupt file in one line.

Writing: mmengine writes a checkpoint and ``last_checkpoint`` in place, so a kill or a full disk
while saving leaves a truncated file that ``resume=true`` then picks. ``write_atomically`` and
``publish`` (used by ``instseg.engine.hooks.SafeCheckpointHook``) write a temporary file in the same
directory, flush it to disk and rename it over the target: a reader sees the old file or the new
one, never a part.
"""
from __future__ import annotations

import copyreg
import os
import os.path as osp
import pickle
import tempfile

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message is one line for the user."""


class CheckpointLoadError(CheckpointError):
    pass


class UnsafeCheckpointError(CheckpointLoadError, pickle.UnpicklingError):
    pass


class CheckpointSaveError(CheckpointError):
    pass


# ----------------------------------------------------------------------------- loading
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


def load_checkpoint_file(filename: str, map_location=None):
    """torch.load with ``weights_only=True`` and just mmengine's metadata types allowed."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise CheckpointLoadError(f'checkpoint {filename}: file not found')
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(filename, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch reports a damaged file with many types
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            unsafe = next((line for line in lines if 'Unsupported global' in line), None)
            if unsafe:
                raise UnsafeCheckpointError(f'{filename}: refused by the weights-only loader, it holds a '
                                            f'type outside the allow-list ({unsafe})') from None
            detail = f'{type(e).__name__}: {lines[0]}' if lines else type(e).__name__
            raise CheckpointLoadError(f'checkpoint {filename} is truncated or corrupt ({detail.rstrip(".")}); '
                                      'use an earlier checkpoint of the run') from None


# '' is mmengine's scheme for local paths; force replaces its default loader.
CheckpointLoader.register_scheme(prefixes='', force=True)(load_checkpoint_file)


def mismatched_keys(checkpoint: dict, model: torch.nn.Module) -> dict:
    """How ``checkpoint``'s state_dict differs from ``model``'s, as mmengine would load it (a bare
    state_dict too, ``module.`` prefixes of wrapped models stripped): ``{'missing': [keys of the
    model the checkpoint lacks], 'unexpected': [keys the model lacks], 'shape': [(key, checkpoint
    shape, model shape)]}``."""
    state = checkpoint.get('state_dict', checkpoint)
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    expected = model.state_dict()
    return dict(missing=[k for k in expected if k not in state],
                unexpected=[k for k in state if k not in expected],
                shape=[(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                       if k in expected and hasattr(v, 'shape') and tuple(v.shape) != tuple(expected[k].shape)])


# ----------------------------------------------------------------------------- writing
def _fsync_directory(directory: str) -> None:
    """Makes a rename in ``directory`` durable (POSIX; Windows cannot open directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: str) -> str:
    """A new empty file beside ``path`` (same file system, so renaming it over ``path`` is atomic),
    hidden and named after it: ``.iter_4.pth.<random>.tmp``."""
    directory, name = osp.split(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=directory)
    os.close(fd)
    return tmp


def publish(tmp: str, path: str) -> None:
    """Moves the complete file ``tmp`` to ``path`` atomically, its data on disk first."""
    with open(tmp, 'rb') as f:  # any descriptor of the file flushes all of its data
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_directory(osp.dirname(osp.abspath(path)))


def write_atomically(path: str, data: bytes | str) -> None:
    """Writes ``path`` so that it holds either its old content or all of ``data``."""
    tmp = temporary_path(path)
    try:
        with open(tmp, 'wb') as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
        publish(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
