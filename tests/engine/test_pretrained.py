"""pretrained=true loads the ImageNet file named by URL from torch.hub's cache (no torchvision), or
stops in one line: offline without the file, a file that does not fit the backbone, a damaged file.
Offline here: a state dict of the right shape is placed at the path the loader looks up."""
import multiprocessing
import os
import urllib.error

import pytest
import torch
from conftest import run_tool
from mmengine.registry import init_default_scope

from instseg.cli import compose
from instseg.config import to_mmengine
from instseg.engine.checkpoint import load_checkpoint_file
from instseg.engine.pretrained import backbone_weights, cache_path, local_file
from instseg.errors import ConfigError
from instseg.registry import MODELS

R18 = 'https://download.pytorch.org/models/resnet18-f37072fd.pth'
TINY = ['schedule=smoke', 'data.synthetic.num_train=4', 'data.synthetic.num_val=2']


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    return tmp_path / 'torch'


@pytest.fixture
def offline(monkeypatch):
    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError(OSError(-3, 'Temporary failure in name resolution'))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)


def _plausible(key: str, shape: torch.Size) -> torch.Tensor:
    """Random, but trainable: He-scaled convolutions, BatchNorm near identity (positive variances)."""
    if len(shape) == 4:
        return torch.randn(shape) * (2 / shape[1:].numel()) ** 0.5
    if key.endswith('running_var'):
        return 1 + torch.rand(shape)
    return (key.endswith('.weight') + 0.1 * torch.randn(shape))  # BatchNorm scale ~1; shifts, means ~0


def imagenet_like_resnet18(path, drop=None):
    """A random state dict shaped like torchvision's ResNet-18 file (mmdet's ResNet has its names),
    classifier included, at ``path``."""
    init_default_scope('instseg')
    torch.manual_seed(1)
    state = MODELS.build(dict(type='ResNet', depth=18)).state_dict()
    state = {k: _plausible(k, v.shape) if v.is_floating_point() else v for k, v in state.items()
             if not k.endswith('num_batches_tracked') and k != drop}
    state.update({'fc.weight': torch.randn(1000, 512), 'fc.bias': torch.randn(1000)})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_the_backbone_files_name_torchvision_weights_by_url():
    for backbone, name in (('r18', 'resnet18-f37072fd'), ('r50', 'resnet50-0676ba61'), ('r101', 'resnet101-63fe2227')):
        init = compose('train', [f'model/backbone={backbone}', 'fit=reference']).model.backbone.init_cfg
        assert init == dict(type='Pretrained', checkpoint=f'https://download.pytorch.org/models/{name}.pth')


def test_the_cached_file_is_what_init_weights_loads(torch_home, offline, one_thread):
    cfg = compose('train', ['pretrained=true', 'fit=reference'])
    path = cache_path(R18)
    assert path == torch_home / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth'
    state = imagenet_like_resnet18(path)
    assert backbone_weights(cfg) == str(path)

    mm = to_mmengine(cfg, backbone_weights=backbone_weights(cfg))
    assert mm.model.backbone.init_cfg == dict(type='Pretrained', checkpoint=str(path))
    init_default_scope('instseg')
    model = MODELS.build(mm.model)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.init_weights()  # as mmengine's Runner does before training
    after = model.backbone.state_dict()
    for key, value in state.items():
        if not key.startswith('fc.'):
            assert torch.equal(after[key], value), key
    assert not torch.equal(before['conv1.weight'], after['conv1.weight'])


def test_offline_without_the_file_stops_in_one_line(torch_home, offline):
    with pytest.raises(ConfigError) as error:
        backbone_weights(compose('train', ['pretrained=true', 'fit=reference', 'model/backbone=r50']))
    path = torch_home / 'hub' / 'checkpoints' / 'resnet50-0676ba61.pth'
    assert str(error.value) == (
        'pretrained=true: cannot download https://download.pytorch.org/models/resnet50-0676ba61.pth '
        f'([Errno -3] Temporary failure in name resolution); put that file at {path} (or set TORCH_HOME), '
        'or set pretrained=false')
    assert not path.exists()


