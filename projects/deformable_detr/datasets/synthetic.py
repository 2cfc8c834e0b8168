"""Generate a small synthetic detection data set in COCO format.

Five shape classes of distinct geometry (circle, square, triangle, cross, star), each in
random colours and aspect ratios, on textured, noisy backgrounds. Sizes run from tiny
(8 px, far below COCO's "small" limit of 32x32 px area) to large (> 96x96 px area).

Another class set, for fine-tuning a model trained on the default one, is any choice of
:data:`SHAPES` (``GenConfig.classes``): the five, and three shapes the default set never
shows (diamond, hexagon, ring). Category ids are 1, 2, ... in the order given.

Occlusion policy: boxes are *amodal*, i.e. always the full extent of the object, and no
annotated object is hidden by more than ``max_occlusion`` (default 50 %) of its area. A
placement that would hide more of an object already drawn is re-drawn elsewhere (or the
new object is skipped), so the image never contains an un-annotated, mostly hidden shape.

Everything is a function of the seed: image ``i`` of split ``s`` uses its own generator
seeded with ``(seed, s, i)``, so any image can be reproduced alone.

The command line is ``tools/dataset_converters/synthetic_coco.py``;
:func:`generate_split` writes ``OUT/SPLIT/NNNNNN.jpg`` and ``OUT/annotations/SPLIT.json``,
:func:`validate` loads a split back and checks it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('circle', 'square', 'triangle', 'cross', 'star')  # the demo's classes
SHAPES = CLASSES + ('diamond', 'hexagon', 'ring')  # every shape the generator draws
SPLITS = ('train', 'val')
SUPERSAMPLE = 4  # shapes are rasterised at 4x and box-filtered down: anti-aliased edges


@dataclass
class GenConfig:
    """Knobs of the generator (defaults: the demo data set)."""
    img_size: int = 128
    min_objects: int = 1
    max_objects: int = 6
    min_size: float = 8.0  # shorter side of an object's box, px
    max_size: float = 104.0  # longer side
    max_occlusion: float = 0.5  # fraction of an object's area another may hide
    jpeg_quality: int = 92
    classes: tuple[str, ...] = CLASSES  # names from SHAPES; category id k+1 is classes[k]

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown or not self.classes or len(set(self.classes)) < len(self.classes):
            raise ValueError(f'classes must be distinct names among {", ".join(SHAPES)}; '
                             f'got {list(self.classes)}' +
                             (f' (unknown: {", ".join(unknown)})' if unknown else ''))


def _unit_polygon(name: str) -> np.ndarray | None:
    """Vertices of a class shape normalised to span exactly [-1, 1] on both axes.

    None for the circle and the ring (drawn as ellipses). Normalising makes the tight box
    of the drawn shape equal to the box we sample, so annotations are exact.
    """
    if name == 'square':
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif name == 'triangle':
        pts = [(0, -1), (1, 1), (-1, 1)]
    elif name == 'cross':
        t = 0.36  # half-width of an arm
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1),
               (-t, t), (-1, t), (-1, -t), (-t, -t)]
    elif name == 'star':
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    elif name == 'diamond':
        pts = [(0, -1), (1, 0), (0, 1), (-1, 0)]
    elif name == 'hexagon':
        ang = np.arange(6) * np.pi / 3
        pts = np.stack([np.cos(ang), np.sin(ang)], 1)
    else:
        return None
    pts = np.asarray(pts, dtype=np.float64)
    lo, hi = pts.min(0), pts.max(0)
    return (pts - lo) / (hi - lo) * 2 - 1


_POLYGONS = {name: _unit_polygon(name) for name in SHAPES}
RING_HOLE = 0.55  # inner diameter of the ring over its outer one


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bicubically."""
    grid = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode='F').resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(img), 0, 1)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                     (v, p, q)][i], dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation base colour, large blotches, fine grain and a few clutter lines."""
    base = _hsv_to_rgb(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.25, 0.85))
    img = np.broadcast_to(base, (size, size, 3)).copy()
    for cells, amp in ((3, 0.25), (8, 0.12), (24, 0.06)):
        img += (_smooth_noise(rng, size, cells)[..., None] - 0.5) * amp * 2
    img = np.clip(img, 0, 1)
    # Thin clutter strokes: edges that are not objects, so the detector can't just
    # fire on any gradient.
    pil = Image.fromarray((img * 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(0, 5)):
        xy = rng.uniform(0, size, 4).tolist()
        col = tuple(int(c) for c in np.clip(base * 255 + rng.normal(0, 50, 3), 0, 255))
        draw.line(xy, fill=col, width=int(rng.integers(1, 3)))
    return np.asarray(pil).astype(np.float32) / 255


def _alpha_mask(name: str, box: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape filling ``box`` (x1, y1, x2, y2)."""
    s = SUPERSAMPLE
    canvas = Image.new('L', (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1, x2, y2 = (box * s).tolist()
    poly = _POLYGONS[name]
    if poly is None:
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=255)
        if name == 'ring':
            cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            draw.ellipse([cx - hw * RING_HOLE, cy - hh * RING_HOLE,
                          cx + hw * RING_HOLE, cy + hh * RING_HOLE], fill=0)
    else:
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        # PIL fills the pixel under the last coordinate: shrink by half a sub-pixel
        pts = [(cx + px * (hw - 0.5), cy + py * (hh - 0.5)) for px, py in poly]
        draw.polygon(pts, fill=255)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small).astype(np.float32) / 255


