"""Multi-process runs on torch.distributed: one process group for every launcher (torchrun, Slurm's
srun, Hydra's submitit launcher on Slurm or locally), NCCL on GPUs and gloo on CPUs.

instseg joins the process group itself, before mmengine's Runner (which then skips its own
``init_dist``): mmengine's launchers select a CUDA device unconditionally, and joining early lets
every rank agree on one work_dir before Hydra creates it. mmengine does the rest: DDP, distributed
samplers, rank-0-only checkpoints and logs, and gathering evaluation results from all ranks.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from mmengine.dist import is_main_process
from mmengine.hooks import Hook

from instseg.errors import ConfigError

# Seconds a collective (or joining the group) may wait for the other ranks before the job fails:
# a rank that hangs ends the job after this long instead of never. torch's and mmengine's default.
TIMEOUT_ENV = 'INSTSEG_DIST_TIMEOUT'
DEFAULT_TIMEOUT_S = 1800
# Marks a work_dir as written by one submitit job, so that the same job, requeued, resumes it.
SUBMITIT_JOB_FILE = '.submitit_job_id'
# configs/hydra/launcher/submitit_*.yaml keep the plugin's names (and are checked against its schema,
# which Hydra announces as deprecated at every use; it is what we want).
warnings.filterwarnings('ignore', message=r"\s*'hydra/launcher/submitit_\w+' is validated against ConfigStore")


_joined = None  # the World this process joined


@dataclass(frozen=True)
class World:
    """This process's place in a multi-process launch."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | submitit_local


def world_from_environment(env=None) -> World | None:
    """The launch this process belongs to, read from its launcher's variables; None when it runs
    alone. torchrun and submitit's local executor first (either may run inside a Slurm job), then
    Slurm's srun (submitit's Slurm jobs run srun too)."""
    if env is None and _joined is not None:  # the variables now are torchrun's, whoever launched
        return _joined
    env = os.environ if env is None else env
    if 'TORCHELASTIC_RUN_ID' in env or {'RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'} <= env.keys():
        world = World(int(env['RANK']), int(env['WORLD_SIZE']), int(env.get('LOCAL_RANK', 0)),
                      env['MASTER_ADDR'], int(env['MASTER_PORT']), 'torchrun')
    elif 'SUBMITIT_LOCAL_GLOBALID' in env:
        world = World(int(env['SUBMITIT_LOCAL_GLOBALID']), int(env['SUBMITIT_LOCAL_NTASKS']),
                      int(env['SUBMITIT_LOCAL_LOCALID']), '127.0.0.1',
                      _port_for_job(env['SUBMITIT_LOCAL_JOB_ID']), 'submitit_local')
    elif 'SLURM_PROCID' in env and 'SLURM_STEP_NUM_TASKS' in env:  # a task of srun, not a batch script
        job_id = env.get('SLURM_JOB_ID', '0')
        world = World(int(env['SLURM_PROCID']), int(env['SLURM_STEP_NUM_TASKS']), int(env.get('SLURM_LOCALID', 0)),
                      env.get('MASTER_ADDR') or _first_slurm_host(env), int(env.get('MASTER_PORT') or
                                                                            _port_for_job(job_id)), 'slurm')
    else:
        return None
    return world if world.world_size > 1 else None


def _first_slurm_host(env) -> str:
    """The job's first node, as mmengine's slurm launcher finds it."""
    nodes = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST') or env.get('SLURM_NODELIST')
    try:
        hosts = subprocess.run(['scontrol', 'show', 'hostnames', nodes], capture_output=True, text=True,
                               check=True).stdout.split()
        return hosts[0]
    except (OSError, subprocess.CalledProcessError, IndexError, TypeError):
        raise ConfigError(f'Slurm task: cannot find the first node of {nodes!r} with scontrol; '
                          'set MASTER_ADDR=HOST') from None


