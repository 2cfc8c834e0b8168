"""Data sets and metrics of the ``ddetr`` scope: MMDetection's COCO, checked for broken data.

See ``data_check.PROBLEMS`` for what is checked; ``tools/misc/check_dataset.py`` prints
the report of a config's data set.
"""
from .coco import CocoDataset, DatasetError, check_dataset
from .coco_metric import CocoMetric
from .data_check import PROBLEMS, DataReport
from .registry import DATASETS, METRICS

__all__ = ['CocoDataset', 'CocoMetric', 'DatasetError', 'DataReport', 'PROBLEMS', 'DATASETS',
           'METRICS', 'check_dataset']
