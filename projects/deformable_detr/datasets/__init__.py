"""Data sets of the ``ddetr`` scope, their checks, and the synthetic shapes generator.

``CocoDataset`` is MMDetection's COCO data set, checked for broken data when it loads
(see ``data_check.PROBLEMS``; ``tools/misc/check_dataset.py`` prints a config's report);
:mod:`.synthetic` draws the demo's data set. The metric is in :mod:`..evaluation`.
"""
from ..registry import DATASETS
from .coco import CocoDataset, DatasetError, check_dataset
from .data_check import PROBLEMS, DataReport

__all__ = ['CocoDataset', 'DatasetError', 'DataReport', 'PROBLEMS', 'DATASETS',
           'check_dataset']
