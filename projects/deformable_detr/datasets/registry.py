"""Data set and metric registries of the ``ddetr`` scope, children of mmdet's.

As for the model registries in ``projects/deformable_detr/registry.py``: configs name our
classes ``'ddetr.CocoDataset'`` and ``'ddetr.CocoMetric'``, and mmdet's classes of the
same names stay reachable.
"""
import mmdet.registry as mmdet_registry
from mmengine.registry import Registry

DATASETS = Registry('dataset', parent=mmdet_registry.DATASETS, scope='ddetr',
                    locations=['projects.deformable_detr.datasets'])
METRICS = Registry('metric', parent=mmdet_registry.METRICS, scope='ddetr',
                   locations=['projects.deformable_detr.datasets'])
