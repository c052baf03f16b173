import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
# A small synthetic set keeps tests fast; the default (1000/200 images) is for real training.
SMALL_SYNTHETIC = ['data.synthetic.num_train=24', 'data.synthetic.num_val=8']


@pytest.fixture(scope='session', autouse=True)
def _cache_dir(tmp_path_factory):
    """Generated data goes to a per-session cache, never the user's."""
    os.environ['INSTSEG_CACHE'] = str(tmp_path_factory.mktemp('cache'))


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f'{path} not present (real test data lives beside the checkout)')
    return path


def cpu_schedule_file(model: str):
    """A model's own changes to the CPU schedule, as written in configs/schedule/model/cpu_<model>.yaml."""
    from omegaconf import OmegaConf
    return OmegaConf.load(REPO / 'configs' / 'schedule' / 'model' / f'cpu_{model}.yaml')


def run_tool(tool: str, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs tools/<tool>.py as a user would, from the repository root."""
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / f'{tool}.py'), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ})
    if check and proc.returncode != 0:
        raise AssertionError(f'{tool} {" ".join(args)} failed ({proc.returncode}):\n'
                             f'{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}')
    return proc


def det_sample(boxes, labels, size: int = 64, ori_shape=None, num_semantic_classes: int = 0):
    """A ``size``-px square image's DetDataSample; each box is also its instance's (rectangular) mask.
    With ``num_semantic_classes``, a per-pixel class map too (background = the last class)."""
    import numpy as np
    import torch
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData, PixelData

    masks = np.zeros((len(boxes), size, size), dtype=np.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes):
        mask[y1:y2, x1:x2] = 1
    ori_shape = ori_shape or (size, size)
    sample = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=ori_shape,
                                         scale_factor=(size / ori_shape[1], size / ori_shape[0])))
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.long), masks=BitmapMasks(masks, size, size))
    if num_semantic_classes:
        classes = np.full((size, size), num_semantic_classes - 1, dtype=np.int64)
        for mask, label in zip(masks, labels):
            classes[mask.astype(bool)] = label
        sample.gt_sem_seg = PixelData(sem_seg=torch.from_numpy(classes)[None])
    return sample


def built_optim_wrapper(model, *overrides: str):
    """The optimizer wrapper ``tools/train.py *overrides`` would build for ``model``."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope

    from instseg.cli import compose
    from instseg.config import to_mmengine

    init_default_scope('instseg')
    return build_optim_wrapper(model, to_mmengine(compose('train', list(overrides))).optim_wrapper)


def param_group_of(wrapper, param) -> dict:
    """The optimizer's parameter group that holds ``param``."""
    return next(g for g in wrapper.optimizer.param_groups if any(p is param for p in g['params']))


@pytest.fixture
def one_thread():
    """Toy tensors gain nothing from threads; beside a training run, contention makes them ~20x slower."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
