"""Distributed runs as users start them, on CPU processes with gloo: tools/dist_train.sh and
dist_test.sh (torchrun), two torchrun "nodes" on loopback, and Hydra's submitit launcher run locally
(with a requeue). 2 processes x 1 thread each."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, SMALL_SYNTHETIC

from instseg.config import COCO_STAT_NAMES

SMOKE = ['schedule=smoke', 'schedule.max_iters=4', 'runtime.checkpoint_interval=2', 'runtime.log_interval=1',
         *SMALL_SYNTHETIC]
# Each rank composes its own config: with microseconds in work_dir, only rank 0's decision keeps them
# in one directory.
STAMPED = 'run_${now:%H%M%S_%f}'


def _env(**extra) -> dict:
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PY': sys.executable, **extra}
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_RUN_ID', 'PORT'):
        env.pop(name, None)  # this test process's own, should it run under a launcher
    env.update(extra)
    return env


def _popen(command: list, **env) -> subprocess.Popen:
    """Starts ``command`` in its own session, its output going to a file (a pipe nobody reads
    while the test waits would fill up and stall the run)."""
    fd, log = tempfile.mkstemp(prefix='dist_tools_', suffix='.log')
    proc = subprocess.Popen(command, cwd=REPO, env=_env(**env), stdout=fd, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    os.close(fd)
    proc.log = Path(log)
    return proc


def _start(script: str, *args: str, **env) -> subprocess.Popen:
    return _popen(['bash', str(REPO / 'tools' / script), *args], **env)


def _output(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors='replace')


def _wait(proc: subprocess.Popen, timeout: int = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f'timed out after {timeout} s:\n{_output(proc)[-4000:]}')
    out = _output(proc)
    proc.log.unlink()
    return out


def _finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    out = _wait(proc, timeout)
    assert proc.returncode == 0, f'exit {proc.returncode}:\n{out[-6000:]}'
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def _one_run(parent: Path) -> Path:
    """The single run directory rank 0 decided on (no stray directory of another rank)."""
    runs = [p for p in parent.iterdir()]
    assert len(runs) == 1, f'ranks disagreed on the work_dir: {runs}'
    return runs[0]


@pytest.fixture(scope='module')
def dist_run(tmp_path_factory):
    parent = tmp_path_factory.mktemp('dist')
    out = _finish(_start('dist_train.sh', '2', *SMOKE, 'schedule.auto_scale_lr=true', 'schedule.optimizer.lr=0.04',
                         f'work_dir={parent / STAMPED}'))
    return _one_run(parent), out


def test_two_processes_train_into_one_work_dir_written_by_rank_0(dist_run):
    work_dir, out = dist_run
    assert (work_dir / 'config.yaml').is_file() and (work_dir / '.hydra').is_dir()
    assert (work_dir / 'iter_4.pth').is_file() and (work_dir / 'iter_2.pth').is_file()
    assert _metrics(work_dir / 'metrics.json')['iter'] == 4
    logs = list(work_dir.glob('*/*.log'))
    assert len(logs) == 1, logs  # rank 0's; other ranks keep theirs off disk
    # each log line and the final table once on screen, not once per rank
    assert out.count('Iter(train) [4/4]') == 1 and out.count('Iter(train) [1/4]') == 1, out[-3000:]
    assert out.count('work_dir: ') == 1 and out.rstrip().endswith(f'work_dir: {work_dir}')


def test_effective_batch_and_scaled_lr_are_logged_and_saved(dist_run):
    work_dir, out = dist_run
    info = _metrics(work_dir / 'run_info.json')
    # smoke: 2 images per process and a reference batch of 16; 2 processes: 4, a quarter of the LR
    assert (info['world_size'], info['batch_per_process'], info['effective_batch']) == (2, 2, 4)
    assert info['lr'] == pytest.approx(0.04 * 4 / 16) and info['backend'] == 'gloo'
    assert 'effective batch 4 (2 process(es) x 2), lr 0.01' in out


def test_two_processes_learn(dist_run):
    """The loss (rank 0's, of DDP's shared weights) falls over the run."""
    work_dir, out = dist_run
    losses = [float(line.split(' loss: ')[1].split()[0]) for line in out.splitlines() if 'Iter(train)' in line]
    assert len(losses) == 4 and losses[-1] < losses[0], losses


def test_two_process_evaluation_equals_one_process_test(dist_run, tmp_path):
    work_dir, _ = dist_run
    checkpoint = work_dir / 'iter_4.pth'
    _finish(_popen([sys.executable, str(REPO / 'tools' / 'test.py'), f'checkpoint={checkpoint}',
                    f'work_dir={tmp_path / "one"}']))  # one thread, as each of the two processes
    _finish(_start('dist_test.sh', '2', f'checkpoint={checkpoint}', f'work_dir={tmp_path / "two"}'))
    one, two = _metrics(tmp_path / 'one' / 'metrics.json'), _metrics(tmp_path / 'two' / 'metrics.json')
    for iou_type in ('bbox', 'segm'):
        assert list(two[iou_type]) == list(COCO_STAT_NAMES)
        assert two[iou_type] == one[iou_type]  # all 24 statistics, exactly
    assert two['classwise'] == one['classwise']
    # the evaluation during 2-process training (same weights, iteration 4) too
    trained = _metrics(work_dir / 'metrics.json')
    assert {k: trained[k] for k in ('bbox', 'segm')} == {k: two[k] for k in ('bbox', 'segm')}


def test_two_nodes_on_loopback_train_and_evaluate_together(tmp_path):
    port = str(_free_port())
    nodes = [_start('dist_train.sh', '1', *SMOKE, 'schedule.max_iters=2', f'work_dir={tmp_path / STAMPED}',
                    NNODES='2', NODE_RANK=str(rank), MASTER_ADDR='127.0.0.1', PORT=port) for rank in (0, 1)]
    outs = [_finish(node) for node in nodes]
    work_dir = _one_run(tmp_path)
    assert _metrics(work_dir / 'metrics.json')['iter'] == 2
    assert _metrics(work_dir / 'run_info.json')['world_size'] == 2
    assert 'work_dir: ' in outs[0] and 'work_dir: ' not in outs[1]  # the summary is node 0's


def test_multi_node_needs_a_port(tmp_path):
    proc = _start('dist_train.sh', '1', 'schedule=smoke', NNODES='2', NODE_RANK='0')
    out = _wait(proc, timeout=60)
    assert proc.returncode == 2
    assert out.strip() == 'error: PORT=... is required with NNODES=2 (the same free port on every node)'


def _children(pid: int) -> list:
    tasks = Path(f'/proc/{pid}/task')
    return [int(c) for t in tasks.iterdir() for c in (t / 'children').read_text().split()]


def _descendant_with(launcher_pid: int, variable: str) -> int | None:
    """The process under ``launcher_pid`` whose environment holds ``variable`` (e.g. RANK=1)."""
    pending = [launcher_pid]
    while pending:
        pid = pending.pop()
        try:
            environ = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
            pending += _children(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if variable.encode() in environ:
            return pid
    return None


def test_a_killed_rank_ends_the_job_naming_it(tmp_path):
    proc = _start('dist_train.sh', '2', *SMOKE, 'schedule.max_iters=1000', f'work_dir={tmp_path / "run"}')
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / 'run' / 'run_info.json').is_file():  # training has begun
            assert proc.poll() is None and time.monotonic() < deadline, _output(proc)[-3000:]
            time.sleep(0.5)
        victim = _descendant_with(proc.pid, 'RANK=1')
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        out = _wait(proc, timeout=120)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert 'rank      : 1 (local_rank: 1)' in out and 'Signal 9 (SIGKILL)' in out, out[-3000:]
    assert elapsed < 60


def _train_submitit_local(*args: str) -> subprocess.Popen:
    return _popen([sys.executable, str(REPO / 'tools' / 'train.py'), '-m', 'hydra/launcher=submitit_local',
                   'hydra.launcher.tasks_per_node=2', *args])


def test_submitit_local_runs_two_tasks_as_one_process_group(tmp_path):
    out = _finish(_train_submitit_local(*SMOKE, 'schedule.max_iters=2', f'work_dir={tmp_path}'))
    job = tmp_path / '0'
    assert _metrics(job / 'metrics.json')['iter'] == 2, out[-3000:]
    assert _metrics(job / 'run_info.json')['world_size'] == 2
    assert f"runs: {tmp_path}/<job number>/; the jobs' output: {tmp_path}/.submitit/" in out  # said on screen


def test_a_preempted_submitit_job_is_requeued_and_resumes(tmp_path):
    """SIGUSR2 is Slurm's (and submitit's) preemption signal: rank 0 requeues the job, which starts
    again with the same config and continues from the last checkpoint in its work_dir."""
    proc = _train_submitit_local(*SMOKE, 'schedule.max_iters=8', f'work_dir={tmp_path}')
    job = tmp_path / '0'
    try:
        deadline = time.monotonic() + 300
        while not (job / 'last_checkpoint').is_file():  # iteration 2's checkpoint, complete
            assert proc.poll() is None and time.monotonic() < deadline, _output(proc)[-3000:]
            time.sleep(0.2)
        rank0 = _submitit_task(proc.pid, 0)
        os.kill(rank0, signal.SIGUSR2)
        _finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _metrics(job / 'metrics.json')['iter'] == 8
    logs = '\n'.join(p.read_text() for p in (tmp_path / '.submitit').glob('*/*_0_log.*'))
    assert 'requeued: resuming from' in logs and 'Requeued job' in logs, logs[-4000:]
    resumed_at = int(logs.split('resumed epoch: 0, iter: ')[1].split()[0].rstrip(',.'))
    assert resumed_at >= 2, logs[-4000:]


def _submitit_task(launcher_pid: int, rank: int) -> int:
    pid = _descendant_with(launcher_pid, f'SUBMITIT_LOCAL_GLOBALID={rank}')
    assert pid is not None, f'no submitit task of rank {rank} under {launcher_pid}'
    return pid


FAKE_SRUN = r'''#!/usr/bin/env bash
# Stands in for Slurm's srun on one machine: --ntasks copies of the command, with srun's variables.
echo "$@" > "$(dirname "$0")/srun_args"
ntasks=1
while [[ $1 == -* ]]; do
  case $1 in -p) shift ;; --ntasks=*) ntasks=${1#*=} ;; esac
  shift
done
pids=()
for ((rank = 0; rank < ntasks; rank++)); do
  SLURM_PROCID=$rank SLURM_LOCALID=$rank SLURM_NTASKS=$ntasks SLURM_STEP_NUM_TASKS=$ntasks \
    SLURM_STEP_NODELIST=node1 "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
'''
FAKE_SCONTROL = '#!/usr/bin/env bash\necho 127.0.0.1\n'  # `scontrol show hostnames node1`


def test_slurm_train_sh_runs_srun_tasks_as_one_process_group(tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, text in (('srun', FAKE_SRUN), ('scontrol', FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    proc = _start('slurm_train.sh', 'cpu', 'smoke', '2', *SMOKE, 'schedule.max_iters=2', f'work_dir={tmp_path / STAMPED}',
                  PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID=_job_id_with_a_free_port(),
                  GPUS_PER_NODE='0', TASKS_PER_NODE='2')
    out = _finish(proc)
    srun_args = (bin_dir / 'srun_args').read_text()
    assert '--ntasks=2 --ntasks-per-node=2' in srun_args and '--kill-on-bad-exit=1' in srun_args
    work_dir = next(p for p in tmp_path.iterdir() if p.name.startswith('run_'))
    assert len([p for p in tmp_path.iterdir() if p.name.startswith('run_')]) == 1
    assert _metrics(work_dir / 'run_info.json')['world_size'] == 2
    assert _metrics(work_dir / 'metrics.json')['iter'] == 2
    assert out.count('work_dir: ') == 1


def _job_id_with_a_free_port() -> str:
    """A Slurm job id whose port (instseg.engine.dist derives it from the id) is free now."""
    import random

    from instseg.engine.dist import _port_for_job
    for _ in range(100):
        job_id = str(random.randrange(1, 10 ** 6))
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', _port_for_job(job_id)))
                return job_id
            except OSError:
                continue
    raise AssertionError('no free port')
