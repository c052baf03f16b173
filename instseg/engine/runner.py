"""Train and test entry points: check the inputs, translate the config, let mmengine's Runner run."""
from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from instseg.config import COCO_STAT_NAMES, check_buildable, synthetic_spec, to_mmengine, uses_semantic_maps
from instseg.engine.checkpoint import CheckpointError
from instseg.engine.hooks import NonFiniteError
from instseg.engine.pretrained import backbone_weights
from instseg.errors import ConfigError


def prepare_data(cfg: DictConfig, splits) -> None:
    """Generates the synthetic set on first use and checks the data of ``splits`` (annotation
    files, images, ``data.classes``), so bad data or a typo fails now, not after or as AP = 0."""
    from instseg.data.coco import release_annotation_files
    from instseg.data.validate import validate_coco

    data = cfg.data
    if 'synthetic' in data:
        from instseg.data import synthetic
        synthetic.ensure_dataset(data.root, synthetic_spec(data.synthetic))
    if splits and not Path(data.root).is_dir():
        raise ConfigError(f'data.root: directory not found: {data.root}')
    for split in splits:
        ann = Path(data.root) / data[split].ann
        images = Path(data.root) / data[split].img
        # also checks data.classes against the file (instseg.data.coco.check_classes)
        summary = validate_coco(ann, images, f'data.{split}', classes=list(data.classes), training=split == 'train')
        if summary.line():
            print(summary.line())
        if not images.is_dir():
            raise ConfigError(f'data.{split}.img: image directory not found: {images}')
    release_annotation_files()  # mmdet parses its own copy
    if 'train' in splits and uses_semantic_maps(OmegaConf.to_container(cfg.model, resolve=True)):
        maps = Path(data.root) / str(data.train.get('seg'))
        if not data.train.get('seg') or not maps.is_dir():
            raise ConfigError(f'model={cfg.model.name} trains a semantic branch on per-pixel class maps, and '
                              f'data.train.seg={data.train.get("seg")} is not a directory under {data.root}; '
                              'set data.train.seg=DIR (e.g. COCO-stuff\'s stuffthingmaps/train2017/) '
                              'or model.semantic=false')


def check_device(cfg: DictConfig) -> None:
    import torch
    if cfg.amp and not torch.cuda.is_available():
        raise ConfigError('amp=true needs a CUDA GPU and none is available; drop amp=true to train on CPU')


def save_config(cfg: DictConfig, work_dir: Path) -> None:
    """Saves the fully resolved config; a different earlier one (resume) is kept beside it."""
    path = work_dir / 'config.yaml'
    text = OmegaConf.to_yaml(cfg, resolve=True)
    if path.exists() and path.read_text() != text:
        path.rename(work_dir / f'config.{time.strftime("%Y%m%d_%H%M%S")}.yaml')
    path.write_text(text)


def train(cfg: DictConfig) -> dict:
    from mmengine.dist import is_main_process
    from mmengine.runner import Runner

    from instseg.engine import dist

    work_dir = Path(cfg.work_dir)
    has_run = (work_dir / 'last_checkpoint').is_file()
    if cfg.resume and not has_run:
        raise ConfigError(f'resume=true: no checkpoint in {work_dir}; pass work_dir=DIR of the run to continue')
    if has_run and not cfg.resume:
        raise ConfigError(f'work_dir={work_dir} already holds a trained run; '
                          'pass resume=true to continue it, or another work_dir')
    check_device(cfg)
    check_buildable(cfg)  # nothing in the config may import or run code
    weights = backbone_weights(cfg)  # pretrained=true: the ImageNet file, local and fitting the backbone
    prepare_data(cfg, ('train', 'val'))
    work_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():  # all ranks have one config and work_dir; rank 0 writes, as mmengine does
        save_config(cfg, work_dir)
    runner = Runner.from_cfg(to_mmengine(cfg, mode='train', backbone_weights=weights))
    dist.register_hooks(runner)
    try:
        runner.train()
    except (CheckpointError, NonFiniteError) as e:  # one line naming the checkpoint that is intact
        raise ConfigError(str(e)) from None
    if not is_main_process():
        return {}
    metrics = read_metrics(work_dir)
    print_summary(metrics, work_dir)
    return metrics


