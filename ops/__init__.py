"""Multi-scale deformable attention: C++ (CPU) and CUDA kernels registered as a torch op."""
from .multi_scale_deformable_attn import (gather_sampling, has_kernel,
                                          multi_scale_deformable_attn)
from .multi_scale_deformable_attn_gather import multi_scale_deformable_attn_gather
from .multi_scale_deformable_attn_pytorch import multi_scale_deformable_attn_pytorch

__all__ = ['multi_scale_deformable_attn', 'multi_scale_deformable_attn_pytorch',
           'multi_scale_deformable_attn_gather', 'gather_sampling', 'has_kernel']
