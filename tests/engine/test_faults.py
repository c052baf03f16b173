"""Nothing trained is lost, as a user meets the faults through the tools: a full disk, a NaN loss,
SIGTERM / Ctrl-C, kill -9 then resume (bit-identical), damaged or foreign checkpoints.

Faults a user cannot cause on demand (a full disk, a NaN) are injected by running the tool in a Python
that patches one function first (``run_patched``)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_tool

from instseg.engine.checkpoint import load_checkpoint_file

# 4 training images in batches of 2: an epoch is 2 iterations, so a resume replays the data across
# an epoch's end; 2 validation images keep the evaluation short.
TINY = ['schedule=smoke', 'runtime.log_interval=1', 'data.synthetic.num_train=4', 'data.synthetic.num_val=2']
# A checkpoint at iteration 3, evaluated right after it (validation must not shift the random
# states training continues from), and the end at 4.
REFERENCE = [*TINY, 'schedule.max_iters=4', 'runtime.checkpoint_interval=3', 'schedule.val_interval=3',
             'deterministic=true', 'seed=0']


def patched(tool: str, patch: str) -> list:
    """The command running tools/<tool>.py in a Python that first runs ``patch``."""
    code = (f'import instseg\n{textwrap.dedent(patch)}\nimport runpy, sys\n'
            f'sys.argv[0] = {str(REPO / "tools" / f"{tool}.py")!r}\n'
            'runpy.run_path(sys.argv[0], run_name="__main__")\n')
    return [sys.executable, '-c', code]


def run_patched(patch: str, tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*patched(tool, patch), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ})


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def pointed(work_dir: Path) -> Path:
    return Path((work_dir / 'last_checkpoint').read_text().strip())


def train_losses(work_dir: Path) -> dict:
    """{iteration: logged losses} from the newest run's json log in ``work_dir``."""
    log = max(work_dir.glob('*/vis_data/scalars.json'), key=lambda p: p.stat().st_mtime)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return {r['iter']: {k: v for k, v in r.items() if 'loss' in k} for r in records if 'loss' in r}


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_checkpoint_file(str(a))['state_dict'], load_checkpoint_file(str(b))['state_dict']
    assert first.keys() == second.keys()
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differ, f'{len(differ)} of {len(first)} tensors differ, e.g. {differ[:3]}'


# ----------------------------------------------------------------------------- writing
def test_full_disk_keeps_the_previous_checkpoint(tmp_path):
    work_dir = tmp_path / 'run'
    proc = run_patched('''
        import errno, os
        from mmengine.fileio import LocalBackend
        put = LocalBackend.put
        def put_on_a_full_disk(self, obj, filepath):
            if 'iter_4' in str(filepath):  # half of it fits
                with open(filepath, 'wb') as f:
                    f.write(obj[:len(obj) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            put(self, obj, filepath)
        LocalBackend.put = put_on_a_full_disk
    ''', 'train', *TINY, 'schedule.max_iters=4', 'runtime.checkpoint_interval=2', f'work_dir={work_dir}')
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc.stderr) == (f'error: could not save checkpoint {work_dir}/iter_4.pth: no space left '
                                      f'on device; the previous checkpoint {work_dir}/iter_2.pth is intact')
    assert pointed(work_dir) == work_dir / 'iter_2.pth'
    assert load_checkpoint_file(str(work_dir / 'iter_2.pth'))['meta']['iter'] == 2
    assert sorted(p.name for p in work_dir.glob('*.pth')) == ['iter_2.pth']
    assert not list(work_dir.glob('.*.tmp')), 'a temporary file is left'


def test_nan_loss_stops_naming_the_term_and_keeps_the_last_good_checkpoint(tmp_path):
    work_dir = tmp_path / 'run'
    proc = run_patched('''
        from mmdet.models.detectors.two_stage import TwoStageDetector
        loss, calls = TwoStageDetector.loss, []
        def nan_mask_loss_at_iteration_3(self, *args, **kwargs):
            losses = loss(self, *args, **kwargs)
            calls.append(1)
            if len(calls) == 3:
                losses['loss_mask'] = losses['loss_mask'] * float('nan')
            return losses
        TwoStageDetector.loss = nan_mask_loss_at_iteration_3
    ''', 'train', *TINY, 'schedule.max_iters=4', 'runtime.checkpoint_interval=1', f'work_dir={work_dir}')
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc.stderr) == \
        f'error: loss_mask is nan at iteration 3; the last good checkpoint is {work_dir}/iter_2.pth'
    assert not (work_dir / 'iter_3.pth').exists()  # the NaN step's weights
    assert pointed(work_dir) == work_dir / 'iter_2.pth'


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    work_dir = tmp_path / 'run'
    proc = run_patched('''
        import torch
        step, calls = torch.optim.SGD.step, []
        def step_to_inf_at_iteration_2(self, *args, **kwargs):
            out = step(self, *args, **kwargs)
            calls.append(1)
            if len(calls) == 2:
                self.param_groups[0]['params'][0].data.fill_(float('inf'))
            return out
        torch.optim.SGD.step = step_to_inf_at_iteration_2
    ''', 'train', *TINY, 'schedule.max_iters=3', 'runtime.checkpoint_interval=1', f'work_dir={work_dir}')
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.fullmatch(rf'error: the weights hold inf after iteration 2 \([\w.]+\); no checkpoint is saved '
                        rf'with them; the last good checkpoint is {re.escape(str(work_dir))}/iter_1.pth',
                        last_line(proc.stderr))
    assert not (work_dir / 'iter_2.pth').exists() and pointed(work_dir) == work_dir / 'iter_1.pth'


