"""A tiny broken COCO-format set, drawn with PIL, and a config of the demo model over it."""
import io
import json
import math
import os
import os.path as osp
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO_CONFIG = osp.join(ROOT, 'configs', 'synthetic',
                       'deformable-detr-refine-twostage_r18_1xb8-synthetic.py')
CLASSES = ('circle', 'square', 'triangle', 'cross', 'star')

# The problems of the set below: kind -> the ids (image ids for file problems, annotation
# ids for the others) that the report must name.
EXPECTED = {
    'bad_entry': [15],
    'missing_file': [3],
    'truncated_file': [4],
    'size_mismatch': [8],
    'orphan_annotation': [13],
    'unknown_category': [4],
    'invalid_box': [8, 14],
    'negative_box': [6],
    'empty_box': [9],
    'box_outside': [10],
    'box_clipped': [2],
}
NUM_IMAGES, NUM_ANNOTATIONS, KEPT_ANNOTATIONS = 10, 18, 10
# images 3, 4, 8 have broken files; 7 is corrupt inside, which only decoding finds
KEPT_IMAGES = [1, 2, 5, 6, 7, 9, 10]
CORRUPT_IMAGE = 7
# image 6 holds a single 3x3 box at 256 px: FilterAnnotations (min 2 px) after the
# resize to 128 px empties it
EMPTIED_IMAGE = 6

# The demo config (model, pipeline, runtime) over the broken set, at a size that trains
# in seconds: 64 px images, d=32, one encoder and one decoder layer, 10 queries.
CONFIG = '''
_base_ = {demo!r}
data_root = {data_root!r}
d = 32
layers = dict(num_layers=1, embed_dims=d, num_heads=4, num_points=2,
              feedforward_channels=64, dropout=0.0)
model = dict(
    num_queries=10,
    backbone=dict(base_channels=8),
    neck=dict(in_channels=[16, 32, 64], out_channels=d, norm_cfg=dict(num_groups=8)),
    encoder=layers, decoder=layers,
    positional_encoding=dict(num_feats=d // 2),
    bbox_head=dict(embed_dims=d),
    test_cfg=dict(max_per_img=10))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    # an image whose boxes all get smaller than 2 px goes on without boxes
    dict(type='FilterAnnotations', min_gt_bbox_wh=(2, 2), keep_empty=False),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(batch_size=2, dataset=dict(
    data_root=data_root, ann_file='ann.json', data_prefix=dict(img='images/'),
    pipeline=train_pipeline))
val_dataloader = dict(batch_size=2, dataset=dict(
    data_root=data_root, ann_file='ann.json', data_prefix=dict(img='images/'),
    pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + '/ann.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1)
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(save_best=None, max_keep_ckpts=-1))
'''


