"""The tools end to end, as a user runs them: train -> checkpoint -> test -> evaluate -> resume."""
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from conftest import SMALL_SYNTHETIC, run_tool, shared

from instseg.cli import group_options
from instseg.config import COCO_STAT_NAMES

SMOKE = ['schedule=smoke', 'schedule.max_iters=4', 'runtime.checkpoint_interval=2', 'runtime.log_interval=1']


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('run') / 'smoke'
    proc = run_tool('train', *SMOKE, *SMALL_SYNTHETIC, f'work_dir={work_dir}')
    return work_dir, proc


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def _data_root(work_dir: Path) -> Path:
    return Path(OmegaConf.load(work_dir / 'config.yaml').data.root)


def test_train_writes_a_complete_work_dir(run_dir):
    work_dir, proc = run_dir
    assert (work_dir / 'config.yaml').is_file()
    assert (work_dir / 'iter_4.pth').is_file() and (work_dir / 'iter_2.pth').is_file()
    assert Path((work_dir / 'last_checkpoint').read_text().strip()).name == 'iter_4.pth'
    metrics = _metrics(work_dir / 'metrics.json')
    for iou_type in ('bbox', 'segm'):
        assert list(metrics[iou_type]) == list(COCO_STAT_NAMES)
    assert metrics['iter'] == 4
    assert list(work_dir.glob('*/vis_data/events.out.tfevents.*')), 'no TensorBoard scalars'
    assert 'eta:' in proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith(f'work_dir: {work_dir}')
    assert 'segm ' in proc.stdout and 'bbox ' in proc.stdout  # the final tables


def test_test_reproduces_the_final_evaluation(run_dir, tmp_path):
    work_dir, _ = run_dir
    out = tmp_path / 'test'
    proc = run_tool('test', f'checkpoint={work_dir / "iter_4.pth"}', f'work_dir={out}')
    assert _metrics(out / 'metrics.json')['segm'] == _metrics(work_dir / 'metrics.json')['segm']
    assert _metrics(out / 'metrics.json')['bbox'] == _metrics(work_dir / 'metrics.json')['bbox']
    assert (out / 'results.segm.json').is_file() and (out / 'results.bbox.json').is_file()
    assert 'AP per class' in proc.stdout

    # evaluate.py on the written results gives the same segm statistics
    gt = _data_root(work_dir) / 'annotations/instances_val.json'
    run_tool('evaluate', f'gt={gt}', f'results={out / "results.segm.json"}', 'iou_type=segm',
             f'out={tmp_path / "eval.json"}')
    evaluated = _metrics(tmp_path / 'eval.json')['segm']
    assert evaluated == pytest.approx(_metrics(out / 'metrics.json')['segm'], abs=1e-12)


def test_format_only_writes_results_without_ground_truth(run_dir, tmp_path):
    """test-dev style: an image-info file (images and categories, no annotations)."""
    work_dir, _ = run_dir
    info = json.loads((_data_root(work_dir) / 'annotations/instances_val.json').read_text())
    del info['annotations']
    image_info = tmp_path / 'image_info_val.json'
    image_info.write_text(json.dumps(info))
    out = tmp_path / 'format'
    run_tool('test', f'checkpoint={work_dir / "iter_2.pth"}', f'work_dir={out}', 'format_only=true',
             f'data.test.ann={image_info}')
    results = json.loads((out / 'results.segm.json').read_text())
    assert results and {r['image_id'] for r in results} <= {i['id'] for i in info['images']}
    assert not (out / 'metrics.json').exists()


def test_resume_continues_from_the_last_checkpoint(run_dir, tmp_path):
    import shutil
    work_dir, _ = run_dir
    resumed = tmp_path / 'resumed'
    shutil.copytree(work_dir, resumed)
    (resumed / 'last_checkpoint').write_text(str(resumed / 'iter_2.pth'))
    (resumed / 'iter_4.pth').unlink()
    proc = run_tool('train', *SMOKE, *SMALL_SYNTHETIC, f'work_dir={resumed}', 'resume=true')
    log = proc.stdout + proc.stderr
    assert 'resumed epoch: 0, iter: 2' in log
    assert 'Iter(train) [3/4]' in log and 'Iter(train) [1/4]' not in log
    assert (resumed / 'iter_4.pth').is_file()


def test_ema_run_evaluates_and_saves_the_averaged_weights(tmp_path):
    import torch
    work_dir, out = tmp_path / 'ema', tmp_path / 'test'
    run_tool('train', *SMOKE, *SMALL_SYNTHETIC, f'work_dir={work_dir}', 'schedule.ema={momentum: 0.5, gamma: 1}')
    checkpoint = torch.load(work_dir / 'iter_4.pth', map_location='cpu', weights_only=False)
    raw = {k[len('module.'):]: v for k, v in checkpoint['ema_state_dict'].items() if k.startswith('module.')}
    averaged = checkpoint['state_dict']
    assert raw.keys() == averaged.keys()
    assert not torch.equal(raw['backbone.conv1.weight'], averaged['backbone.conv1.weight'])
    run_tool('test', f'checkpoint={work_dir / "iter_4.pth"}', f'work_dir={out}')  # the averaged weights again
    assert _metrics(out / 'metrics.json')['segm'] == _metrics(work_dir / 'metrics.json')['segm']