def _object_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    """A saturated colour clearly different from the local background."""
    for _ in range(20):
        col = _hsv_to_rgb(rng.random(), rng.uniform(0.45, 1), rng.uniform(0.35, 1))
        if np.abs(col - bg_mean).sum() > 0.45:
            break
    return col


def render_image(rng: np.random.Generator, cfg: GenConfig) -> tuple[np.ndarray, list[dict]]:
    """One image (H, W, 3 uint8) and its objects: dicts with ``category_id``, ``bbox``
    ([x, y, w, h], the full shape), ``area`` (box area) and ``visible`` (fraction)."""
    size = cfg.img_size
    img = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int32)  # which object is on top
    full_area: list[float] = []
    objects: list[dict] = []
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(n):
        cls = int(rng.integers(len(cfg.classes)))
        for _try in range(15):
            # log-uniform size: as many tiny as medium objects
            side = float(np.exp(rng.uniform(np.log(cfg.min_size), np.log(cfg.max_size))))
            aspect = float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
            w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
            w, h = min(max(w, cfg.min_size), size - 1), min(max(h, cfg.min_size), size - 1)
            x1, y1 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            # snap to the 1/SUPERSAMPLE grid the mask is drawn on: box == drawn extent
            box = np.round(np.array([x1, y1, x1 + w, y1 + h]) * SUPERSAMPLE) / SUPERSAMPLE
            alpha = _alpha_mask(cfg.classes[cls], box, size)
            cover = alpha > 0.5
            if cover.sum() == 0:
                continue
            hidden = np.bincount(owner[cover & (owner >= 0)], minlength=len(objects))
            visible = np.bincount(owner[owner >= 0], minlength=len(objects))
            if all(visible[j] - hidden[j] >= (1 - cfg.max_occlusion) * full_area[j]
                   for j in range(len(objects))):
                break
        else:
            continue  # no placement that keeps everything visible enough: skip it
        col = _object_colour(rng, img[cover].mean(0))
        # mild shading and grain so objects are not flat stencils
        shade = 1 + (_smooth_noise(rng, size, 4)[..., None] - 0.5) * 0.3
        tex = np.clip(col * shade, 0, 1)
        img = img * (1 - alpha[..., None]) + tex * alpha[..., None]
        owner[cover] = len(objects)
        full_area.append(float(cover.sum()))
        bx1, by1, bx2, by2 = box.tolist()
        objects.append(dict(category_id=cls + 1, bbox=[bx1, by1, bx2 - bx1, by2 - by1],
                            area=(bx2 - bx1) * (by2 - by1)))
    visible = np.bincount(owner[owner >= 0], minlength=len(objects))
    for j, obj in enumerate(objects):
        obj['visible'] = round(float(visible[j] / full_area[j]), 3)
    img = img + rng.normal(0, rng.uniform(0.01, 0.04), img.shape)  # sensor noise
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), objects