def _port_for_job(job_id: str) -> int:
    """A port every task of one job derives alike, and other jobs on the node most likely not."""
    digits = ''.join(c for c in str(job_id) if c.isdigit()) or '0'
    return 20000 + int(digits) % 20000


def timeout_s() -> int:
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    if not value.isdigit() or int(value) == 0:
        raise ConfigError(f'{TIMEOUT_ENV}={value}: expected a positive number of seconds')
    return int(value)


def backend() -> str:
    import torch
    return 'nccl' if torch.cuda.is_available() else 'gloo'


def init_process_group() -> World | None:
    """Joins this launch's process group (once: later calls only return the world). Exports the
    torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) mmengine reads."""
    import torch
    import torch.distributed as torch_dist

    global _joined
    world = world_from_environment()
    if world is None or torch_dist.is_initialized():
        return world
    os.environ.update(RANK=str(world.rank), WORLD_SIZE=str(world.world_size),
                      LOCAL_RANK=str(world.local_rank), MASTER_ADDR=world.master_addr,
                      MASTER_PORT=str(world.master_port))
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    seconds = timeout_s()
    try:
        torch_dist.init_process_group(backend(), timeout=timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as e:  # DistStoreError and timeouts are RuntimeErrors
        raise ConfigError(f'rank {world.rank} of {world.world_size}: could not join the process group at '
                          f'{world.master_addr}:{world.master_port} within {seconds} s '
                          f'({str(e).strip().splitlines()[0]})') from None
    if world.rank != 0:  # the same code on every rank: rank 0's warnings are everyone's (mmengine's
        warnings.simplefilter('ignore')  # logger likewise shows other ranks' errors only)
    _joined = world
    return world


def leave_process_group() -> None:
    """All ranks leave the group together, once their work is done. A rank left to the interpreter's
    teardown while its peers still run can abort ("terminate called without an active exception"),
    failing a run that went well."""
    import torch.distributed as torch_dist
    if torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


@contextlib.contextmanager
def process_group():
    """Joins this launch's process group for the block unless already joined, and then leaves it
    when the block ends without error."""
    import torch.distributed as torch_dist
    joins_here = not torch_dist.is_initialized()
    world = init_process_group()
    yield world
    if joins_here:
        leave_process_group()


def broadcast_from_rank0(value):
    """``value`` as rank 0 has it (any picklable object); unchanged without a process group."""
    import torch.distributed as torch_dist
    if not torch_dist.is_initialized():
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def with_shared_work_dir(args: list, work_dir: str | None) -> list:
    """The command line ``args`` as every rank should run it: with rank 0's work_dir (its own
    composition puts another time in a time-stamped one, now and then), and Hydra's own files
    written by rank 0 alone. ``args`` unchanged without a process group."""
    import torch.distributed as torch_dist
    if not torch_dist.is_initialized():
        return args
    args = pin_work_dir(args, broadcast_from_rank0(work_dir))
    if torch_dist.get_rank() != 0:
        args = args + ['hydra.output_subdir=null']
    return args


def pin_work_dir(args: list, work_dir: str | None) -> list:
    """``args`` with ``work_dir`` fixed to the value given, unless the command line already gives a
    plain one (a time-stamped or interpolated one would be composed anew, and may differ)."""
    given = [a for a in args if a.startswith('work_dir=')]
    if work_dir is None or (given and not any('${' in a for a in given)):
        return args
    quoted = work_dir.replace('\\', '\\\\').replace("'", "\\'")
    return [a for a in args if not a.startswith('work_dir=')] + [f"work_dir='{quoted}'"]


def resume_if_requeued(cfg) -> None:
    """A submitit job requeued after preemption or time-out runs again with the same config: make
    it resume from the checkpoint it left in its work_dir (rank 0 decides, for all ranks)."""
    from mmengine.dist import get_rank
    job_id = os.environ.get('SLURM_JOB_ID') if 'SUBMITIT_EXECUTOR' in os.environ else None
    job_id = job_id or os.environ.get('SUBMITIT_LOCAL_JOB_ID')
    if job_id is None or cfg.get('resume') is None or cfg.resume:
        return
    requeued = False
    if get_rank() == 0:
        work_dir = Path(cfg.work_dir)
        marker = work_dir / SUBMITIT_JOB_FILE
        has_run = (work_dir / 'last_checkpoint').is_file()
        requeued = has_run and marker.is_file() and marker.read_text().strip() == job_id
        if not has_run:  # another run's work_dir stays theirs (train refuses it)
            work_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(job_id + '\n')
    if broadcast_from_rank0(requeued):
        if get_rank() == 0:
            print(f'submitit job {job_id} requeued: resuming from {cfg.work_dir}/last_checkpoint')
        cfg.resume = True


def model_wrapper_cfg() -> dict:
    """mmengine's DDP wrapper: buffers are not broadcast before each forward (mmengine's choice;
    BufferSyncHook averages them instead), and CPU processes pass no device_ids (mmengine would pass
    LOCAL_RANK, a GPU's index; on GPUs it still does)."""
    import torch
    wrapper = dict(type='MMDistributedDataParallel', forward_sync_buffers=False, find_unused_parameters=False)
    if not torch.cuda.is_available():
        wrapper['device_ids'] = None
    return wrapper


def check_sync_bn(model: dict, distributed: bool) -> None:
    """torch's SyncBatchNorm runs on GPUs only; a single process reverts it to BatchNorm."""
    import torch
    if distributed and not torch.cuda.is_available() and 'SyncBN' in json.dumps(model):
        raise ConfigError("model: norm_cfg type SyncBN needs CUDA GPUs (torch's SyncBatchNorm has no CPU "
                          'kernel); use type=BN for CPU processes')


class RunInfoHook(Hook):
    """Logs and saves (``work_dir/run_info.json``) what a run's numbers depend on that its config
    alone does not say: the world, the effective batch and the learning rate actually used (after
    ``schedule.auto_scale_lr``)."""

    priority = 'VERY_LOW'  # after mmengine has built the optimizer and scaled its LR

    def before_train(self, runner) -> None:
        loader = runner.train_dataloader
        per_process = loader.batch_size if loader.batch_size is not None else loader.batch_sampler.batch_size
        groups = runner.optim_wrapper.optimizer.param_groups
        # Warm-up schedulers keep the (scaled) base LR as initial_lr and lower lr itself.
        lr = groups[0].get('initial_lr', groups[0]['lr'])
        info = dict(world_size=runner.world_size, batch_per_process=per_process,
                    effective_batch=runner.world_size * per_process, lr=lr,
                    auto_scale_lr=dict(runner.auto_scale_lr or {}),
                    backend=backend() if runner.distributed else None, iter=runner.iter)
        runner.logger.info(f"effective batch {info['effective_batch']} ({runner.world_size} process(es) x "
                           f'{per_process}), lr {lr:g}')
        if is_main_process():
            with open(os.path.join(runner.work_dir, 'run_info.json'), 'w') as f:
                json.dump(info, f, indent=2)


class BufferSyncHook(Hook):
    """Averages the model's floating-point buffers (BatchNorm's running statistics) over the ranks
    after every training iteration. DDP, as mmengine sets it up (broadcast_buffers=False), leaves
    each rank with the statistics of its own images: the checkpoint (rank 0's) and the evaluation
    (every rank's) would then use different models, and N processes would not score as one."""

    priority = 'ABOVE_NORMAL'  # before CheckpointHook saves (VERY_LOW) and before validation

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        from mmengine.dist import all_reduce_params

        from instseg.engine.hooks import bare_model

        if runner.world_size == 1:
            return
        all_reduce_params([b for b in bare_model(runner).buffers() if b.is_floating_point()], op='mean')


def register_hooks(runner) -> None:
    """The hooks of instseg's distributed runs (harmless in one process) on an mmengine Runner."""
    runner.register_hook(RunInfoHook())
    runner.register_hook(BufferSyncHook())
