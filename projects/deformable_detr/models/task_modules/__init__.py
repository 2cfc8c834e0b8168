from .assigners import HungarianAssigner

__all__ = ['HungarianAssigner']
