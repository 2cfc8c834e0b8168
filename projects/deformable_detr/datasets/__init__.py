"""Data sets and metrics of the ``ddetr`` scope, and the synthetic shapes generator.

``CocoDataset`` is MMDetection's COCO data set, checked for broken data when it loads
(see ``data_check.PROBLEMS``; ``tools/misc/check_dataset.py`` prints a config's report);
``CocoMetric`` evaluates the images actually tested; :mod:`.synthetic` draws the demo's
data set.
"""
from ..registry import DATASETS, METRICS
from .coco import CocoDataset, DatasetError, check_dataset
from .coco_metric import CocoMetric
from .data_check import PROBLEMS, DataReport

__all__ = ['CocoDataset', 'CocoMetric', 'DatasetError', 'DataReport', 'PROBLEMS', 'DATASETS',
           'METRICS', 'check_dataset']
