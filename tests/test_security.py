"""Nothing in a config or on the command line imports or runs code: every ``type`` names a registered
type, and ``_target_``, ``custom_imports``, foreign ``_scope_`` and code-naming hydra.* values are
refused in one line, before anything is built. Each vector here would create a file if it ran."""
import pytest
from conftest import run_tool
from mmengine.registry import init_default_scope

from instseg.cli import compose
from instseg.config import to_mmengine
from instseg.errors import ConfigError
from instseg.registry import MODELS

NOT_REGISTERED = 'is not a registered type (types are looked up in the instseg registry; dotted import paths are not allowed)'
HYDRA_CODE = ('not allowed on the command line: Hydra would import and call it; choose a Hydra plugin by its '
              'group (e.g. hydra/launcher=submitit_slurm)')


@pytest.mark.parametrize('overrides, message', [
    (['model.backbone.type=os.system', '+model.backbone.command="touch {flag}"'],
     f"model.backbone.type='os.system' {NOT_REGISTERED}"),
    (['model.backbone.type=builtins.exec', '+model.backbone.source="open(\'{flag}\', \'w\')"'],
     f"model.backbone.type='builtins.exec' {NOT_REGISTERED}"),
    # mmcv's batched_nms eval()s its type
    (['model.test_cfg.rcnn.nms.type=\'__import__("os").system("touch {flag}")\''],
     f'model.test_cfg.rcnn.nms.type=\'__import__("os").system("touch {{flag}}")\' {NOT_REGISTERED}'),
    (['model.roi_head.bbox_head.loss_cls.type=antigravity'],  # a bare name mmengine would import
     f"model.roi_head.bbox_head.loss_cls.type='antigravity' {NOT_REGISTERED}"),
    (['model.backbone.type=ResNett'], f"model.backbone.type='ResNett' {NOT_REGISTERED}; did you mean 'ResNet'?"),
    (['+model.backbone._target_=os.system', '+model.backbone.command="touch {flag}"'],
     "model.backbone._target_='os.system': not allowed: a config builds registered types (type: NAME), "
     'never a Python path'),
    (['+custom_imports={imports:[os]}'],
     'custom_imports: not allowed: a config cannot import modules (instseg, mmdet and their parts register '
     'when instseg is imported)'),
    (['+model.neck._scope_=evil'], "model.neck._scope_='evil' is not a registry scope (instseg, mmdet, mmengine)"),
    # Hydra instantiates callbacks when the job starts (it blocks os.system, not open)
    (['+hydra.callbacks.x={_target_:builtins.open,file:"{flag}",mode:w}'],
     f"hydra.callbacks.x._target_='builtins.open': {HYDRA_CODE}"),
    (['hydra.launcher._target_=os.system', 'hydra/launcher=submitit_local'],
     f"hydra.launcher._target_='os.system': {HYDRA_CODE}"),
    (['+hydra.job_logging.handlers.x={class:builtins.open,file:"{flag}",mode:w}'],  # logging's dictConfig
     f"hydra.job_logging.handlers.x.class='builtins.open': {HYDRA_CODE}"),
], ids=['dotted-type', 'builtins-exec', 'nms-eval', 'bare-module-name', 'typo', '_target_', 'custom_imports',
        '_scope_', 'hydra-callback', 'hydra-launcher', 'hydra-logging'])
def test_code_in_a_config_is_refused_in_one_line(overrides, message, tmp_path):
    flag = tmp_path / 'ran'
    with pytest.raises(ConfigError) as error:
        to_mmengine(compose('train', [o.replace('{flag}', str(flag)) for o in overrides]))
    assert str(error.value) == message.replace('{flag}', str(flag))
    assert not flag.exists()


def test_the_registry_never_imports_a_name_it_lacks(tmp_path):
    """What the check guards against, closed in mmengine's Registry too: a type it does not find is
    an error, not an import (mmengine 0.10 would call os.system here)."""
    flag = tmp_path / 'ran'
    init_default_scope('instseg')
    with pytest.raises(KeyError, match='os.system is not in the instseg::model registry'):
        MODELS.build(dict(type='os.system', command=f'touch {flag}'))
    assert not flag.exists()


def test_legit_hydra_overrides_pass():
    compose('train', ['hydra/launcher=submitit_slurm', 'hydra.launcher.partition=gpu', 'hydra.run.dir=/tmp/x'])


@pytest.mark.parametrize('overrides, message', [
    (['model.backbone.type=os.system', '+model.backbone.command="touch {flag}"'],
     f"error: model.backbone.type='os.system' {NOT_REGISTERED}"),
    (['+hydra.callbacks.x={_target_:builtins.open,file:"{flag}",mode:w}'],
     f"error: hydra.callbacks.x._target_='builtins.open': {HYDRA_CODE}"),
], ids=['type', 'hydra-callback'])
def test_the_train_tool_refuses_code_on_the_command_line(overrides, message, tmp_path):
    flag = tmp_path / 'ran'
    proc = run_tool('train', *[o.replace('{flag}', str(flag)) for o in overrides], f'work_dir={tmp_path / "run"}',
                    check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [message]
    assert not flag.exists() and not (tmp_path / 'run' / 'config.yaml').exists()  # refused before any work
