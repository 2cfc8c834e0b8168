"""Each file a run reads, broken in each way: one error that names it and says what is wrong.

The data set's files (annotation file, image folder, the set left after the filters) are
checked when the set is built, by CocoMetric, by tools/misc/check_dataset.py and, for the
cases a user meets first, through tools/train.py with the demo config.
"""
import json
import os
import os.path as osp
import shutil

import pytest

pytest.importorskip('mmdet')

from projects.deformable_detr.datasets import DatasetError  # noqa: E402
from projects.deformable_detr.evaluation import CocoMetric  # noqa: E402
from projects.deformable_detr.datasets.input_files import load_annotation_file  # noqa: E402


def _clean_set(broken_coco) -> dict:
    """Rewrites the broken set's annotation file to its usable images and annotations."""
    with open(broken_coco.ann_file) as f:
        raw = json.load(f)
    keep = {1, 2, 5, 6, 7, 9, 10}
    raw['images'] = [image for image in raw['images'] if image['id'] in keep]
    raw['annotations'] = [ann for ann in raw['annotations'] if ann['image_id'] in keep
                          and ann['id'] in (1, 3, 5, 7, 11, 12, 16, 17)]
    raw['categories'] = raw['categories'][:5]
    _write(broken_coco.ann_file, raw)
    return raw


def _write(path: str, raw) -> None:
    with open(path, 'w') as f:
        json.dump(raw, f)


def _cut_in_half(path: str) -> None:
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


