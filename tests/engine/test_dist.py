"""instseg.engine.dist in one process: reading each launcher's world, the mmengine config a launch
gets, and the requeue -> resume decision. Multi-process runs are in tests/tools/test_dist_tools.py."""
import pytest
from conftest import SMALL_SYNTHETIC
from omegaconf import OmegaConf

from instseg.engine import dist
from instseg.errors import ConfigError

TORCHRUN = dict(TORCHELASTIC_RUN_ID='none', RANK='1', WORLD_SIZE='2', LOCAL_RANK='1',
                MASTER_ADDR='127.0.0.1', MASTER_PORT='29511')
LAUNCH_VARIABLES = set(TORCHRUN) | {'SLURM_PROCID', 'SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS', 'SLURM_LOCALID',
                                    'SLURM_JOB_ID', 'SUBMITIT_LOCAL_GLOBALID', 'SUBMITIT_LOCAL_JOB_ID',
                                    'SUBMITIT_EXECUTOR'}


@pytest.fixture
def launch_env(monkeypatch):
    """No launcher's variables but those a test sets."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_env(**variables):
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
    return set_env


def test_torchrun_world():
    assert dist.world_from_environment(TORCHRUN) == dist.World(1, 2, 1, '127.0.0.1', 29511, 'torchrun')


def test_srun_world_takes_the_first_node_and_a_port_from_the_job():
    env = dict(SLURM_PROCID='5', SLURM_STEP_NUM_TASKS='16', SLURM_NTASKS='16', SLURM_LOCALID='1',
               SLURM_JOB_ID='4242', MASTER_ADDR='node01')
    world = dist.world_from_environment(env)
    assert (world.rank, world.world_size, world.local_rank, world.master_addr) == (5, 16, 1, 'node01')
    assert world.master_port == dist.world_from_environment({**env, 'SLURM_PROCID': '0'}).master_port
    assert 20000 <= world.master_port < 40000


def test_submitit_local_world():
    env = dict(SUBMITIT_LOCAL_GLOBALID='1', SUBMITIT_LOCAL_LOCALID='1', SUBMITIT_LOCAL_NTASKS='2',
               SUBMITIT_LOCAL_JOB_ID='777')
    assert dist.world_from_environment(env) == dist.World(1, 2, 1, '127.0.0.1', 20777, 'submitit_local')


def test_a_single_process_or_a_slurm_batch_script_is_no_launch():
    assert dist.world_from_environment({}) is None
    assert dist.world_from_environment({**TORCHRUN, 'RANK': '0', 'WORLD_SIZE': '1'}) is None
    # sbatch's script sees SLURM_NTASKS of the whole job but is one process; srun's tasks are the launch
    assert dist.world_from_environment(dict(SLURM_PROCID='0', SLURM_NTASKS='8', SLURM_JOB_ID='1')) is None


def test_slurm_without_scontrol_asks_for_the_master(monkeypatch):
    monkeypatch.setenv('PATH', '/nonexistent')
    with pytest.raises(ConfigError, match='set MASTER_ADDR=HOST'):
        dist.world_from_environment(dict(SLURM_PROCID='0', SLURM_STEP_NUM_TASKS='2', SLURM_JOB_NODELIST='n[1-2]'))


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(dist.TIMEOUT_ENV, raising=False)
    assert dist.timeout_s() == 1800
    monkeypatch.setenv(dist.TIMEOUT_ENV, '30')
    assert dist.timeout_s() == 30
    monkeypatch.setenv(dist.TIMEOUT_ENV, '1m')
    with pytest.raises(ConfigError, match=r'^INSTSEG_DIST_TIMEOUT=1m: expected a positive number of seconds$'):
        dist.timeout_s()


def test_without_a_process_group_nothing_is_shared():
    args = ['schedule=smoke']
    assert dist.with_shared_work_dir(args, 'work_dirs/x') is args
    assert dist.broadcast_from_rank0('mine') == 'mine'


def _mm(overrides=()):
    from instseg.cli import compose
    from instseg.config import to_mmengine
    return to_mmengine(compose('train', ['schedule=smoke', *SMALL_SYNTHETIC, *overrides]))


def test_a_cpu_launch_gets_gloo_cpu_ddp_and_gathers_results_through_the_group(launch_env):
    launch_env(**TORCHRUN)
    mm = _mm()
    assert mm.launcher == 'pytorch'
    assert mm.env_cfg.dist_cfg == dict(backend='gloo', timeout=1800)
    assert mm.model_wrapper_cfg.type == 'MMDistributedDataParallel' and mm.model_wrapper_cfg.device_ids is None
    assert mm.val_evaluator.collect_device == mm.test_evaluator.collect_device == 'gpu'
    assert mm.auto_scale_lr == dict(enable=False, base_batch_size=16)


def test_one_process_is_not_distributed(launch_env):
    assert _mm().launcher == 'none'


def test_launcher_none_under_a_launch_is_refused(launch_env):
    launch_env(**TORCHRUN)
    with pytest.raises(ConfigError, match=r'^launcher=none: this process is rank 1 of 2 \(torchrun\); '
                                          r'drop launcher=none or start one process$'):
        _mm(['launcher=none'])


def test_sync_bn_is_one_override_and_needs_gpus_when_distributed(launch_env):
    sync_bn = ['model.backbone.norm_cfg.type=SyncBN']
    assert _mm(sync_bn).model.backbone.norm_cfg.type == 'SyncBN'  # one process: mmengine reverts it to BN
    launch_env(**TORCHRUN)
    with pytest.raises(ConfigError, match='SyncBN needs CUDA GPUs'):
        _mm(sync_bn)


def test_the_slurm_launcher_presets_map_gpus_to_tasks():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from instseg.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base='1.3', config_dir=str(CONFIG_DIR)):
        slurm = compose('train', ['hydra/launcher=submitit_slurm', 'hydra.launcher.nodes=2',
                                  'hydra.launcher.gpus_per_node=4'], return_hydra_config=True).hydra.launcher
        local = compose('train', ['hydra/launcher=submitit_local', 'hydra.launcher.tasks_per_node=2'],
                        return_hydra_config=True).hydra.launcher
    assert slurm._target_.endswith('SlurmLauncher') and local._target_.endswith('LocalLauncher')
    assert (slurm.nodes, slurm.tasks_per_node, slurm.max_num_timeout) == (2, 4, 3)
    assert local.tasks_per_node == 2


def test_a_requeued_submitit_job_resumes_its_own_run_only(launch_env, tmp_path):
    launch_env(SUBMITIT_LOCAL_JOB_ID='123')
    cfg = OmegaConf.create(dict(work_dir=str(tmp_path), resume=False))
    dist.resume_if_requeued(cfg)  # first start: marks the work_dir as this job's
    assert not cfg.resume and (tmp_path / dist.SUBMITIT_JOB_FILE).read_text() == '123\n'
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_2.pth'))
    dist.resume_if_requeued(cfg)  # started again with a checkpoint of its own: requeued
    assert cfg.resume

    other_job = OmegaConf.create(dict(work_dir=str(tmp_path), resume=False))
    launch_env(SUBMITIT_LOCAL_JOB_ID='124')  # someone else's run: train's own check refuses it
    dist.resume_if_requeued(other_job)
    assert not other_job.resume


def test_outside_submitit_resume_is_left_to_the_user(launch_env, tmp_path):
    cfg = OmegaConf.create(dict(work_dir=str(tmp_path), resume=False))
    (tmp_path / 'last_checkpoint').write_text('iter_2.pth')
    dist.resume_if_requeued(cfg)
    assert not cfg.resume and not (tmp_path / dist.SUBMITIT_JOB_FILE).exists()