def _write_image(i: int, img_dir: str, seed: int, split_id: int,
                 cfg: GenConfig) -> tuple[str, list[dict]]:
    """Renders image ``i`` of a split, writes it, returns its file name and objects."""
    rng = np.random.default_rng([seed, split_id, i])
    pixels, objects = render_image(rng, cfg)
    file_name = f'{i + 1:06d}.jpg'
    Image.fromarray(pixels).save(os.path.join(img_dir, file_name), quality=cfg.jpeg_quality)
    return file_name, objects


def generate_split(out: str, split: str, num: int, seed: int, cfg: GenConfig,
                   verbose: bool = True, workers: int = 1) -> str:
    """Render ``num`` images of ``split`` into ``out`` and write its COCO json.

    ``workers`` processes render the images (the files and the json are the same for
    any number: each image has its own generator).
    """
    if workers < 1:
        raise ValueError(f'workers must be >= 1, got {workers}')
    split_id = SPLITS.index(split) if split in SPLITS else len(split)
    img_dir = os.path.join(out, split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(os.path.join(out, 'annotations'), exist_ok=True)
    images, annotations = [], []
    start = time.time()
    write = partial(_write_image, img_dir=img_dir, seed=seed, split_id=split_id, cfg=cfg)
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        # in order, in chunks: each worker renders a run of images between messages
        done = pool.map(write, range(num), chunksize=32) if pool else map(write, range(num))
        for i, (file_name, objects) in enumerate(done):
            images.append(dict(id=i + 1, file_name=file_name, height=cfg.img_size,
                               width=cfg.img_size))
            for obj in objects:
                annotations.append(dict(id=len(annotations) + 1, image_id=i + 1,
                                        iscrowd=0, **obj))
            if verbose and ((i + 1) % max(1, num // 20) == 0 or i + 1 == num):
                rate = (i + 1) / max(time.time() - start, 1e-6)
                print(f'\r[{split}] {i + 1}/{num} images, {len(annotations)} objects, '
                      f'{rate:.0f} img/s, ETA {(num - i - 1) / rate:.0f}s', end='',
                      file=sys.stderr, flush=True)
    if verbose:
        print(file=sys.stderr)
    coco = dict(info=dict(description='synthetic shapes', version='1.0'),
                licenses=[], images=images, annotations=annotations,
                categories=[dict(id=k + 1, name=n, supercategory='shape')
                            for k, n in enumerate(cfg.classes)])
    ann_file = os.path.join(out, 'annotations', f'{split}.json')
    with open(ann_file, 'w') as f:
        json.dump(coco, f)
    return ann_file


def validate(ann_file: str, img_dir: str) -> dict:
    """Load ``ann_file`` back (with pycocotools, when installed) and check it.

    Raises AssertionError on a broken data set (duplicate ids, a box outside its
    image, a missing image file, an unknown category). Returns some statistics.
    """
    with open(ann_file) as f:
        data = json.load(f)
    try:
        import contextlib
        import io

        from pycocotools.coco import COCO
        with contextlib.redirect_stdout(io.StringIO()):  # its index-building chatter
            coco = COCO(ann_file)
        assert len(coco.getImgIds()) == len(data['images'])
        assert len(coco.getAnnIds()) == len(data['annotations'])
    except ImportError:
        print('pycocotools not installed: checked the json only', file=sys.stderr)
    imgs, anns = data['images'], data['annotations']
    assert len({i['id'] for i in imgs}) == len(imgs), 'duplicate image ids'
    assert len({a['id'] for a in anns}) == len(anns), 'duplicate annotation ids'
    by_id = {i['id']: i for i in imgs}
    cat_ids = {c['id'] for c in data['categories']}
    for a in anns:
        img = by_id[a['image_id']]
        x, y, w, h = a['bbox']
        assert a['category_id'] in cat_ids and a['iscrowd'] == 0, a
        assert w > 0 and h > 0 and x >= 0 and y >= 0, a
        assert x + w <= img['width'] and y + h <= img['height'], a
    for img in imgs:
        assert os.path.isfile(os.path.join(img_dir, img['file_name'])), img
    areas = np.array([a['area'] for a in anns])
    names = {c['id']: c['name'] for c in data['categories']}
    return dict(images=len(imgs), objects=len(anns),
                small=int((areas < 32**2).sum()),
                medium=int(((areas >= 32**2) & (areas < 96**2)).sum()),
                large=int((areas >= 96**2).sum()),
                per_class={n: sum(a['category_id'] == k for a in anns)
                           for k, n in names.items()})
