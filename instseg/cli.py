"""Command-line entry for the tools: Hydra composition with one-line errors.

Every override is checked before any work (unknown group option, unknown key, wrong value type),
then Hydra's own ``main`` runs the task, so multirun (-m), launchers and sweepers work as usual.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from instseg.config import CONFIG_DIR, mappings
from instseg.errors import ConfigError

# Hydra flags that only print or locate things, and make our checks moot.
_PASS_THROUGH_FLAGS = ('--help', '-h', '--hydra-help', '--info', '-i', '--version', '--shell-completion', '-sc')


def group_options(group: str) -> list:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob('*.yaml'))


def _is_group(key: str) -> bool:
    return (CONFIG_DIR / key.lstrip('/')).is_dir()


def compose(config_name: str, overrides: Iterable[str] = ()) -> DictConfig:
    """Composes ``configs/<config_name>.yaml`` with ``overrides`` (the compose API, for tools and
    tests), checking them as the command line does. Raises ConfigError with a one-line message."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from yaml import MarkedYAMLError

    overrides = list(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base='1.3', config_dir=str(CONFIG_DIR), job_name=config_name):
        try:  # with Hydra's own node, so hydra.* overrides are checked too
            cfg = hydra_compose(config_name, overrides, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(_explain(e, config_name, overrides, hydra_compose)) from None
        except MarkedYAMLError as e:  # a config file the user edited
            mark = e.problem_mark
            raise ConfigError(f'{mark.name}:{mark.line + 1}: invalid YAML ({e.problem})') from None
        groups = [o for o in overrides if _is_group(o.split('=')[0].lstrip('+~'))]
        if len(groups) < len(overrides):  # values given: compare their types with the defaults'
            _check_types(cfg, hydra_compose(config_name, groups), overrides)
        hydra_values = [o for o in overrides if o.lstrip('+~').startswith('hydra.')]
        if hydra_values:
            _check_hydra_code(cfg, hydra_compose(config_name, [o for o in overrides if o not in hydra_values],
                                                 return_hydra_config=True))
    with open_dict(cfg):
        del cfg['hydra']  # it resolves only inside a running Hydra job
    _check_resolvable(cfg)
    return cfg


def _explain(error: Exception, config_name: str, overrides: list, hydra_compose) -> str:
    text = str(error)
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        group, _, option = missing.group(1).rpartition('/')
        if group and _is_group(group):
            return f"{group}={option}: no such option; valid choices: {', '.join(group_options(group))}"
    key = re.search(r"Could not (?:override|append to|delete from) '([^']+)'", text) or \
        re.search(r"Key '([^']+)' is not in struct", text)
    if key:
        full = key.group(1)
        without = [o for o in overrides if o.split('=')[0].lstrip('+~') != full]
        deeper = getattr(error.__cause__, 'full_key', '') or ''
        if deeper.startswith(full + '.'):  # a mapping given for a mapping: one of its keys is new
            parent = deeper.rpartition('.')[0]
            return (f"{full}: unknown key '{deeper}'" + _valid_keys(config_name, without, parent, hydra_compose) +
                    f"; to replace the whole mapping: ~{full} '+{full}=...'")
        parent = full.rpartition('.')[0]
        return f"unknown key '{full}'" + _valid_keys(config_name, without, parent, hydra_compose)
    return text.strip().splitlines()[0]


def _valid_keys(config_name: str, overrides: list, path: str, hydra_compose) -> str:
    """'; valid keys of PATH: ...' as composed with ``overrides``, or '' where that fails."""
    try:
        node = hydra_compose(config_name, overrides)
        node = OmegaConf.select(node, path) if path else node
    except Exception:  # noqa: BLE001 - best effort: the message without the list
        return ''
    if not isinstance(node, DictConfig):
        return ''
    return f"; valid keys{f' of {path}' if path else ''}: {', '.join(str(k) for k in node.keys())}"


def _check_types(cfg: DictConfig, base: DictConfig, overrides: list) -> None:
    """A value given on the command line must have the type of the value it replaces."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if override.is_delete() or override.is_add() or _is_group(key) or key.startswith('hydra.'):
            continue
        parent, _, leaf = key.rpartition('.')
        parent_node = OmegaConf.select(base, parent) if parent else base
        if not isinstance(parent_node, DictConfig) or leaf not in parent_node \
                or OmegaConf.is_interpolation(parent_node, leaf):
            continue  # new keys (+key=...) and interpolated values take what they are given
        old = parent_node[leaf]
        new = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if old is None or new is None:
            continue
        if not _same_kind(old, new):
            raise ConfigError(f'{key}: expected {_kind(old)}, got {override.get_value_element_as_str()!r}')


# Keys whose value Hydra imports and calls: instantiate's ``_target_`` (launchers, sweepers, callbacks)
# and logging.config.dictConfig's ``()`` and ``class`` (hydra.job_logging, hydra.hydra_logging).
_HYDRA_CODE_KEYS = ('_target_', '()', 'class')


def _check_hydra_code(cfg: DictConfig, shipped: DictConfig) -> None:
    """hydra.* values on the command line may not name code (``+hydra.callbacks.x={_target_: os.system,
    command: ...}`` would run it): every such key must keep the value Hydra's and our config groups
    give it. A plugin is chosen by its group instead (``hydra/launcher=submitit_slurm``)."""
    allowed = dict(_code_values(OmegaConf.to_container(shipped.hydra, resolve=False), 'hydra'))
    for path, value in _code_values(OmegaConf.to_container(cfg.hydra, resolve=False), 'hydra'):
        if path not in allowed or allowed[path] != value:
            raise ConfigError(f'{path}={value!r}: not allowed on the command line: Hydra would import and call '
                              'it; choose a Hydra plugin by its group (e.g. hydra/launcher=submitit_slurm)')


def _code_values(tree: Any, path: str):
    for where, node in mappings(tree, path):
        yield from ((f'{where}.{key}', value) for key, value in node.items() if key in _HYDRA_CODE_KEYS)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return 'a boolean (true/false)'
    if isinstance(value, (int, float)):
        return 'a number' if isinstance(value, float) else 'an integer'
    if isinstance(value, (list, ListConfig)):
        return 'a list'
    if isinstance(value, (dict, DictConfig)):
        return 'a mapping'
    return 'a string'


def _same_kind(old: Any, new: Any) -> bool:
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, float):
        return isinstance(new, (int, float))
    return _kind(old) == _kind(new)


def _check_resolvable(cfg: DictConfig) -> None:
    """Resolves every interpolation now (class names from annotation files, data set paths), so
    their errors come before any work."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        missing = re.search(r'Missing mandatory value: ([\w.]+)', str(e))
        if missing:
            raise ConfigError(f'missing value: {missing.group(1)}=... is required') from None
        cause = e
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        full_key = getattr(e, 'full_key', None)
        raise ConfigError(str(cause) if cause else
                          f'{full_key or "config"}: {str(e).splitlines()[0]}') from None


def fail(error: Exception, code: int = 2) -> None:
    print(f'error: {one_line(error)}', file=sys.stderr)
    sys.exit(code)


def one_line(error: Exception) -> str:
    """The error's message; raised in a DataLoader worker, torch re-raises it with the worker's
    traceback around it ('Caught ConfigError in DataLoader worker process 0. Original Traceback ...'):
    then its last line, less the 'module.ConfigError: ' before the message."""
    text = str(error).strip()
    if '\nOriginal Traceback' in text:
        text = text.splitlines()[-1].split(': ', 1)[-1]
    return text


def main(config_name: str, task: Callable[[DictConfig], Any]) -> None:
    """Runs ``task(cfg)`` under Hydra for ``configs/<config_name>.yaml`` and the command line."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from instseg.engine import dist

    args = sys.argv[1:]
    if config_name == 'test':
        args = sys.argv[1:] = _with_saved_model(args)
    submitit, composed = False, None
    if not any(a in _PASS_THROUGH_FLAGS or a.startswith('--cfg') or a == '-c' for a in args):
        try:
            dist.init_process_group()  # torchrun's and srun's processes join before Hydra starts
            composed = _check_command_line(config_name, args)
            # Every rank runs with rank 0's (time-stamped) work_dir.
            sys.argv[1:] = dist.with_shared_work_dir(args, composed.get('work_dir'))
            submitit = any(a.startswith('hydra/launcher=submitit') for a in args)
            if submitit:  # the jobs print into files: say where, so the sweep's directory is this one
                sys.argv[1:] = dist.pin_work_dir(sys.argv[1:], composed.get('work_dir'))
        except ConfigError as e:
            fail(e)

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base='1.3')
    def _run(cfg: DictConfig) -> Any:
        try:
            with dist.process_group():  # submitit's tasks start here, in the job
                # Multirun gives each job its own directory under the sweep's: make that the work_dir.
                if 'work_dir' in cfg:
                    cfg.work_dir = str(Path(HydraConfig.get().runtime.output_dir).resolve())
                if config_name == 'train':
                    dist.resume_if_requeued(cfg)
                return task(cfg)
        except ConfigError as e:
            fail(e)

    _run()
    dist.leave_process_group()
    if submitit and composed.get('work_dir'):
        print(f"runs: {composed.work_dir}/<job number>/; the jobs' output: "
              f'{composed.work_dir}/.submitit/<job id>/<job id>_<rank>_log.out')


def _with_saved_model(args: list) -> list:
    """tools/test.py on a saved run: the command line composed with that run's model (``model=NAME``
    put first), so that keys only its model has (K-Net's ``model.test_cfg.mask_thr``, say) check and
    compose; ``instseg.engine.runner.run_test`` then applies them to the saved config itself."""
    from instseg.engine.runner import saved_config_path

    given = dict(a.split('=', 1) for a in args if '=' in a and not a.startswith('-'))
    if 'model' in given or 'checkpoint' not in given:
        return args
    saved = saved_config_path(given['checkpoint'])
    try:
        name = OmegaConf.load(saved).model.name if saved.is_file() else None
    except Exception:  # noqa: BLE001 - not a config: run_test reports it
        return args
    return [f'model={name}', *args] if name in group_options('model') else args


def _check_command_line(config_name: str, args: list) -> DictConfig:
    """Checks the command line; returns its config (multirun: the first combination's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if not a.startswith('-')]
    if not any(a in ('-m', '--multirun') for a in args):
        return compose(config_name, overrides)
    # Multirun: check every swept value once, with the first value of the other sweeps.
    parsed = OverridesParser.create().parse_overrides(overrides)
    firsts = [_with_value(o, next(iter(o.sweep_string_iterator()))) if o.is_sweep_override()
              else o.input_line for o in parsed]
    first = compose(config_name, firsts)
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            for value in o.sweep_string_iterator():
                compose(config_name, firsts[:i] + [_with_value(o, value)] + firsts[i + 1:])
    return first


def _with_value(override, value: str) -> str:
    prefix = {'ADD': '+', 'FORCE_ADD': '++', 'DEL': '~'}.get(override.type.name, '')
    return f'{prefix}{override.key_or_group}={value}'
