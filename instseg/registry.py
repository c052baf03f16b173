"""instseg's registry scope, a child of mmdet's: configs name mmdet's parts and ours alike.

With ``default_scope='instseg'`` a ``type`` is looked up here first, then in mmdet, then mmengine.
Every mmdet registry gets a child here, since mmengine builds from the default scope's node and
finds no fallback where that node is missing. Our modules register on import (``locations``), so
users never write ``custom_imports``.
"""
from mmdet import registry as mmdet
from mmengine.registry import Registry
from mmengine.registry import registry as _mmengine_registry

SCOPE = 'instseg'


def _never_import(name: str) -> None:
    """Stands in for mmengine's fallback in ``Registry.get``, which imports any name the registries
    lack (``type='os.system'`` would then be called): a type instseg builds is registered or none
    (configs are checked before, in one line: ``instseg.config.check_buildable``)."""
    return None


_mmengine_registry.get_object_from_string = _never_import


def _child(parent: Registry, locations=()) -> Registry:
    # A child's lookup reads its parents' tables without importing their modules: import them now.
    parent.import_from_location()
    return Registry(parent.name, parent=parent, scope=SCOPE, locations=list(locations))


MODELS = _child(mmdet.MODELS, ['instseg.models'])
DATASETS = _child(mmdet.DATASETS, ['instseg.data'])
TRANSFORMS = _child(mmdet.TRANSFORMS, ['instseg.data.transforms'])
METRICS = _child(mmdet.METRICS, ['instseg.evaluation'])
HOOKS = _child(mmdet.HOOKS, ['instseg.engine'])
TASK_UTILS = _child(mmdet.TASK_UTILS, ['instseg.models'])
RUNNERS = _child(mmdet.RUNNERS)
RUNNER_CONSTRUCTORS = _child(mmdet.RUNNER_CONSTRUCTORS)
LOOPS = _child(mmdet.LOOPS, ['instseg.engine'])
DATA_SAMPLERS = _child(mmdet.DATA_SAMPLERS, ['instseg.data.samplers'])
MODEL_WRAPPERS = _child(mmdet.MODEL_WRAPPERS)
WEIGHT_INITIALIZERS = _child(mmdet.WEIGHT_INITIALIZERS)
OPTIMIZERS = _child(mmdet.OPTIMIZERS)
OPTIM_WRAPPERS = _child(mmdet.OPTIM_WRAPPERS)
OPTIM_WRAPPER_CONSTRUCTORS = _child(mmdet.OPTIM_WRAPPER_CONSTRUCTORS, ['instseg.engine'])
PARAM_SCHEDULERS = _child(mmdet.PARAM_SCHEDULERS)
EVALUATOR = _child(mmdet.EVALUATOR)
VISUALIZERS = _child(mmdet.VISUALIZERS)
VISBACKENDS = _child(mmdet.VISBACKENDS)
LOG_PROCESSORS = _child(mmdet.LOG_PROCESSORS)
