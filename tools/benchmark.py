#!/usr/bin/env python
"""Time training iterations of several detectors in one run, on this machine:
python tools/benchmark.py [--models a,b,...] [--iters N] [overrides...]

Each model is built from the config as `tools/train.py model=NAME [overrides]` builds it (its CPU fit
and schedule by default) and trains `--iters` timed iterations on the training data after two untimed
ones. Prints per model the seconds per iteration, its ratio to the first model's, and the minutes its
schedule's iterations take at that speed (training only, no evaluation). Times and the ratios between
models both differ between machines (convolution-heavy models most): measure on the machine in question.
"""
import argparse
import sys
import tempfile
import time

import instseg  # noqa: F401  (first: faster-coco-eval stands in for pycocotools)
from instseg.cli import compose, fail, group_options
from instseg.errors import ConfigError


def time_model(name: str, overrides: list, iters: int, work_dir: str) -> tuple:
    """(seconds per training iteration, the schedule's iterations) of ``model=name``."""
    from mmengine.runner import Runner

    from instseg.config import check_buildable, to_mmengine
    from instseg.engine.runner import check_device, prepare_data

    cfg = compose('train', [f'model={name}', *overrides, f'work_dir={work_dir}/{name}'])
    check_device(cfg)  # as tools/train.py: amp=true without a GPU fails here, in one line
    check_buildable(cfg)
    prepare_data(cfg, ('train',))
    mm = to_mmengine(cfg)
    mm.log_level = 'WARNING'
    runner = Runner.from_cfg(mm)
    optim_wrapper = runner.build_optim_wrapper(mm.optim_wrapper)
    runner.model.train()
    batches = iter(runner.train_dataloader)

    def step():
        try:
            batch = next(batches)
        except StopIteration:  # a data set smaller than the run: time the iterations it had
            return False
        runner.model.train_step(batch, optim_wrapper)
        return True

    for _ in range(2):  # first iterations allocate and warm caches
        step()
    start, done = time.perf_counter(), 0
    while done < iters and step():
        done += 1
    if not done:
        raise ConfigError(f'model={name}: the training data ran out before the first timed iteration')
    schedule = cfg.schedule
    length = schedule.max_iters if not schedule.by_epoch else None
    return (time.perf_counter() - start) / done, length


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default=','.join(['mask_rcnn', *(m for m in group_options('model')
                                                                     if m != 'mask_rcnn')]),
                        help='comma-separated model options; the first is the reference of the ratios')
    parser.add_argument('--iters', type=int, default=20, help='timed iterations per model')
    args, overrides = parser.parse_known_args(argv)
    models = [m for m in args.models.split(',') if m]
    unknown = sorted(set(models) - set(group_options('model')))
    if unknown or not models:
        fail(ConfigError(f'--models: {", ".join(unknown) or "none given"}: valid choices: '
                         f'{", ".join(group_options("model"))}'))
    if args.iters < 1:
        fail(ConfigError(f'--iters: expected at least 1, got {args.iters}'))
    print(f'{"model":<20}{"s/iter":>8}{"ratio":>8}{"schedule":>10}{"min":>8}')
    reference = None
    with tempfile.TemporaryDirectory(prefix='instseg-benchmark-') as work_dir:
        for name in models:
            try:
                seconds, length = time_model(name, overrides, args.iters, work_dir)
            except ConfigError as e:
                fail(e)
            reference = reference or seconds
            minutes = f'{seconds * length / 60:8.1f}' if length else f'{"-":>8}'
            print(f'{name:<20}{seconds:8.3f}{seconds / reference:8.2f}{length or "epochs":>10}{minutes}',
                  flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
