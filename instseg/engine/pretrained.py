"""ImageNet weights for ``pretrained=true``: found (or fetched) and checked before any work.

The backbone files name torchvision's weights by their download URL, so no torchvision is needed.
torch.hub caches such files in ``$TORCH_HOME/hub/checkpoints``; a file missing there is downloaded
once (per node, by its local rank 0, under a multi-process launch), with a short timeout. mmengine
then loads the local file, but with ``strict=False``: a file that lacks the backbone's tensors or has
other shapes (the narrowed ``fit=cpu`` backbone) would only be logged and leave a random init. So here, a file that cannot be had or does not fit stops the run
with one line saying which file and why: never a warning and a random init.
"""
from __future__ import annotations

import os
import re
import socket
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig

from instseg.config import pretrained_backbone
from instseg.errors import ConfigError

DOWNLOAD_TIMEOUT_S = 30  # per network operation: offline, name resolution fails at once anyway
# torchvision names its files <name>-<first hex digits of the SHA-256>.pth; torch.hub checks them.
_HASH_IN_NAME = re.compile(r'-([a-f0-9]{8,})\.')


def backbone_weights(cfg: DictConfig) -> str | None:
    """The local file of the backbone's ImageNet init (``pretrained=true``), fetched into torch.hub's
    cache when missing and checked to fit the configured backbone; ``None`` with pretrained=false.
    The backbone is built to compare shapes: callers check the config first (``check_buildable``,
    as ``instseg.engine.runner.train`` does)."""
    backbone = pretrained_backbone(cfg)
    if backbone is None:
        return None
    path = local_file(backbone['init_cfg']['checkpoint'])
    check_fits(backbone, path)
    return str(path)


def cache_path(url: str) -> Path:
    """Where torch.hub keeps ``url``'s file: ``$TORCH_HOME/hub/checkpoints/<file name>``."""
    import torch
    return Path(torch.hub.get_dir()) / 'checkpoints' / Path(urlparse(url).path).name


def local_file(source: str) -> Path:
    """``source`` (an http(s) URL, or a local path) as a local file; a URL's file is downloaded into
    torch.hub's cache unless it is there already."""
    scheme = urlparse(source).scheme
    if scheme not in ('http', 'https'):
        path = Path(source).expanduser()
        if len(scheme) > 1:  # torchvision://, open-mmlab://, s3://: not a file (a Windows drive is one letter)
            raise ConfigError(f"pretrained=true: model.backbone.init_cfg.checkpoint='{source}' is neither a "
                              'local file nor an https:// URL (e.g. torchvision\'s '
                              'https://download.pytorch.org/models/resnet50-0676ba61.pth)')
        if not path.is_file():
            raise ConfigError(f'pretrained=true: {path} (model.backbone.init_cfg.checkpoint): file not found')
        return path
    path = cache_path(source)
    fetch_once_per_node(source, path)
    return path


def fetch_once_per_node(url: str, path: Path) -> None:
    """Downloads ``url`` to ``path`` unless it is there. Under a multi-process launch only each node's
    local rank 0 downloads, while the other ranks wait for it, and every rank fails with the same line if
    one node's download failed (not one rank with the reason and the others at a timeout)."""
    from mmengine.dist import all_gather_object, get_world_size

    if get_world_size() == 1:
        if not path.is_file():
            _download(url, path)
        return
    error = None
    local_rank = int(os.environ.get('LOCAL_RANK', 0))  # instseg.engine.dist exports it for every launcher
    if local_rank == 0 and not path.is_file():
        try:
            _download(url, path)
        except ConfigError as e:
            error = str(e)
    errors = [e for e in all_gather_object(error) if e]  # every rank calls it: no rank waits alone
    if errors:
        raise ConfigError(errors[0])
    if not path.is_file():  # local rank 0 found or fetched it, but this rank cannot see it
        raise ConfigError(f'pretrained=true: {path} is missing on this rank though local rank 0 of its node '
                          'has it; give every rank of a node one TORCH_HOME')


def _download(url: str, path: Path) -> None:
    """torch.hub's download (a temporary file renamed into place, the name's hash checked), with a
    timeout, failing in one line that says where to put the file by hand."""
    import torch

    print(f'pretrained=true: downloading {url} to {path}', flush=True)
    match = _HASH_IN_NAME.search(path.name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None)
    except Exception as e:  # noqa: BLE001 - network, HTTP, disk and hash errors alike
        if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
            e = e.reason
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f'pretrained=true: cannot download {url} ({reason}); put that file at {path} '
                          '(or set TORCH_HOME), or set pretrained=false') from None
    finally:
        socket.setdefaulttimeout(previous)


def check_fits(backbone: dict, path: Path) -> None:
    """Every parameter and buffer of the backbone ``backbone`` (its config) must be in the file, with
    its shape; the file's extra tensors (torchvision's classifier, ``fc.*``) are fine, and so are
    missing BatchNorm batch counters (older torchvision files have none; they start at 0)."""
    import torch
    from mmengine.registry import init_default_scope

    from instseg.engine.checkpoint import (CheckpointLoadError, UnsafeCheckpointError, load_checkpoint_file,
                                           mismatched_keys)
    from instseg.registry import MODELS

    try:
        checkpoint = load_checkpoint_file(str(path), map_location='cpu')
    except UnsafeCheckpointError as e:
        raise ConfigError(f'pretrained=true: {e}') from None
    except CheckpointLoadError as e:
        detail = re.search(r'\((.*)\)', str(e))
        raise ConfigError(f'pretrained=true: {path} is truncated or corrupt ({detail.group(1) if detail else e}); '
                          'delete it so that it is downloaded again, or put an intact copy there') from None
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else {}
    prefix = backbone['init_cfg'].get('prefix')  # mmengine's PretrainedInit reads <prefix>.* only
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if hasattr(v, 'shape')}  # anything else cannot load

    init_default_scope('instseg')
    with torch.device('meta'):  # shapes only: nothing is allocated or initialised
        module = MODELS.build({k: v for k, v in backbone.items() if k != 'init_cfg'})
    diff = mismatched_keys(state, module)  # its 'unexpected' (fc.*) are fine
    reshaped = {key: found for key, found, _ in diff['shape']}
    missing = set(diff['missing'])
    for key, expected in module.state_dict().items():  # the first misfit in the backbone's order
        if key in reshaped:
            what = f'{key} is {list(reshaped[key])} in the file and {list(expected.shape)} in the backbone'
        elif key in missing and not key.endswith('num_batches_tracked'):
            what = f'it has no {key} (the backbone\'s is {list(expected.shape)})'
        else:
            continue
        raise ConfigError(f'pretrained=true: {path} does not fit model.backbone: {what}; {_hint(backbone)}')


def _hint(backbone: dict) -> str:
    width = backbone.get('base_channels', 64)
    if backbone.get('type') == 'ResNet' and width != 64:
        return (f'model.backbone.base_channels={width} narrows the backbone (the default fit=cpu does) and '
                'ImageNet weights fit the reference network: add fit=reference, or set pretrained=false')
    return 'name the weights of this backbone in model.backbone.init_cfg.checkpoint, or set pretrained=false'