# ----------------------------------------------------------------------------- signals
def _train_until_it_runs(work_dir: Path, *args: str, patch: str = '') -> subprocess.Popen:
    """A long run in its own process group, returned once its log shows a trained iteration."""
    with open(work_dir.parent / 'stderr', 'w') as stderr:
        proc = subprocess.Popen(
            [*patched('train', patch), *TINY, 'schedule.max_iters=1000', *args, f'work_dir={work_dir}'], cwd=REPO,
            stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'},
            start_new_session=True)
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if 'Iter(train) [' in line:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail('training did not start within 300 s')
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # the pipe must never fill up
    return proc


# Ctrl-C reaches the data loader's worker process too, which quits: with a slow data set, while the
# main process waits for its next batch (which then fails).
SLOW_DATA_WORKERS = '''
    import os, time
    from mmdet.datasets import CocoDataset
    get, main = CocoDataset.__getitem__, os.getpid()
    def slow_in_workers(self, idx):
        if os.getpid() != main:
            time.sleep(1)
        return get(self, idx)
    CocoDataset.__getitem__ = slow_in_workers
'''


@pytest.mark.parametrize('name, workers, patch', [('SIGTERM', 0, ''), ('SIGINT', 1, SLOW_DATA_WORKERS)],
                         ids=['sigterm', 'ctrl-c-with-data-workers'])
def test_a_stop_signal_saves_the_current_iteration(name, workers, patch, tmp_path):
    """SIGTERM (a scheduler's stop) to the process; Ctrl-C to the process group, data workers included."""
    work_dir = tmp_path / 'run'
    signum = getattr(signal, name)
    proc = _train_until_it_runs(work_dir, f'schedule.num_workers={workers}', patch=patch)
    (os.killpg if name == 'SIGINT' else os.kill)(proc.pid, signum)
    assert proc.wait(timeout=300) == 128 + signum
    message = last_line((tmp_path / 'stderr').read_text())
    match = re.fullmatch(rf'stopped by {name} after iteration (\d+): saved (.+); '
                         rf'continue with resume=true work_dir={re.escape(str(work_dir))}', message)
    assert match, message
    iteration, saved = int(match[1]), Path(match[2])
    assert saved == work_dir / f'iter_{iteration}.pth' and pointed(work_dir) == saved
    assert load_checkpoint_file(str(saved))['meta']['iter'] == iteration
    if name != 'SIGTERM':
        return
    resumed = run_tool('train', *TINY, f'schedule.max_iters={iteration + 1}', f'work_dir={work_dir}', 'resume=true')
    log = resumed.stdout + resumed.stderr
    assert f'resumed epoch: 0, iter: {iteration}' in log
    assert f'Iter(train) [{iteration + 1}/{iteration + 1}]' in log and 'Iter(train) [1/' not in log


# An epoch-based schedule: 4 images in batches of 2, 3 epochs of 2 iterations, a checkpoint each epoch.
EPOCHS = [*TINY, 'schedule.by_epoch=true', 'schedule.max_iters=null', 'schedule.max_epochs=3',
          'schedule.val_interval=3', 'runtime.checkpoint_interval=1', 'deterministic=true', 'seed=0']
# SIGTERM arriving during iteration 3, the first of epoch 2.
SIGTERM_IN_ITERATION_3 = '''
    import os, signal
    from instseg.engine.loops import ResumableEpochBasedTrainLoop
    run_iter = ResumableEpochBasedTrainLoop.run_iter
    def run_iter_signalled(self, idx, data_batch):
        if self._iter == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        run_iter(self, idx, data_batch)
    ResumableEpochBasedTrainLoop.run_iter = run_iter_signalled
'''


