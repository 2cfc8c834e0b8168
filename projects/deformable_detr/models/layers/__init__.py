from .deformable_transformer import (DeformableDecoder, DeformableEncoder, flatten_levels,
                                     padding_masks)
from .multi_scale_deformable_attention import MultiScaleDeformableAttention

__all__ = ['DeformableEncoder', 'DeformableDecoder', 'MultiScaleDeformableAttention',
           'flatten_levels', 'padding_masks']
