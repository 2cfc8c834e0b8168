"""MMDetection's COCO data set, checked when it loads, skipping what is broken."""
import logging
import os.path as osp
from typing import List, Optional, Tuple

import mmcv
import numpy as np
import torch
from mmcv.transforms import LoadImageFromFile
from mmdet.datasets import CocoDataset as MMDetCocoDataset
from mmdet.registry import DATASETS as MMDET_DATASETS
from mmengine.logging import print_log

from .data_check import (DataReport, Decoder, check_annotations, check_categories,
                         check_image_files, check_images, image_name)
from .input_files import DatasetError, check_image_folder, load_annotation_file
from ..registry import DATASETS


@DATASETS.register_module()
class CocoDataset(MMDetCocoDataset):
    """MMDetection's ``CocoDataset`` that checks the set when it loads and skips what is
    broken, with a warning, instead of failing later or training on garbage.

    When it loads (``full_init``) it checks the annotation file's entries, categories and
    boxes, and each image file: that it exists, that its header reads, that it ends with
    its format's end marker (JPEG, PNG) and that its size is the annotation file's. It
    does not decode the pixels (``tools/misc/check_dataset.py --decode`` does). Every
    problem is reported (see ``data_check.PROBLEMS``) with a count per kind; unusable
    images and annotations are left out and boxes reaching outside the image clipped.

    At run time an image that fails to load, or decodes to another size than the
    annotation file's, is skipped with a warning and counted (each image warned about
    once): in training another image is fetched, as MMEngine does when a pipeline
    returns None; in testing a blank image flagged ``load_failed`` takes its place, which
    ``ddetr.CocoMetric`` leaves out of the evaluation.

    Args:
        strict: Refuse a set with any problem found when it loads: a
            :class:`DatasetError` with the report. (Run-time failures are skipped either
            way: they cannot be known before the run.)
        check_workers: Threads that check the image files.
        max_listed: Messages of each kind of problem the logged report lists.
        **kwargs: ``mmdet.datasets.CocoDataset``'s arguments.
    """

    def __init__(self, *args, strict: bool = False, check_workers: int = 8,
                 max_listed: int = 20, **kwargs) -> None:
        self.strict = strict
        self.check_workers = check_workers
        self.max_listed = max_listed
        self.report: Optional[DataReport] = None
        self._failed: Optional[torch.Tensor] = None
        super().__init__(*args, **kwargs)

    def check(self, decode: Optional[Decoder] = None, workers: Optional[int] = None,
              progress: bool = False) -> Tuple[List[dict], DataReport]:
        """Checks the annotation file and the image files.

        Args:
            decode: Also decode every image with this decoder (see
                :meth:`image_decoder`) and check its size.
            workers: Threads checking image files (default: ``check_workers``).
            progress: Show a progress bar of the image-file checks.

        Returns:
            The data list of the usable images and annotations, and the report.
        """
        report = DataReport(self.ann_file)
        raw = load_annotation_file(self.ann_file, self.backend_args)
        if not raw['images']:
            raise DatasetError(f'annotation file {self.ann_file} lists no images')
        annotations = raw.get('annotations', [])
        report.num_images, report.num_annotations = len(raw['images']), len(annotations)

        self.cat_ids = check_categories(raw['categories'], self.metainfo['classes'], report)
        if not self.cat_ids:
            names = [cat.get('name') for cat in raw['categories'] if isinstance(cat, dict)]
            raise DatasetError(f'annotation file {self.ann_file}: none of the classes '
                               f'{tuple(self.metainfo["classes"])} is one of its categories '
                               f'{names}')
        self.cat2label = {cat_id: label for label, cat_id in enumerate(self.cat_ids)}
        images = list(check_images(raw['images'], report).values())
        anns = check_annotations(annotations, {image['id']: image for image in images},
                                 self.cat_ids, report)
        img_dir = self.data_prefix.get('img', '')
        backend = (self.backend_args or {}).get('backend', 'local')
        if backend == 'local' and '://' not in img_dir:
            check_image_folder(img_dir, self.ann_file, len(images))
            files = [(image_name(image), osp.join(img_dir, image['file_name']),
                      image['width'], image['height']) for image in images]
            ok = check_image_files(files, report, decode,
                                   self.check_workers if workers is None else workers,
                                   progress)
            images = [image for image, fine in zip(images, ok) if fine]
        else:
            report.notes.append('image files not checked: they are not on a local disk')

        data_list = [
            self.parse_data_info(dict(raw_img_info=dict(image, img_id=image['id']),
                                      raw_ann_info=anns.get(image['id'], [])))
            for image in images
        ]
        report.kept_images = len(data_list)
        report.kept_annotations = sum(len(info['instances']) for info in data_list)
        return data_list, report

    def load_data_list(self) -> List[dict]:
        """The checked data list; logs the report, or raises it when ``strict``."""
        data_list, self.report = self.check()
        text = self.report.format(self.max_listed)
        if len(self.report) and self.strict:
            raise DatasetError(f'the data set has problems and strict=True:\n{text}')
        if not data_list and self.report.num_images:
            raise DatasetError(f'annotation file {self.ann_file}: no usable image in the '
                               f'data set:\n{text}')
        # the mode tells the training and the test set apart (MMLogger drops repeated
        # warnings)
        if len(self.report):
            print_log(f'data set check ({self._mode}, strict=False: what cannot be used is '
                      f'skipped): {text}', logger='current', level=logging.WARNING)
        else:
            print_log(f'data set check ({self._mode}): {text}', logger='current')
        return data_list

    def filter_data(self) -> List[dict]:
        """mmdet's ``filter_cfg`` (``filter_empty_gt``, ``min_size``) on the checked data.

        An image whose annotations were all unusable counts as an image without objects.
        """
        return self.apply_filter_cfg(self.data_list)

    def apply_filter_cfg(self, data_list: List[dict]) -> List[dict]:
        """The images of ``data_list`` that ``filter_cfg`` keeps (all in test mode).

        Raises:
            DatasetError: the filters leave no image of a non-empty list.
        """
        if self.test_mode or not self.filter_cfg:
            return data_list
        filter_empty_gt = self.filter_cfg.get('filter_empty_gt', False)
        min_size = self.filter_cfg.get('min_size', 0)
        kept = [info for info in data_list
                if (info['instances'] or not filter_empty_gt)
                and min(info['width'], info['height']) >= min_size]
        if data_list and not kept:
            without_boxes = sum(not info['instances'] for info in data_list)
            raise DatasetError(
                f'annotation file {self.ann_file}: filter_cfg {dict(self.filter_cfg)} leaves '
                f'no image of the {len(data_list)} usable ones ({without_boxes} have no usable '
                f'box; the smallest side is {min(min(i["width"], i["height"]) for i in data_list)}'
                ' px): nothing to train on')
        if len(kept) < len(data_list):
            print_log(f'filter_cfg {dict(self.filter_cfg)} leaves out '
                      f'{len(data_list) - len(kept)} of {len(data_list)} images',
                      logger='current')
        return kept

    def full_init(self) -> None:
        """Loads, checks and filters the data; prepares the run-time failure flags."""
        if self._fully_initialized:
            return
        super().full_init()
        # shared with the data loader's worker processes: each failure is warned about
        # and counted once, whichever process meets it
        self._failed = torch.zeros(len(self), dtype=torch.bool).share_memory_()

    @property
    def _mode(self) -> str:
        return 'test mode' if self.test_mode else 'training'

    @property
    def num_load_failures(self) -> int:
        """How many images of this set have failed to load at run time so far."""
        return 0 if self._failed is None else int(self._failed.sum())

    def image_decoder(self) -> Optional[Decoder]:
        """The decoder of the pipeline's image-loading transform (None if it has none)."""
        split = self._loader_index()
        if split is None:
            return None
        loader = self.pipeline.transforms[split]
        return lambda data: mmcv.imfrombytes(data, flag=loader.color_type,
                                             backend=loader.imdecode_backend)

    def _loader_index(self) -> Optional[int]:
        """Index of the pipeline's image-loading transform (None if it has none)."""
        for index, transform in enumerate(self.pipeline.transforms):
            if isinstance(transform, LoadImageFromFile):
                return index
        return None

    def _load(self, data_info: dict, transforms: list) -> Tuple[Optional[dict], str]:
        """Runs the transforms up to the image loader: (results, '') or (None, error)."""
        results = dict(data_info)
        try:
            for transform in transforms:
                results = transform(results)
                if results is None:
                    return None, f'{type(transform).__name__} returned None'
        except Exception as err:  # whatever the file or the storage raised
            return None, f'{type(err).__name__}: {err}'
        shape = tuple(results['img'].shape[:2])
        if shape != (data_info['height'], data_info['width']):
            return None, (f'it decodes to {shape[1]}x{shape[0]}, the annotation file says '
                          f"{data_info['width']}x{data_info['height']}")
        return results, ''

    def prepare_data(self, idx: int) -> Optional[dict]:
        """The pipeline's output for image ``idx``; an image that fails to load is skipped
        (None in training, a blank image flagged ``load_failed`` in testing)."""
        data_info = self.get_data_info(idx)
        split = self._loader_index()
        if split is None:
            return self.pipeline(data_info)
        transforms = self.pipeline.transforms
        results = None
        if not self._failed[idx]:  # known failures are not tried (nor warned about) again
            results, error = self._load(data_info, transforms[:split + 1])
            if results is None:
                self._failed[idx] = True
                print_log(f"image {data_info['img_id']!r} {data_info['img_path']} failed to "
                          f'load and is skipped ({self._mode}): {error} '
                          f'({self.num_load_failures} images of this data set have failed to '
                          'load so far)', logger='current', level=logging.WARNING)
                if not self.test_mode and self.num_load_failures == len(self):
                    # MMEngine would fetch other images a thousand times, then fail
                    # naming no file
                    raise DatasetError(
                        f'every one of the {len(self)} images of {self.ann_file} has failed '
                        f"to load; the last, {data_info['img_path']}: {error}")
        if results is None:
            if not self.test_mode:
                return None
            height, width = data_info['height'], data_info['width']
            results = dict(data_info, img=np.zeros((height, width, 3), np.uint8),
                           img_shape=(height, width), ori_shape=(height, width))
        for transform in transforms[split + 1:]:
            results = transform(results)
            if results is None:
                return None
        if self._failed[idx]:
            results['data_samples'].set_metainfo(dict(load_failed=True))
        return results


