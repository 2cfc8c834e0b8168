"""Pictures of what the model does: :mod:`.attention` draws its sampling points."""
from .attention import (capture_attention, draw_attention, level_to_pixels,
                        pixel_to_encoder_query, record_sampling, valid_ratios,
                        visualize_attention)

__all__ = [
    'capture_attention', 'draw_attention', 'level_to_pixels', 'pixel_to_encoder_query',
    'record_sampling', 'valid_ratios', 'visualize_attention'
]
