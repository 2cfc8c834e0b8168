"""MMDetection's COCO metric over the images actually evaluated, on a checked ground truth."""
import logging
from typing import Dict, Optional, Sequence

from mmdet.datasets.api_wrappers import COCO
from mmdet.evaluation import CocoMetric as MMDetCocoMetric
from mmengine.logging import print_log

from ...datasets.data_check import DataReport, check_annotation, check_images
from ...datasets.input_files import load_annotation_file
from ...registry import METRICS

# Ground-truth annotations that pycocotools cannot evaluate (or crashes on): the others,
# zero-area boxes or boxes outside the image included, are evaluated as COCO's own code
# does, so that a valid annotation file gives exactly mmdet's numbers.
UNEVALUABLE = ('bad_entry', 'orphan_annotation', 'invalid_box', 'negative_box')


@METRICS.register_module()
class CocoMetric(MMDetCocoMetric):
    """mmdet's ``CocoMetric``, robust to the problems ``ddetr.CocoDataset`` skips.

    - The annotation file is read through the data set checks: image entries and
      annotations that pycocotools cannot evaluate (see :data:`UNEVALUABLE`) are left
      out, and a missing ``area`` is the box's.
    - Images that ``ddetr.CocoDataset`` flagged ``load_failed`` are left out, and the
      evaluation covers the images evaluated: an image that the data set skipped does
      not count its objects as missed. On a set without problems, this is every image.

    Args:
        ann_file: The COCO annotation file of the ground truth (None: the data samples'
            instances, as in mmdet).
        backend_args: Arguments of the file backend.
        sort_categories: Sort the categories by id (Objects365), as in mmdet.
        **kwargs: mmdet ``CocoMetric``'s other arguments.
    """

    def __init__(self, ann_file: Optional[str] = None, backend_args: Optional[dict] = None,
                 sort_categories: bool = False, **kwargs) -> None:
        super().__init__(ann_file=None, backend_args=backend_args, **kwargs)
        if ann_file is None:
            return
        raw = load_annotation_file(ann_file, backend_args)
        report = DataReport(ann_file)
        report.num_images = len(raw.get('images', []))
        report.num_annotations = len(raw.get('annotations', []))
        images = check_images(raw.get('images', []), report)
        annotations, seen = [], set()
        for ann in raw.get('annotations', []):
            kind, detail, _ = check_annotation(ann, images, None, seen)
            if kind in UNEVALUABLE:
                report.add(kind, detail)
            else:
                x, y, w, h = ann['bbox']
                annotations.append(dict(ann, area=ann.get('area', w * h)))
        report.kept_images, report.kept_annotations = len(images), len(annotations)
        if len(report):
            print_log(f'CocoMetric leaves out what it cannot evaluate: {report.format(5)}',
                      logger='current', level=logging.WARNING)
        categories = raw.get('categories', [])
        if sort_categories:
            categories = sorted(categories, key=lambda cat: cat['id'])
        self._coco_api = COCO()
        self._coco_api.dataset = dict(raw, images=list(images.values()),
                                      annotations=annotations, categories=categories)
        self._coco_api.createIndex()
        # mmdet's wrapper names these indexes at construction: name the new ones
        self._coco_api.img_ann_map = self._coco_api.imgToAnns
        self._coco_api.cat_img_map = self._coco_api.catToImgs

    def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
        """mmdet's, keeping each sample's ``load_failed`` flag with its ground truth."""
        super().process(data_batch, data_samples)
        for (gt, _), sample in zip(self.results[-len(data_samples):], data_samples):
            gt['load_failed'] = bool(sample.get('load_failed', False))

    def compute_metrics(self, results: list) -> Dict[str, float]:
        """mmdet's metrics over the images that loaded."""
        evaluated = [(gt, pred) for gt, pred in results if not gt['load_failed']]
        if not evaluated:
            raise RuntimeError(f'none of the {len(results)} images tested loaded: '
                               'nothing to evaluate')
        self.img_ids = list(dict.fromkeys(gt['img_id'] for gt, _ in evaluated))
        total = len(self._coco_api.get_img_ids()) if self._coco_api is not None \
            else len(self.img_ids)
        if len(self.img_ids) < total:
            print_log(f'CocoMetric evaluates {len(self.img_ids)} of the {total} images of '
                      f'the annotation file: {len(results) - len(evaluated)} failed to load '
                      'at run time, the others are not in the data set tested (left out by '
                      'its check, or by its indices)',
                      logger='current', level=logging.WARNING)
        return super().compute_metrics(evaluated)