def check_dataset(cfg: dict, decode: bool = False, workers: int = 8,
                  progress: bool = False) -> List[DataReport]:
    """Checks the data set of a dataloader config without loading it for training.

    Args:
        cfg: A ``ddetr.CocoDataset`` config, or a wrapper's (``dataset`` or ``datasets``
            keys: RepeatDataset, ConcatDataset...) around such configs.
        decode: Also decode every image with the pipeline's decoder.
        workers: Threads checking image files.
        progress: Show a progress bar of the image-file checks.

    Returns:
        The report of each data set found, in config order; each notes how many images
        the set's ``filter_cfg`` keeps.

    Raises:
        DatasetError: a file of a data set is missing, unreadable, empty or malformed, or
            no image is left after the checks or the filters: the error that training
            would stop with.
    """
    if 'datasets' in cfg:
        return [report for sub in cfg['datasets']
                for report in check_dataset(sub, decode, workers, progress)]
    if 'dataset' in cfg:
        return check_dataset(cfg['dataset'], decode, workers, progress)
    dataset = MMDET_DATASETS.build(dict(cfg, lazy_init=True))
    if not isinstance(dataset, CocoDataset):
        raise TypeError(f'the data set is a {type(dataset).__module__}.'
                        f'{type(dataset).__name__}: only ddetr.CocoDataset sets are checked '
                        "(type='ddetr.CocoDataset' takes mmdet CocoDataset's arguments)")
    data_list, report = dataset.check(dataset.image_decoder() if decode else None, workers,
                                      progress)
    if not data_list:
        raise DatasetError(f'annotation file {dataset.ann_file}: no usable image in the data '
                           f'set:\n{report.format()}')
    if not dataset.test_mode and dataset.filter_cfg:
        kept = dataset.apply_filter_cfg(data_list)
        report.notes.append(f'filter_cfg {dict(dataset.filter_cfg)} keeps {len(kept)} of '
                            f'{len(data_list)} usable images')
    return [report]