def test_a_stop_signal_inside_an_epoch_saves_and_resumes_there_bit_identically(tmp_path):
    """On an epoch-based schedule too (the paper recipes'): the checkpoint of the iteration the signal
    came in, and a resume that trains the rest of that epoch, not all of it again."""
    reference, stopped = tmp_path / 'reference', tmp_path / 'stopped'
    run_tool('train', *EPOCHS, f'work_dir={reference}')
    proc = run_patched(SIGTERM_IN_ITERATION_3, 'train', *EPOCHS, f'work_dir={stopped}')
    assert proc.returncode == 143, proc.stderr[-3000:]
    saved = stopped / 'epoch_2_iter_3.pth'
    assert last_line(proc.stderr) == (f'stopped by SIGTERM after iteration 3: saved {saved}; '
                                      f'continue with resume=true work_dir={stopped}')
    assert pointed(stopped) == saved and load_checkpoint_file(str(saved))['meta']['iter'] == 3
    resumed = run_tool('train', *EPOCHS, f'work_dir={stopped}', 'resume=true')
    log = resumed.stdout + resumed.stderr
    assert 'resumed epoch: 1, iter: 3' in log
    assert sorted(train_losses(stopped)) == [4, 5, 6]  # iteration 3 is not trained again
    assert_same_weights(reference / 'epoch_3.pth', stopped / 'epoch_3.pth')


# ----------------------------------------------------------------------------- kill -9, determinism
@pytest.fixture(scope='module')
def reference(tmp_path_factory) -> Path:
    """An uninterrupted deterministic run: checkpoints at iterations 3 and 4."""
    work_dir = tmp_path_factory.mktemp('reference') / 'run'
    run_tool('train', *REFERENCE, f'work_dir={work_dir}')
    return work_dir


def test_resume_after_kill_is_bit_identical(reference, tmp_path):
    """What kill -9 after checkpoint 3, while checkpoint 4 was being written, leaves: iter_3.pth,
    last_checkpoint naming it, and a partial temporary file. Resuming reaches the reference's weights
    bit for bit (data order and augmentation after the resume included)."""
    work_dir = tmp_path / 'killed'
    shutil.copytree(reference, work_dir)
    (work_dir / 'iter_4.pth').unlink()
    (work_dir / '.iter_4.pth.x1y2.tmp').write_bytes((reference / 'iter_4.pth').read_bytes()[:1000])
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_3.pth'))
    proc = run_tool('train', *REFERENCE, f'work_dir={work_dir}', 'resume=true')
    assert 'resumed epoch: 0, iter: 3' in proc.stdout + proc.stderr
    assert not list(work_dir.glob('.*.tmp'))
    assert_same_weights(reference / 'iter_4.pth', work_dir / 'iter_4.pth')
    assert train_losses(work_dir)[4] == train_losses(reference)[4]


def test_deterministic_runs_repeat(reference, tmp_path):
    again = tmp_path / 'again'
    run_tool('train', *REFERENCE, f'work_dir={again}')
    assert train_losses(again) == train_losses(reference) and len(train_losses(again)) == 4
    assert_same_weights(reference / 'iter_4.pth', again / 'iter_4.pth')


# ----------------------------------------------------------------------------- loading
def test_a_truncated_checkpoint_fails_in_one_line(reference, tmp_path):
    damaged = tmp_path / 'run'
    damaged.mkdir()
    shutil.copy(reference / 'config.yaml', damaged)
    data = (reference / 'iter_4.pth').read_bytes()
    (damaged / 'iter_4.pth').write_bytes(data[:len(data) // 2])
    proc = run_tool('test', f'checkpoint={damaged / "iter_4.pth"}', f'work_dir={tmp_path / "test"}', check=False)
    assert proc.returncode == 2
    assert re.fullmatch(rf'error: checkpoint {re.escape(str(damaged))}/iter_4.pth is truncated or corrupt '
                        r'\(RuntimeError: .+\); use an earlier checkpoint of the run', last_line(proc.stderr))

    # resume=true reads the same file through last_checkpoint
    resumed = tmp_path / 'resumed'
    shutil.copytree(reference, resumed)
    (resumed / 'iter_4.pth').write_bytes(data[:len(data) // 2])
    (resumed / 'last_checkpoint').write_text(str(resumed / 'iter_4.pth'))
    proc = run_tool('train', *REFERENCE, 'schedule.max_iters=5', f'work_dir={resumed}', 'resume=true', check=False)
    assert proc.returncode == 2
    assert last_line(proc.stderr).startswith(f'error: checkpoint {resumed}/iter_4.pth is truncated or corrupt')


def test_a_checkpoint_of_another_model_fails_naming_the_keys(reference, tmp_path):
    alone = tmp_path / 'copied'  # without its config.yaml: the command line's config applies
    alone.mkdir()
    shutil.copy(reference / 'iter_4.pth', alone)
    proc = run_tool('test', f'checkpoint={alone / "iter_4.pth"}', 'model=cascade_mask_rcnn', *TINY[2:],
                    f'work_dir={tmp_path / "test"}', check=False)
    assert proc.returncode == 2
    message = last_line(proc.stderr)
    assert message.startswith(f'error: checkpoint {alone}/iter_4.pth was saved from another model than this '
                              'config builds: '), message
    assert re.search(r'\d+ tensors of the model are missing \(roi_head\.bbox_head\.0\.[\w.]+, [\w.]+, [\w.]+, '
                     r'\.\.\.\)', message), message
    assert message.endswith('; the config must match the run that saved it (its config.yaml)')
