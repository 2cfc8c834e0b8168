"""Checks of a COCO-format data set: its entries, its boxes and its image files.

Each problem has a kind (the keys of :data:`PROBLEMS`) and a message that names the image
(id and file) or the annotation (id and image id) it concerns. :class:`DataReport` collects
them and formats the report that the data set logs, or raises in strict mode, and that
``tools/misc/check_dataset.py`` prints.
"""
import math
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
from mmengine.utils import ProgressBar
from PIL import Image, UnidentifiedImageError

# kind: (what is done about it, what it means)
PROBLEMS = {
    'bad_entry': ('skipped', 'an image, annotation or category entry lacks a field it needs '
                  '(id, file_name, width, height, image_id, category_id) or repeats an id'),
    'missing_file': ('image skipped', 'the image file does not exist'),
    'unreadable_file': ('image skipped', 'the file is not an image that can be read'),
    'truncated_file': ('image skipped', 'the image file ends before its image data does'),
    'size_mismatch': ('image skipped', "the image's size differs from its width and height "
                      'in the annotation file'),
    'orphan_annotation': ('annotation skipped', 'the annotation points at no image'),
    'unknown_category': ('annotation skipped', 'the category is not in metainfo.classes'),
    'invalid_box': ('annotation skipped', 'the box is not 4 finite numbers'),
    'negative_box': ('annotation skipped', 'the box has a negative width or height'),
    'empty_box': ('annotation skipped', 'the box is under 1 px wide or high, or its area is '
                  'not positive'),
    'box_outside': ('annotation skipped', 'the box does not overlap the image'),
    'box_clipped': ('box clipped to the image', 'the box reaches more than 1 px outside the '
                    'image'),
    'unknown_class': ('reported', 'a name of metainfo.classes is no category of the '
                      'annotation file: the labels of the classes after it shift'),
}
# Problems of an image file, found by check_image_file.
FILE_PROBLEMS = ('missing_file', 'unreadable_file', 'truncated_file', 'size_mismatch')
# What a box may stick out of its image by before it is reported (annotation tools round).
CLIP_TOLERANCE = 1.0
# Image formats whose files end with a fixed marker: JPEG's end-of-image, PNG's IEND chunk.
END_MARKERS = {'JPEG': b'\xff\xd9', 'MPO': b'\xff\xd9', 'PNG': b'IEND\xaeB`\x82'}
TAIL_BYTES = 64  # read from the end of a file: the marker and some padding
# EXIF orientations that turn the image by 90 degrees (OpenCV applies them when decoding).
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)

# Decodes the bytes of an image file into an (h, w[, c]) array, or returns None.
Decoder = Callable[[bytes], Optional[np.ndarray]]


