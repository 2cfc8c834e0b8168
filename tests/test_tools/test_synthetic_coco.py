"""The synthetic COCO generator and its command line: valid, deterministic, small objects."""
import hashlib
import json
import os

import numpy as np
import pytest

from projects.deformable_detr.datasets import synthetic as synth


def _digest(folder: str) -> str:
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            with open(os.path.join(dirpath, name), 'rb') as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def _generate(out: str, seed: int) -> None:
    """The splits of the ``dataset`` fixture, unchecked, with the package's functions."""
    for split, num in (('train', 24), ('val', 6)):
        synth.generate_split(out, split, num, seed, synth.GenConfig(), verbose=False)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory, run_tool):
    """24 train and 6 val images, from the command line (which checks them too), in 2
    processes (``test_deterministic_for_a_seed`` compares them with 1)."""
    out = str(tmp_path_factory.mktemp('synthetic'))
    proc = run_tool(['tools/dataset_converters/synthetic_coco.py', '--out', out,
                     '--num-train', '24', '--num-val', '6', '--seed', '3', '--workers', '2'])
    assert '[train] OK' in proc.stdout and '[val] OK' in proc.stdout
    return out


def test_loads_with_pycocotools(dataset):
    pytest.importorskip('pycocotools')
    from pycocotools.coco import COCO
    coco = COCO(os.path.join(dataset, 'annotations', 'train.json'))
    assert len(coco.getImgIds()) == 24
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(synth.CLASSES)
    ann = coco.loadAnns(coco.getAnnIds())[0]
    assert {'id', 'image_id', 'category_id', 'bbox', 'area', 'iscrowd'} <= set(ann)
    assert ann['iscrowd'] == 0
    # and validate() agrees: ids unique, boxes inside images, files present
    stats = synth.validate(os.path.join(dataset, 'annotations', 'val.json'),
                           os.path.join(dataset, 'val'))
    assert stats['images'] == 6 and stats['objects'] > 0


def test_boxes_inside_images_and_ids_unique(dataset):
    for split in ('train', 'val'):
        with open(os.path.join(dataset, 'annotations', f'{split}.json')) as f:
            coco = json.load(f)
        imgs = {i['id']: i for i in coco['images']}
        assert len(imgs) == len(coco['images'])
        ids = [a['id'] for a in coco['annotations']]
        assert len(set(ids)) == len(ids)
        for a in coco['annotations']:
            x, y, w, h = a['bbox']
            img = imgs[a['image_id']]
            assert 0 <= x and 0 <= y and w > 0 and h > 0
            assert x + w <= img['width'] and y + h <= img['height']
            assert a['area'] == pytest.approx(w * h)
            assert a['visible'] >= 0.5 - 0.05  # the occlusion policy (pixel rounding)


def test_small_and_large_objects_and_all_classes(dataset):
    with open(os.path.join(dataset, 'annotations', 'train.json')) as f:
        anns = json.load(f)['annotations']
    areas = np.array([a['area'] for a in anns])
    assert (areas < 16 * 16).any(), 'no tiny objects'
    assert (areas < 32 * 32).mean() > 0.3, 'COCO-small objects should be common'
    assert (areas >= 48 * 48).any(), 'no big objects'
    assert {a['category_id'] for a in anns} == set(range(1, len(synth.CLASSES) + 1))


def test_deterministic_for_a_seed(dataset, tmp_path):
    again, other = str(tmp_path / 'again'), str(tmp_path / 'other')
    _generate(again, seed=3)
    _generate(other, seed=4)
    assert _digest(again) == _digest(dataset)
    assert _digest(other) != _digest(dataset)


def test_box_is_tight_around_drawn_shape():
    cfg = synth.GenConfig(min_objects=1, max_objects=1)
    for i in range(5):
        _, objs = synth.render_image(np.random.default_rng([0, 9, i]), cfg)
        (obj,) = objs
        x, y, w, h = obj['bbox']
        alpha = synth._alpha_mask(synth.CLASSES[obj['category_id'] - 1],
                                  np.array([x, y, x + w, y + h]), cfg.img_size)
        ys, xs = np.nonzero(alpha > 0.05)
        # the coverage reaches each side of the box to within a pixel
        assert abs(xs.min() - x) <= 1 and abs(xs.max() + 1 - (x + w)) <= 1
        assert abs(ys.min() - y) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1


def test_bad_workers_named(run_tool, tmp_path):
    proc = run_tool(['tools/dataset_converters/synthetic_coco.py', '--out', str(tmp_path),
                     '--workers', '0'], check=False)
    assert proc.returncode == 2 and '--workers must be >= 1, got 0' in proc.stderr
    with pytest.raises(ValueError, match='workers must be >= 1, got -1'):
        synth.generate_split(str(tmp_path), 'val', 2, 0, synth.GenConfig(), workers=-1)
