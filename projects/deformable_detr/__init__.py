"""Deformable DETR for MMDetection: importing this registers the ``ddetr`` modules.

It also allow-lists the types of MMEngine checkpoints for torch's weights-only loading
(:mod:`.safe_checkpoint`), so that configs' ``custom_imports`` suffice for
``init_detector`` / ``load_from`` on checkpoints our Runner saved.
"""
from . import safe_checkpoint  # noqa: F401
from .criterion import SetCriterion
from .deformable_detr import DeformableDETR
from .deformable_detr_head import DeformableDETRHead
from .dilated_resnet import DilatedResNet
from .hungarian_assigner import HungarianAssigner
from .multi_scale_deformable_attention import MultiScaleDeformableAttention
from .registry import MODELS, TASK_UTILS
from .transformer import DeformableDecoder, DeformableEncoder
# registers ddetr.CocoDataset and ddetr.CocoMetric (data set checks)
from . import datasets  # noqa: F401

__all__ = [
    'DeformableDETR', 'DeformableDETRHead', 'HungarianAssigner', 'SetCriterion',
    'MultiScaleDeformableAttention', 'DilatedResNet', 'DeformableEncoder', 'DeformableDecoder',
    'MODELS', 'TASK_UTILS'
]