class DataReport:
    """Problems found in one data set, by kind, each with a message naming its source.

    Args:
        source: What was checked (the annotation file).
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: Dict[str, List[str]] = defaultdict(list)
        self.num_images = 0
        self.num_annotations = 0
        self.kept_images = 0
        self.kept_annotations = 0
        self.notes: List[str] = []

    def add(self, kind: str, message: str) -> None:
        """Records one problem of ``kind`` (a key of :data:`PROBLEMS`)."""
        if kind not in PROBLEMS:
            raise KeyError(f'unknown problem kind {kind!r}; known: {sorted(PROBLEMS)}')
        self.problems[kind].append(message)

    def counts(self) -> Dict[str, int]:
        """The number of problems of each kind found, in the order of :data:`PROBLEMS`."""
        return {kind: len(self.problems[kind]) for kind in PROBLEMS if self.problems[kind]}

    def __len__(self) -> int:
        return sum(self.counts().values())

    def format(self, max_listed: Optional[int] = None) -> str:
        """The report: totals, a count per kind, then each problem's message.

        Args:
            max_listed: List at most this many messages of each kind (None: all).
        """
        lines = [f'{self.source}: {self.num_images} images, {self.num_annotations} '
                 f'annotations; kept {self.kept_images} images, {self.kept_annotations} '
                 f'annotations; {len(self)} problems']
        lines += [f'  note: {note}' for note in self.notes]
        counts = self.counts()
        width = max(map(len, counts), default=0)
        for kind, count in counts.items():
            lines.append(f'  {kind:<{width}}  {count:>7}  {PROBLEMS[kind][0]}: '
                         f'{PROBLEMS[kind][1]}')
        for kind, count in counts.items() if max_listed != 0 else ():
            messages = self.problems[kind]
            shown = messages if max_listed is None else messages[:max_listed]
            lines.append(f'{kind} ({count}):')
            lines += [f'  {message}' for message in shown]
            if len(shown) < count:
                lines.append(f'  ... and {count - len(shown)} more '
                             '(tools/misc/check_dataset.py lists them all)')
        return '\n'.join(lines)

    def to_dict(self) -> dict:
        """The report as plain data (for json)."""
        return dict(source=self.source, num_images=self.num_images,
                    num_annotations=self.num_annotations, kept_images=self.kept_images,
                    kept_annotations=self.kept_annotations, notes=list(self.notes),
                    counts=self.counts(),
                    problems={kind: list(self.problems[kind]) for kind in self.counts()})


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _is_positive(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def image_name(image: dict) -> str:
    """How a report names an image entry: its id and file name."""
    return f"image {image.get('id')!r} {image.get('file_name')!r}"


def check_categories(categories: Sequence[dict], classes: Sequence[str],
                     report: DataReport) -> List:
    """The ids of the categories named in ``classes``, in the annotation file's order.

    That is MMDetection's order (``COCO.get_cat_ids(cat_names=classes)``), so labels and
    CocoMetric agree with mmdet's. A name of ``classes`` that no category has is an
    ``unknown_class`` problem: labels number the categories found, so the classes after
    it get the labels (and names, colours) of the ones before.
    """
    cat_ids, names, seen = [], set(), set()
    for index, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_id(cat.get('id')) or 'name' not in cat \
                or cat['id'] in seen:
            report.add('bad_entry', f'category #{index}: {cat!r}')
            continue
        seen.add(cat['id'])
        names.add(cat['name'])
        if cat['name'] in classes:
            cat_ids.append(cat['id'])
    for name in classes:
        if name not in names:
            report.add('unknown_class', f'class {name!r} names no category of the file')
    return cat_ids


def check_images(images: Sequence[dict], report: DataReport) -> Dict:
    """The usable image entries by id; the others are ``bad_entry`` problems."""
    by_id = {}
    for index, image in enumerate(images):
        if not isinstance(image, dict) or not _is_id(image.get('id')):
            report.add('bad_entry', f'image #{index}: no id: {image!r}')
        elif image['id'] in by_id:
            report.add('bad_entry', f'{image_name(image)}: repeats the id of '
                       f'{image_name(by_id[image["id"]])}')
        elif not isinstance(image.get('file_name'), str) or not image['file_name']:
            report.add('bad_entry', f'{image_name(image)}: no file_name')
        elif not (_is_positive(image.get('width')) and _is_positive(image.get('height'))):
            report.add('bad_entry', f'{image_name(image)}: width {image.get("width")!r}, '
                       f'height {image.get("height")!r}')
        else:
            by_id[image['id']] = image
    return by_id


def check_box(ann: dict, image: dict) -> Tuple[Optional[str], str, Optional[List[float]]]:
    """Checks the box of one annotation against its image.

    Returns:
        (kind, detail, box): the problem's kind (None if none) and its detail, and the
        usable box, clipped to the image where it reaches outside (None if unusable).
    """
    box = ann.get('bbox')
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in box):
        return 'invalid_box', f'bbox {box!r}', None
    x, y, w, h = (float(v) for v in box)
    if w < 0 or h < 0:
        return 'negative_box', f'bbox {box!r}: width {w:g}, height {h:g}', None
    area = ann.get('area', w * h)
    if w < 1 or h < 1 or not isinstance(area, (int, float)) or not area > 0:
        return 'empty_box', f'bbox {box!r}, area {area!r}', None
    width, height = image['width'], image['height']
    x1, y1, x2, y2 = max(x, 0.), max(y, 0.), min(x + w, width), min(y + h, height)
    if x2 <= x1 or y2 <= y1:
        return 'box_outside', f'bbox {box!r} on a {width}x{height} image', None
    clipped = [x1, y1, x2 - x1, y2 - y1]
    if max(-x, -y, x + w - width, y + h - height) > CLIP_TOLERANCE:
        return 'box_clipped', f'bbox {box!r} on a {width}x{height} image', clipped
    return None, '', clipped


def check_annotation(ann: dict, images: Dict, cat_ids: Optional[Set],
                     seen: Set) -> Tuple[Optional[str], str, Optional[List[float]]]:
    """Checks one annotation entry, its image, its category and its box.

    Args:
        ann: The annotation entry.
        images: The usable image entries by id.
        cat_ids: The categories to keep (None: any).
        seen: The annotation ids met so far (this one's is added).

    Returns:
        (kind, detail, box) as :func:`check_box`, and for a problem found before the box
        is looked at, (kind, detail, None); detail begins with the annotation's name.
    """
    if not isinstance(ann, dict) or not _is_id(ann.get('id')):
        return 'bad_entry', f'annotation without an id: {ann!r}', None
    name = f"annotation {ann['id']!r} (image {ann.get('image_id')!r})"
    if ann['id'] in seen:
        return 'bad_entry', f'{name}: repeats an earlier annotation id', None
    seen.add(ann['id'])
    if not _is_id(ann.get('image_id')) or not _is_id(ann.get('category_id')):
        return 'bad_entry', (f'{name}: image_id {ann.get("image_id")!r}, '
                             f'category_id {ann.get("category_id")!r}'), None
    image = images.get(ann['image_id'])
    if image is None:
        return 'orphan_annotation', f'{name}: no image has id {ann["image_id"]!r}', None
    if cat_ids is not None and ann['category_id'] not in cat_ids:
        return 'unknown_category', (f'{name}: category_id {ann["category_id"]!r} is not '
                                    'among the classes'), None
    kind, detail, box = check_box(ann, image)
    return kind, f'{name}: {detail}', box


def check_annotations(annotations: Sequence[dict], images: Dict, cat_ids: Iterable,
                      report: DataReport) -> Dict[object, List[dict]]:
    """The usable annotations of each image, boxes clipped to the image.

    An annotation is kept when its entry is whole, its image is in ``images``, its
    category in ``cat_ids`` and its box usable (see :func:`check_box`); each other one
    is a problem of ``report``. Kept annotations are copies: the input is not changed.
    """
    cat_ids, seen = set(cat_ids), set()
    by_image: Dict[object, List[dict]] = defaultdict(list)
    for ann in annotations:
        kind, detail, box = check_annotation(ann, images, cat_ids, seen)
        if kind is not None:
            report.add(kind, detail)
        if box is not None:
            by_image[ann['image_id']].append(
                dict(ann, bbox=box, area=ann.get('area', box[2] * box[3])))
    return by_image


def _ends_with(path: str, marker: bytes) -> bool:
    """Whether the file's last bytes, trailing zero or blank padding aside, are ``marker``."""
    with open(path, 'rb') as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - TAIL_BYTES))
        return f.read().rstrip(b'\x00\r\n\t ').endswith(marker)