def _draw(size, boxes, seed: int) -> Image.Image:
    """A textured image with a filled ellipse in each box."""
    rng = np.random.default_rng(seed)
    width, height = size
    img = Image.fromarray(rng.integers(60, 120, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    for x, y, w, h in boxes:
        draw.ellipse([x, y, x + w, y + h], fill=tuple(int(v) for v in rng.integers(150, 255, 3)))
    return img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, 'JPEG', quality=90)
    return buf.getvalue()


def make_broken_coco(root: str) -> None:
    """Writes ``root/ann.json`` and ``root/images/``: 10 images, 16 annotations, and each
    problem of :data:`EXPECTED`."""
    os.makedirs(osp.join(root, 'images'))
    sizes = {1: (64, 64), 2: (96, 64), 3: (64, 64), 4: (64, 64), 5: (64, 64), 6: (256, 256),
             7: (64, 64), 8: (64, 64), 9: (64, 48), 10: (64, 64)}
    # annotation id: (image id, category id, bbox)
    anns = {1: (1, 1, [4, 4, 20, 20]), 2: (1, 2, [40, 30, 30, 20]),  # 6 px outside
            3: (2, 3, [10, 10, 30, 30]), 4: (2, 9, [50, 10, 20, 20]),  # 'hexagon'
            5: (5, 4, [8, 8, 24, 24]), 6: (5, 1, [40, 40, -10, 10]),
            7: (5, 2, [30, 5, 20, 20]), 8: (5, 3, [1, 2, math.nan, 4]),
            9: (5, 5, [10, 40, 0, 10]), 10: (5, 1, [70, 70, 10, 10]),
            11: (6, 2, [100, 100, 3, 3]), 12: (7, 3, [10, 10, 30, 30]),
            13: (99, 1, [0, 0, 10, 10]), 14: (9, 4, None), 15: (10, 2, [30, 30, 20, 20]),
            16: (9, 5, [20, 10, 20, 20]), 17: (10, 1, [5, 5, 40, 40])}
    annotations = []
    for ann_id, (image_id, cat, box) in anns.items():
        ann = dict(id=ann_id, image_id=image_id, category_id=cat, iscrowd=0)
        if box is not None:
            ann.update(bbox=box, area=box[2] * box[3])
        annotations.append(ann)
    annotations.append(dict(annotations[14], bbox=[1, 1, 10, 10]))  # id 15 again
    images = []
    for image_id, size in sizes.items():
        name = f'{image_id:03d}.jpg'
        images.append(dict(id=image_id, file_name=name, width=size[0], height=size[1]))
        boxes = [a[2] for a in anns.values() if a[0] == image_id and a[2] is not None
                 and all(map(math.isfinite, a[2])) and min(a[2][2:]) > 0]
        img = _draw(size if image_id != 8 else (80, 64), boxes, image_id)
        data = _jpeg(img)
        if image_id == 3:
            continue  # missing
        if image_id == 4:
            data = data[:len(data) // 2]  # truncated
        if image_id == CORRUPT_IMAGE:  # headers, then the end marker: no image data
            data = data[:data.index(b'\xff\xda')] + b'\xff\xd9'
        with open(osp.join(root, 'images', name), 'wb') as f:
            f.write(data)
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)]
    categories.append(dict(id=9, name='hexagon'))
    with open(osp.join(root, 'ann.json'), 'w') as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)


@pytest.fixture
def broken_coco(tmp_path) -> SimpleNamespace:
    """The broken set, the demo config over it, what the checks must find, how the report
    names it (``named(kind, id)``) and a check of a report text (``assert_reported``)."""
    data = str(tmp_path / 'data')
    make_broken_coco(data)
    config = str(tmp_path / 'broken_coco.py')
    with open(config, 'w') as f:
        f.write(CONFIG.format(demo=DEMO_CONFIG, data_root=data))
    return SimpleNamespace(
        data=data, ann_file=osp.join(data, 'ann.json'), config=config, tmp=str(tmp_path),
        classes=CLASSES, expected=EXPECTED, num_images=NUM_IMAGES,
        num_annotations=NUM_ANNOTATIONS, kept_images=KEPT_IMAGES,
        kept_annotations=KEPT_ANNOTATIONS, corrupt_image=CORRUPT_IMAGE,
        emptied_image=EMPTIED_IMAGE, named=_named, assert_reported=_assert_reported)


def _named(kind: str, some_id: int) -> str:
    """How the report names the image (file problems) or annotation of ``some_id``."""
    from projects.deformable_detr.datasets.data_check import FILE_PROBLEMS
    return f'image {some_id} ' if kind in FILE_PROBLEMS else f'annotation {some_id} '


def _assert_reported(text: str) -> None:
    """Asserts that ``text`` holds every problem of :data:`EXPECTED`, counted and named."""
    for kind, ids in EXPECTED.items():
        assert f'{kind} ({len(ids)}):' in text, kind
        assert all(_named(kind, some_id) in text for some_id in ids), kind


@pytest.fixture
def build_dataset(broken_coco) -> Callable:
    """Builds the ``split`` data set of the broken set's config, with ``overrides``."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import DATASETS

    cfg = Config.fromfile(broken_coco.config)
    init_default_scope('mmdet')

    def build(split: str = 'train', **overrides):
        return DATASETS.build(dict(cfg[f'{split}_dataloader'].dataset, **overrides))
    return build
