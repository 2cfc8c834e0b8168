"""Multi-scale deformable attention: C++ (CPU) and CUDA kernels registered as a torch op."""
from .multi_scale_deform_attn import has_kernel, multi_scale_deformable_attn
from .reference import multi_scale_deformable_attn_reference

__all__ = ['multi_scale_deformable_attn', 'multi_scale_deformable_attn_reference', 'has_kernel']