def test_a_narrow_backbone_does_not_take_imagenet_weights(torch_home):
    path = cache_path(R18)
    imagenet_like_resnet18(path)
    with pytest.raises(ConfigError) as error:
        backbone_weights(compose('train', ['pretrained=true']))  # fit=cpu: base_channels 32
    assert str(error.value) == (
        f'pretrained=true: {path} does not fit model.backbone: conv1.weight is [64, 3, 7, 7] in the file and '
        '[32, 3, 7, 7] in the backbone; model.backbone.base_channels=32 narrows the backbone (the default '
        'fit=cpu does) and ImageNet weights fit the reference network: add fit=reference, or set pretrained=false')


def test_a_file_lacking_a_tensor_or_damaged_is_refused(torch_home):
    path = cache_path(R18)
    imagenet_like_resnet18(path, drop='layer4.1.bn2.running_var')
    cfg = compose('train', ['pretrained=true', 'fit=reference'])
    with pytest.raises(ConfigError, match=r'does not fit model.backbone: it has no layer4.1.bn2.running_var '
                                          r'\(the backbone\'s is \[512\]\); name the weights'):
        backbone_weights(cfg)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ConfigError) as error:
        backbone_weights(cfg)
    assert str(error.value).startswith(f'pretrained=true: {path} is truncated or corrupt (')
    assert str(error.value).endswith('); delete it so that it is downloaded again, or put an intact copy there')


def test_train_starts_from_the_cached_imagenet_weights(torch_home, tmp_path, monkeypatch):
    """The tool, offline: the stem is frozen (frozen_stages=1), so after an iteration it still holds the file's."""
    state = imagenet_like_resnet18(cache_path(R18))
    work_dir = tmp_path / 'run'
    run_tool('train', 'pretrained=true', 'fit=reference', *TINY, 'schedule.max_iters=1', f'work_dir={work_dir}')
    trained = load_checkpoint_file(str(work_dir / 'iter_1.pth'))['state_dict']
    for key in ('conv1.weight', 'bn1.running_mean', 'layer1.0.conv1.weight'):
        assert torch.equal(trained[f'backbone.{key}'], state[key]), key
    assert not torch.equal(trained['backbone.layer4.1.conv2.weight'], state['layer4.1.conv2.weight'])  # it trained


def _fetch_as_rank(rank: int, init_file: str, url: str, calls) -> None:
    """One rank of a two-process gloo group on one node fetching ``url`` (forked: the test's fake
    download comes along)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2')
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        local_file(url)
        calls.put((rank, 'ok'))
    except ConfigError as e:
        calls.put((rank, str(e)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize('reachable', [True, False])
def test_under_a_launch_one_rank_per_node_downloads_and_all_share_its_outcome(torch_home, tmp_path,
                                                                               monkeypatch, reachable):
    context = multiprocessing.get_context('fork')
    calls = context.Queue()

    def fake_download(url, dst, *args, **kwargs):  # in the child processes
        calls.put((int(os.environ['RANK']), 'download'))
        if not reachable:
            raise urllib.error.URLError(OSError(-3, 'Temporary failure in name resolution'))
        torch.save({}, dst)

    monkeypatch.setattr(torch.hub, 'download_url_to_file', fake_download)
    ranks = [context.Process(target=_fetch_as_rank, args=(r, str(tmp_path / 'init'), R18, calls)) for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=60)
    events = sorted(calls.get(timeout=5) for _ in range(3))
    assert events[0] == (0, 'download')  # rank 0 alone downloads; rank 1 waits for it
    outcomes = dict(events[1:])
    if reachable:
        assert outcomes == {0: 'ok', 1: 'ok'} and cache_path(R18).is_file()
    else:  # both ranks stop with rank 0's line, at once
        assert outcomes[0] == outcomes[1] and outcomes[1].startswith(f'pretrained=true: cannot download {R18}')