def check_image_file(path: str, width: int, height: int,
                     decode: Optional[Decoder] = None) -> Optional[Tuple[str, str]]:
    """Checks one image file without decoding its pixels, unless ``decode`` is given.

    Reads its header (format, size, EXIF orientation) and its last bytes. A JPEG or PNG
    that does not end with its end marker is decoded in full (by Pillow, which refuses
    truncated data): some writers append data after the image (Samsung phones, for one),
    while a truncated file fails to decode.

    Args:
        path: The image file.
        width: Its width in the annotation file.
        height: Its height in the annotation file.
        decode: The data pipeline's decoder: when given, the image is also decoded with
            it and the decoded size checked.

    Returns:
        None if the file is fine, else (kind, detail) with kind in :data:`FILE_PROBLEMS`.
    """
    if not os.path.isfile(path):
        return 'missing_file', f'{path} not found'
    try:
        with Image.open(path) as img:
            size, fmt = img.size, img.format
            # OpenCV turns a JPEG by its EXIF orientation when it decodes it (Pillow would
            # decode a PNG to read its EXIF)
            if fmt in ('JPEG', 'MPO') and \
                    img.getexif().get(0x0112) in TRANSPOSING_ORIENTATIONS:
                size = size[::-1]
            if fmt in END_MARKERS and not _ends_with(path, END_MARKERS[fmt]):
                try:
                    img.load()
                except (OSError, SyntaxError) as err:
                    return 'truncated_file', f'{path}: {err}'
    except Image.DecompressionBombError:
        return None  # too many pixels for Pillow (a guard against attacks): OpenCV reads it
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return 'unreadable_file', f'{path}: {type(err).__name__}: {err}'
    if size != (width, height):
        return 'size_mismatch', (f'{path} is {size[0]}x{size[1]}, the annotation file says '
                                 f'{width}x{height}')
    if decode is not None:
        with open(path, 'rb') as f:
            data = f.read()
        try:
            array = decode(data)
        except Exception as err:  # any decoder error means the pipeline cannot load it
            return 'unreadable_file', f'{path}: decoding failed: {type(err).__name__}: {err}'
        if array is None:
            return 'unreadable_file', f'{path}: decoding failed'
        if array.shape[:2] != (height, width):
            return 'size_mismatch', (f'{path} decodes to {array.shape[1]}x{array.shape[0]}, '
                                     f'the annotation file says {width}x{height}')
    return None


def check_image_files(files: Sequence[Tuple[str, str, int, int]], report: DataReport,
                      decode: Optional[Decoder] = None, workers: int = 8,
                      progress: bool = False) -> List[bool]:
    """Checks image files in ``workers`` threads (the work is mostly waiting for I/O).

    Args:
        files: (name for the report, path, width, height) of each image.
        report: Where the problems go, in the order of ``files``.
        decode: See :func:`check_image_file`.
        workers: Number of threads.
        progress: Show a progress bar with ETA (mmengine's) on stderr.

    Returns:
        For each file, whether it is fine.
    """
    start = time.perf_counter()
    bar = ProgressBar(len(files), file=sys.stderr) if progress else None
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = []
        for problem in pool.map(lambda item: check_image_file(*item[1:], decode), files):
            problems.append(problem)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.file.write('\n')
    ok = []
    for (name, *_), problem in zip(files, problems):
        if problem is not None:
            report.add(problem[0], f'{name}: {problem[1]}')
        ok.append(problem is None)
    report.notes.append(f'{len(files)} image files checked ('
                        f'{"decoded in full" if decode else "header and end"}) in '
                        f'{time.perf_counter() - start:.1f} s')
    return ok