def _assert_one_error(proc, message: str) -> None:
    """The tool failed with a single traceback whose error is ``message``."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert message in proc.stderr, out[-3000:]
    assert out.count('Traceback') == 1 and 'During handling' not in out, out[-3000:]


# --- the annotation file --------------------------------------------------------------

ANNOTATION_FILE_CASES = {
    # name: (how the file is broken, what the error must say after 'annotation file PATH')
    'missing': (lambda path: os.remove(path), ' does not exist'),
    'directory': (lambda path: (os.remove(path), os.mkdir(path)), ' is a directory'),
    'empty': (lambda path: open(path, 'w').close(), ' is empty (0 bytes)'),
    'blank': (lambda path: open(path, 'w').write('\n \n'), ' is empty (3 bytes)'),
    'cut_in_half': (_cut_in_half, ': it ends before its JSON does'),
    'cut_after_a_comma': (lambda path: open(path, 'w').write('{"images": [1, '),
                          ': it ends before its JSON does'),
    'not_json': (lambda path: open(path, 'w').write('images: []\n'),
                 ': it is not valid JSON: Expecting value at line 1 column 1'),
    'binary': (lambda path: open(path, 'wb').write(b'\xff\xd8\xff\xe0\x00\x10JFIF'),
               ' is not a JSON text file'),
    'a_list': (lambda path: _write(path, [1, 2]), ' is not a COCO annotation file: it holds '
               'a JSON list'),
    'no_images': (lambda path: _write(path, dict(annotations=[], categories=[])),
                  " is not a COCO annotation file: it needs the lists \"images\", "
                  "\"categories\" (and \"annotations\"); 'images' missing or not a list "
                  '(its keys: "annotations", "categories")'),
    'annotations_not_a_list': (lambda path: _write(path, dict(images=[], categories=[],
                                                              annotations={})),
                               ' is not a COCO annotation file: it needs the lists "images", '
                               '"categories" (and "annotations"); \'annotations\' missing or '
                               'not a list'),
    'no_image_listed': (lambda path: _write(path, dict(images=[], annotations=[],
                                                       categories=[])), ' lists no images'),
}


@pytest.mark.parametrize('case', sorted(ANNOTATION_FILE_CASES))
def test_annotation_file_errors_name_the_file(broken_coco, build_dataset, case):
    breaks, message = ANNOTATION_FILE_CASES[case]
    breaks(broken_coco.ann_file)
    for split in ('train', 'val'):
        with pytest.raises(DatasetError) as err:
            build_dataset(split)
        assert str(err.value).startswith(f'annotation file {broken_coco.ann_file}{message}'), \
            str(err.value)
        assert err.value.__cause__ is None and (err.value.__context__ is None
                                                or err.value.__suppress_context__), case
    if case != 'no_image_listed':  # an empty set has nothing to evaluate either way
        with pytest.raises(DatasetError, match=f'annotation file {broken_coco.ann_file}'):
            CocoMetric(ann_file=broken_coco.ann_file)


def test_a_cut_file_is_told_from_a_malformed_one(tmp_path):
    path = str(tmp_path / 'ann.json')
    _write(path, dict(images=[dict(id=1, file_name='a.jpg')], annotations=[], categories=[]))
    text = open(path).read()
    open(path, 'w').write(text.replace('"a.jpg"', '"a.jpg" "b.jpg"'))
    with pytest.raises(DatasetError) as err:
        load_annotation_file(path)
    assert 'is not valid JSON' in str(err.value) and 'cut short' not in str(err.value)
    open(path, 'w').write(text[:-3])
    with pytest.raises(DatasetError, match='cut short'):
        load_annotation_file(path)


def test_no_class_among_the_categories(broken_coco, build_dataset):
    raw = _clean_set(broken_coco)
    for category in raw['categories']:
        category['name'] += '_renamed'
    _write(broken_coco.ann_file, raw)
    with pytest.raises(DatasetError, match=f'annotation file {broken_coco.ann_file}: none of '
                       r"the classes \('circle', .*\) is one of its categories "
                       r"\['circle_renamed'"):
        build_dataset()


# --- the image folder -----------------------------------------------------------------

def _as_file(folder: str) -> None:
    shutil.rmtree(folder)
    open(folder, 'w').close()


def _emptied(folder: str) -> None:
    shutil.rmtree(folder)
    os.mkdir(folder)


@pytest.mark.parametrize('breaks, message', [
    (shutil.rmtree, 'does not exist'),
    (_as_file, 'is not a folder'),
    (_emptied, 'is empty, and the annotation file lists 10 images'),
])
def test_image_folder_errors_name_the_folder(broken_coco, build_dataset, breaks, message):
    folder = osp.join(broken_coco.data, 'images')
    breaks(folder)
    for split in ('train', 'val'):
        with pytest.raises(DatasetError) as err:
            build_dataset(split)
        assert str(err.value) == (f'image folder {folder}/ (of {broken_coco.ann_file}) '
                                  f'{message}')


def test_no_readable_image_names_the_file_and_each_image(broken_coco, build_dataset):
    _clean_set(broken_coco)
    folder = osp.join(broken_coco.data, 'images')
    for name in os.listdir(folder):
        with open(osp.join(folder, name), 'wb') as f:
            f.write(b'not an image')
    with pytest.raises(DatasetError) as err:
        build_dataset()
    message = str(err.value)
    assert message.startswith(f'annotation file {broken_coco.ann_file}: no usable image in '
                              'the data set:')
    assert 'unreadable_file (7):' in message
    assert all(f'{folder}/{image_id:03d}.jpg' in message for image_id in (1, 2, 5, 6, 7, 9, 10))


def test_every_image_failing_at_run_time_names_the_file(broken_coco, build_dataset):
    _clean_set(broken_coco)
    dataset = build_dataset()
    folder = osp.join(broken_coco.data, 'images')
    for name in os.listdir(folder):  # broken after the check: only loading finds it
        os.remove(osp.join(folder, name))
    with pytest.raises(DatasetError, match=f'every one of the 7 images of '
                       f'{broken_coco.ann_file} has failed to load; the last, {folder}/'):
        dataset[0]  # MMEngine fetches other images until none is left


# --- the set after its filters --------------------------------------------------------

def test_filters_that_leave_no_image(broken_coco, build_dataset):
    raw = _clean_set(broken_coco)
    _write(broken_coco.ann_file, dict(raw, annotations=[]))
    assert len(build_dataset()) == 7  # filter_empty_gt=False: images without objects
    with pytest.raises(DatasetError) as err:
        build_dataset(filter_cfg=dict(filter_empty_gt=True))
    assert str(err.value).startswith(
        f"annotation file {broken_coco.ann_file}: filter_cfg {{'filter_empty_gt': True}} "
        'leaves no image of the 7 usable ones (7 have no usable box;')
    _write(broken_coco.ann_file, raw)
    with pytest.raises(DatasetError, match=r'leaves no image of the 7 usable ones \(0 have no '
                       r'usable box; the smallest side is 48 px\)'):
        build_dataset(filter_cfg=dict(filter_empty_gt=False, min_size=1000))
    assert len(build_dataset('val', filter_cfg=dict(min_size=1000))) == 7  # test mode


# --- through the tools ----------------------------------------------------------------

def test_training_stops_at_a_cut_annotation_file(broken_coco, run_tool):
    _clean_set(broken_coco)
    _cut_in_half(broken_coco.ann_file)
    work_dir = osp.join(broken_coco.tmp, 'work')
    proc = run_tool(['tools/train.py', broken_coco.config, '--work-dir', work_dir], check=False)
    _assert_one_error(proc, f'DatasetError: annotation file {broken_coco.ann_file}: it ends '
                      'before its JSON does')
    proc = run_tool(['tools/misc/check_dataset.py', broken_coco.config], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f'error: annotation file {broken_coco.ann_file}: it ends before its JSON does')
    assert 'Traceback' not in proc.stderr


def test_training_stops_when_the_filters_leave_no_image(broken_coco, run_tool):
    raw = _clean_set(broken_coco)
    _write(broken_coco.ann_file, dict(raw, annotations=[]))
    options = ['--cfg-options', 'train_dataloader.dataset.filter_cfg.filter_empty_gt=True']
    work_dir = osp.join(broken_coco.tmp, 'work')
    proc = run_tool(['tools/train.py', broken_coco.config, '--work-dir', work_dir] + options,
                    check=False)
    _assert_one_error(proc, f'DatasetError: annotation file {broken_coco.ann_file}: filter_cfg ')
    assert 'leaves no image of the 7 usable ones' in proc.stderr
    assert 'need at least one array' not in proc.stderr
    proc = run_tool(['tools/misc/check_dataset.py', broken_coco.config] + options, check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert 'leaves no image of the 7 usable ones' in proc.stderr
    # the filters that keep images: the report says how many
    proc = run_tool(['tools/misc/check_dataset.py', broken_coco.config], check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: filter_cfg {'filter_empty_gt': False, 'min_size': 1} keeps 7 of 7 usable " \
        'images' in proc.stdout
