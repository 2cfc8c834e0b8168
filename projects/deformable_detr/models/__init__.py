"""The model: detector, head, transformer layers, assigner, set loss, backbone."""
from .backbones import DilatedResNet
from .dense_heads import DeformableDETRHead
from .detectors import DeformableDETR
from .layers import DeformableDecoder, DeformableEncoder, MultiScaleDeformableAttention
from .losses import SetCriterion
from .task_modules import HungarianAssigner

__all__ = ['DeformableDETR', 'DeformableDETRHead', 'DeformableEncoder', 'DeformableDecoder',
           'MultiScaleDeformableAttention', 'HungarianAssigner', 'SetCriterion',
           'DilatedResNet']
