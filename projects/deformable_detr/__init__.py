"""Deformable DETR for MMDetection: importing this registers the ``ddetr`` modules.

Laid out by role, as mmdet 3.x is (see README.md here): :mod:`.models`,
:mod:`.engine` (hooks, the CPU AMP wrapper that the config of an ``--amp`` run names),
:mod:`.datasets`, :mod:`.evaluation`, :mod:`.checkpoint`, :mod:`.deployment`.

Importing registers modules and nothing else: the checkpoint safety (torch's
weights-only allow-list for MMEngine checkpoints) is installed by
:func:`.checkpoint.allow_mmengine_checkpoints`, which the tools call.
"""
from . import datasets, engine, evaluation  # noqa: F401  (they register their modules)
from .checkpoint import allow_mmengine_checkpoints
from .models import (DeformableDecoder, DeformableDETR, DeformableDETRHead, DeformableEncoder,
                     DilatedResNet, HungarianAssigner, MultiScaleDeformableAttention,
                     SetCriterion)
from .registry import DATASETS, HOOKS, METRICS, MODELS, TASK_UTILS

__all__ = [
    'DeformableDETR', 'DeformableDETRHead', 'HungarianAssigner', 'SetCriterion',
    'MultiScaleDeformableAttention', 'DilatedResNet', 'DeformableEncoder', 'DeformableDecoder',
    'MODELS', 'TASK_UTILS', 'DATASETS', 'METRICS', 'HOOKS', 'allow_mmengine_checkpoints'
]
