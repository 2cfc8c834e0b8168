"""Evaluation: the metrics."""
from .metrics import CocoMetric

__all__ = ['CocoMetric']