def test(cfg: DictConfig, checkpoint: str, format_only: bool = False) -> dict:
    from mmengine.dist import is_main_process
    from mmengine.runner import Runner

    if not Path(checkpoint).is_file():
        raise ConfigError(f'checkpoint: file not found: {checkpoint}')
    check_device(cfg)
    check_buildable(cfg)
    # pretrained=true needs no ImageNet file here: testing loads every weight from the checkpoint
    prepare_data(cfg, () if format_only else ('test',))  # format_only: no ground truth to check
    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_config(cfg, work_dir)
    runner = Runner.from_cfg(to_mmengine(cfg, mode='test', checkpoint=checkpoint, format_only=format_only))
    try:
        runner.test()
    except CheckpointError as e:  # truncated, unsafe, or from another model
        raise ConfigError(str(e)) from None
    if not is_main_process():
        return {}
    if format_only:
        print(f'results: {", ".join(str(p) for p in sorted(work_dir.glob("results.*.json")))}')
        return {}
    metrics = read_metrics(work_dir)
    print_summary(metrics, work_dir)
    return metrics


def read_metrics(work_dir: Path) -> dict:
    path = Path(work_dir) / 'metrics.json'
    return json.loads(path.read_text()) if path.is_file() else {}


def print_summary(metrics: dict, work_dir: Path) -> None:
    print('\n' + ' ' * 6 + ''.join(f'{k:>7}' for k in COCO_STAT_NAMES))
    for iou_type in ('bbox', 'segm'):
        if iou_type in metrics:
            print(f'{iou_type:<6}' + ''.join(f'{metrics[iou_type][k]:7.3f}' for k in COCO_STAT_NAMES))
    for iou_type, per_class in metrics.get('classwise', {}).items():
        print(f'{iou_type} AP per class: ' + ', '.join(f'{n} {ap:.3f}' for n, ap in per_class.items()))
    print(f'work_dir: {work_dir}')


def saved_config_path(checkpoint: str) -> Path:
    """The resolved config of the run that wrote ``checkpoint``: ``save_config``'s file beside it."""
    return Path(checkpoint).parent / 'config.yaml'


def run_test(cfg: DictConfig) -> dict:
    """tools/test.py: the run's saved config (beside the checkpoint) with this command's overrides
    on top; the composed defaults only where no saved config exists."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    saved = saved_config_path(cfg.checkpoint)
    if not saved.is_file():
        print(f'warning: no {saved}; using the composed config as given on the command line')
        return test(cfg, cfg.checkpoint, cfg.format_only)
    run_cfg = OmegaConf.load(saved)
    OmegaConf.set_struct(run_cfg, True)
    for override in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        key = override.key_or_group
        if key in ('checkpoint', 'format_only', 'work_dir') or key.startswith('hydra'):
            continue
        if key == 'model' and override.value() == OmegaConf.select(run_cfg, 'model.name'):
            continue  # the run's own model (instseg.cli composes the command line with it)
        if '.' not in key and not isinstance(OmegaConf.select(run_cfg, key), (str, int, float, bool)):
            raise ConfigError(f'{override.input_line}: a saved run keeps its {key}; override its keys instead '
                              f'(e.g. {key}.<key>=...)')
        try:
            OmegaConf.update(run_cfg, key, override.value(), merge=True)
        except Exception as e:  # noqa: BLE001 - a key the saved config lacks
            raise ConfigError(f'{override.input_line}: not a key of {saved} ({str(e).splitlines()[0]})') from None
    OmegaConf.set_struct(run_cfg, False)
    run_cfg.work_dir = cfg.work_dir
    return test(run_cfg, cfg.checkpoint, cfg.format_only)
