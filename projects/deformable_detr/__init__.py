"""Deformable DETR for MMDetection: importing this registers the ``ddetr`` modules.

It also allow-lists the types of MMEngine checkpoints for torch's weights-only loading
(:mod:`.safe_checkpoint`), so that configs' ``custom_imports`` suffice for
``init_detector`` / ``load_from`` on checkpoints our Runner saved, and registers
``CPUAmpOptimWrapper`` (:mod:`.engine`), so that the config a ``--amp`` run saved builds,
the checked ``ddetr.CocoDataset`` / ``ddetr.CocoMetric`` (:mod:`.datasets`),
``ddetr.SkipNonFiniteHook`` (:mod:`.non_finite`), ``ddetr.FineTuneHook`` (:mod:`.fine_tune`),
``ddetr.CheckpointHook`` (exact, crash-safe resume, :mod:`.resume`) and
``ddetr.PreemptionHook`` (:mod:`.engine.hooks`).
"""
from . import datasets, engine, fine_tune, non_finite, resume, safe_checkpoint  # noqa: F401
from .criterion import SetCriterion
from .deformable_detr import DeformableDETR
from .deformable_detr_head import DeformableDETRHead
from .dilated_resnet import DilatedResNet
from .hungarian_assigner import HungarianAssigner
from .multi_scale_deformable_attention import MultiScaleDeformableAttention
from .registry import DATASETS, HOOKS, METRICS, MODELS, TASK_UTILS
from .transformer import DeformableDecoder, DeformableEncoder

__all__ = [
    'DeformableDETR', 'DeformableDETRHead', 'HungarianAssigner', 'SetCriterion',
    'MultiScaleDeformableAttention', 'DilatedResNet', 'DeformableEncoder', 'DeformableDecoder',
    'MODELS', 'TASK_UTILS', 'DATASETS', 'METRICS', 'HOOKS'
]
