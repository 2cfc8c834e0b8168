from .flops import FLOP_HANDLES

__all__ = ['FLOP_HANDLES']
