from .hungarian_assigner import HungarianAssigner

__all__ = ['HungarianAssigner']
