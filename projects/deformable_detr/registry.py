"""Registries of the ``ddetr`` scope, children of mmdet's.

Our classes keep their natural names (``DeformableDETR``, ``HungarianAssigner``...)
here, so mmdet's classes of the same names stay reachable in the same process.
Configs name ours ``'ddetr.DeformableDETR'``; mmdet's are found through the parent.

MMEngine's own build function always switches to the registry of the *default
scope* (``'mmdet'`` in our configs), so an unscoped ``'HungarianAssigner'`` built
from inside our modules would resolve to mmdet's class. Our registries therefore
use :func:`build_here`, which looks a type up in the registry it is called on first
and in its ancestors next: inside our modules, ours win.
"""
from typing import Any, Optional

import mmdet.registry as mmdet_registry
from mmengine.config import Config, ConfigDict
from mmengine.registry import Registry, build_from_cfg


def build_here(cfg: Any, registry: Registry, default_args: Optional[dict] = None) -> Any:
    """Builds ``cfg`` resolving its type in ``registry``, then its parents.

    Args:
        cfg: Config with a ``type`` (a name, ``scope.name``, or a class).
        registry: Registry to look the type up in.
        default_args: Arguments used where ``cfg`` does not set them.

    Returns:
        The built object.
    """
    if not isinstance(cfg, (dict, ConfigDict, Config)):
        raise TypeError(f'cfg must be a dict, got {type(cfg).__name__}')
    if '_scope_' in cfg:  # an explicit scope: MMEngine's rules apply
        return build_from_cfg(cfg, registry, default_args)
    args = dict(cfg)
    for key, value in (default_args or {}).items():
        args.setdefault(key, value)
    if 'type' not in args:
        raise KeyError(f'cfg must contain the key "type", got {cfg}')
    obj_type = args.pop('type')
    obj_cls = registry.get(obj_type) if isinstance(obj_type, str) else obj_type
    if obj_cls is None:
        raise KeyError(f'{obj_type!r} is in neither the {registry.scope}::{registry.name} '
                       'registry nor its parents')
    return obj_cls(**args)


MODELS = Registry('model', parent=mmdet_registry.MODELS, scope='ddetr',
                  locations=['projects.deformable_detr.models'], build_func=build_here)
TASK_UTILS = Registry('task util', parent=mmdet_registry.TASK_UTILS, scope='ddetr',
                      locations=['projects.deformable_detr.models'], build_func=build_here)
HOOKS = Registry('hook', parent=mmdet_registry.HOOKS, scope='ddetr',
                 locations=['projects.deformable_detr.engine'])
DATASETS = Registry('dataset', parent=mmdet_registry.DATASETS, scope='ddetr',
                    locations=['projects.deformable_detr.datasets'])
METRICS = Registry('metric', parent=mmdet_registry.METRICS, scope='ddetr',
                   locations=['projects.deformable_detr.evaluation'])