def test_existing_run_is_never_overwritten(run_dir):
    work_dir, _ = run_dir
    before = (work_dir / 'iter_4.pth').stat().st_mtime
    proc = run_tool('train', *SMOKE, *SMALL_SYNTHETIC, f'work_dir={work_dir}', check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count('\n') == 0 and 'already holds a trained run' in proc.stderr
    assert (work_dir / 'iter_4.pth').stat().st_mtime == before


@pytest.mark.parametrize('args, message', [
    (['model=htcc'], f"model=htcc: no such option; valid choices: {', '.join(group_options('model'))}"),
    (['schedule.max_iter=2'], "unknown key 'schedule.max_iter'"),
    (['seed=x'], "seed: expected an integer, got 'x'"),
    (['-m', 'model=mask_rcnn,nope'], 'model=nope: no such option'),
])
def test_bad_command_lines_fail_in_one_line(args, message):
    proc = run_tool('train', *args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f'error: {proc.stderr.strip()[7:]}' and message in proc.stderr
    assert proc.stderr.strip().count('\n') == 0


def test_class_names_that_do_not_match_fail_before_training(tmp_path):
    root = shared('fruit')
    proc = run_tool('train', 'data=coco', f'data.root={root}', 'data.train.ann=trainval.json',
                    'data.train.img=images', 'data.val.ann=trainval.json', 'data.val.img=images',
                    'data.classes=[date, walnut]', f'work_dir={tmp_path / "w"}', check=False)
    assert proc.returncode == 2 and "['walnut'] not among the categories" in proc.stderr
    proc = run_tool('train', 'data=coco', f'data.root={root}', 'data.train.ann=trainval.json',
                    'data.train.img=images', 'data.val.ann=trainval.json', 'data.val.img=images',
                    'data.classes=[fig, date]', f'work_dir={tmp_path / "w"}', check=False)
    assert proc.returncode == 2 and "must follow the order" in proc.stderr


@pytest.mark.parametrize('name, data', [
    ('fruit', ['data.train.ann=trainval.json', 'data.train.img=images',
               'data.val.ann=trainval.json', 'data.val.img=images']),
    ('tiny_coco', ['data.train.ann=annotations/instances_train2017.json', 'data.train.img=train2017',
                   'data.val.ann=annotations/instances_val2017.json', 'data.val.img=val2017']),
])
def test_real_coco_data_trains_and_evaluates(name, data, tmp_path):
    root = shared(name)
    work_dir = tmp_path / name
    run_tool('train', 'data=coco', f'data.root={root}', *data, 'data.scale=[320,320]',
             'schedule=smoke', 'schedule.max_iters=2', f'work_dir={work_dir}')
    metrics = _metrics(work_dir / 'metrics.json')
    assert set(metrics) >= {'bbox', 'segm'} and 0 <= metrics['segm']['AP'] <= 1
    classes = (work_dir / 'config.yaml').read_text()
    if name == 'fruit':
        assert set(metrics['classwise']['segm']) == {'date', 'fig', 'hazelnut'}
    else:
        assert len(metrics['classwise']['segm']) == 80 and 'toothbrush' in classes


def test_multirun_gives_each_job_its_own_work_dir_and_seeds_reproduce(tmp_path):
    import torch

    from instseg.engine.checkpoint import load_checkpoint_file
    sweep = tmp_path / 'sweep'
    run_tool('train', '-m', 'schedule=smoke', 'schedule.max_iters=2', *SMALL_SYNTHETIC, 'deterministic=true',
             'seed=0,1,0', f'work_dir={sweep}')
    for job in ('0', '1', '2'):
        assert (sweep / job / 'iter_2.pth').is_file() and (sweep / job / 'metrics.json').is_file()
        assert list((sweep / job).glob('*/vis_data/events.out.tfevents.*'))
    assert 'seed: 1' in (sweep / '1' / 'config.yaml').read_text()

    def weights(job):
        return load_checkpoint_file(str(sweep / job / 'iter_2.pth'), map_location='cpu')['state_dict']
    same, other = weights('0'), weights('2')
    assert all(torch.equal(same[k], other[k]) for k in same)  # deterministic=true: same seed, same run
    assert not all(torch.equal(same[k], v) for k, v in weights('1').items())


DETECTORS = group_options('model')


@pytest.fixture(scope='module')
def every_detector(tmp_path_factory):
    """One -m sweep trains every detector for two iterations: job i is DETECTORS[i]."""
    sweep = tmp_path_factory.mktemp('detectors') / 'sweep'
    run_tool('train', '-m', f'model={",".join(DETECTORS)}', 'schedule=smoke', 'schedule.max_iters=2',
             *SMALL_SYNTHETIC, f'work_dir={sweep}', timeout=900)
    return sweep


@pytest.mark.parametrize('name', DETECTORS)
def test_every_detector_trains_then_tests_to_the_same_metrics(every_detector, name, tmp_path):
    job = every_detector / str(DETECTORS.index(name))
    assert f'name: {name}' in (job / 'config.yaml').read_text()
    trained = _metrics(job / 'metrics.json')
    assert set(trained) >= {'bbox', 'segm', 'classwise'}
    out = tmp_path / 'test'
    run_tool('test', f'checkpoint={job / "iter_2.pth"}', f'work_dir={out}')
    tested = _metrics(out / 'metrics.json')
    assert tested['segm'] == trained['segm'] and tested['bbox'] == trained['bbox']


def test_test_overrides_keys_only_the_saved_runs_model_has(every_detector, tmp_path):
    """K-Net's test_cfg has keys the default model's (Mask R-CNN's) has not."""
    job = every_detector / str(DETECTORS.index('knet'))
    out = tmp_path / 'test'
    run_tool('test', f'checkpoint={job / "iter_2.pth"}', f'work_dir={out}', 'model.test_cfg.max_per_img=1')
    assert OmegaConf.load(out / 'config.yaml').model.test_cfg.max_per_img == 1
    proc = run_tool('test', f'checkpoint={job / "iter_2.pth"}', f'work_dir={out}', 'model=mask_rcnn', check=False)
    assert proc.returncode == 2 and 'a saved run keeps its model' in proc.stderr
