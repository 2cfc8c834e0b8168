"""ddetr.CocoDataset and ddetr.CocoMetric on a broken COCO-format set (see conftest.py)."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip('mmdet')
from mmengine.structures import InstanceData  # noqa: E402

from projects.deformable_detr.datasets import coco as coco_module  # noqa: E402
from projects.deformable_detr.datasets import DatasetError  # noqa: E402
from projects.deformable_detr.evaluation import CocoMetric  # noqa: E402
from projects.deformable_detr.datasets.data_check import check_image_file  # noqa: E402


@pytest.fixture
def logged(monkeypatch):
    """The (level, message) pairs the data set module logs."""
    records = []
    monkeypatch.setattr(coco_module, 'print_log',
                        lambda msg, logger=None, level=20: records.append((level, msg)))
    return records


def _infos(dataset) -> list:
    return [dataset.get_data_info(i) for i in range(len(dataset))]


def test_report_names_every_problem_with_a_count(broken_coco, build_dataset, logged):
    dataset = build_dataset()
    report = dataset.report
    assert report.counts() == {kind: len(ids) for kind, ids in broken_coco.expected.items()}
    for kind, ids in broken_coco.expected.items():
        for some_id in ids:  # each in its own message
            named = [msg for msg in report.problems[kind] if broken_coco.named(kind, some_id)
                     in msg]
            assert len(named) == 1, (kind, some_id, report.problems[kind])
    assert (report.num_images, report.num_annotations) == (broken_coco.num_images,
                                                           broken_coco.num_annotations)
    assert (report.kept_images, report.kept_annotations) == (len(broken_coco.kept_images),
                                                             broken_coco.kept_annotations)
    # skipped, with one warning that holds the report: counts and every problem
    assert [info['img_id'] for info in _infos(dataset)] == broken_coco.kept_images
    warnings = [msg for level, msg in logged if level == 30]
    assert len(warnings) == 1 and 'strict=False' in warnings[0]
    broken_coco.assert_reported(warnings[0])


def test_usable_annotations_are_kept_and_boxes_clipped(build_dataset):
    boxes = {info['img_id']: [inst['bbox'] for inst in info['instances']]
             for info in _infos(build_dataset())}
    assert boxes[1] == [[4, 4, 24, 24], [40, 30, 64, 50]]  # the second clipped at x = 64
    assert boxes[2] == [[10, 10, 40, 40]]  # not the 'hexagon'
    assert boxes[5] == [[8, 8, 32, 32], [30, 5, 50, 25]]  # 4 broken boxes left out
    assert boxes[10] == [[30, 30, 50, 50], [5, 5, 45, 45]]  # not the repeated id


def test_strict_refuses_with_the_report(broken_coco, build_dataset):
    with pytest.raises(DatasetError, match='strict=True') as info:
        build_dataset(strict=True)
    broken_coco.assert_reported(str(info.value))


def _keep_the_good_part(broken_coco) -> dict:
    """Rewrites the annotation file with only its good images and annotations."""
    with open(broken_coco.ann_file) as f:
        raw = json.load(f)
    good_images = set(broken_coco.kept_images) - {broken_coco.corrupt_image}
    good_anns = (1, 3, 5, 7, 11, 15, 16, 17)
    raw['images'] = [img for img in raw['images'] if img['id'] in good_images]
    raw['annotations'] = [ann for ann in raw['annotations'][:-1] if ann['id'] in good_anns]
    raw['categories'] = raw['categories'][:5]
    with open(broken_coco.ann_file, 'w') as f:
        json.dump(raw, f)
    return raw


def test_a_clean_set_has_no_problem(broken_coco, build_dataset, logged):
    """The checks do not flag good data: the broken set's good part passes strict."""
    raw = _keep_the_good_part(broken_coco)
    dataset = build_dataset(strict=True)
    assert len(dataset.report) == 0 and len(dataset) == len(raw['images'])
    assert dataset.report.kept_annotations == len(raw['annotations'])
    assert [level for level, _ in logged] == [20]  # the report, as information


def test_the_metric_gives_mmdets_numbers_on_a_valid_file(broken_coco):
    from mmdet.evaluation import CocoMetric as MMDetCocoMetric
    raw = _keep_the_good_part(broken_coco)
    rng = np.random.default_rng(0)
    samples = []
    for image in raw['images']:  # the objects, shifted a little, and false detections
        anns = [ann for ann in raw['annotations'] if ann['image_id'] == image['id']]
        boxes = [[x, y, x + w, y + h] for ann in anns for x, y, w, h in [ann['bbox']]]
        boxes = np.array(boxes + [[0, 0, 20, 20]] * 3, np.float32)
        boxes += rng.uniform(-3, 3, boxes.shape).astype(np.float32)
        labels = [ann['category_id'] - 1 for ann in anns] + list(rng.integers(0, 5, 3))
        samples.append(dict(img_id=image['id'], ori_shape=(image['height'], image['width']),
                            pred_instances=dict(bboxes=torch.from_numpy(boxes),
                                                scores=torch.from_numpy(rng.random(len(boxes))),
                                                labels=torch.tensor(labels))))
    results = []
    for metric in (MMDetCocoMetric(ann_file=broken_coco.ann_file),
                   CocoMetric(ann_file=broken_coco.ann_file)):
        metric.dataset_meta = dict(classes=broken_coco.classes)
        metric.process({}, samples)
        results.append(metric.compute_metrics(metric.results))
    assert 0.1 < results[0]['bbox_mAP'] < 0.9
    assert results[1] == results[0]


def test_a_class_without_category_is_reported(broken_coco, build_dataset):
    classes = ('circle', 'sqare', 'triangle', 'cross', 'star')
    dataset = build_dataset(metainfo=dict(classes=classes))
    assert dataset.report.problems['unknown_class'] == [
        "class 'sqare' names no category of the file"]
    with pytest.raises(DatasetError, match='sqare'):
        build_dataset(metainfo=dict(classes=classes), strict=True)


def test_an_image_that_fails_at_run_time_is_skipped_in_training(broken_coco, build_dataset,
                                                                 logged):
    dataset = build_dataset()
    index = [info['img_id'] for info in _infos(dataset)].index(broken_coco.corrupt_image)
    np.random.seed(0)
    for _ in range(3):  # another image each time; one warning, one failure counted
        assert dataset[index]['data_samples'].img_id != broken_coco.corrupt_image
    assert dataset.num_load_failures == 1
    warnings = [msg for level, msg in logged if level == 30][1:]
    assert len(warnings) == 1
    assert f'image {broken_coco.corrupt_image} ' in warnings[0] and 'skipped' in warnings[0]
    assert '1 images of this data set have failed to load so far' in warnings[0]
    emptied = [info['img_id'] for info in _infos(dataset)].index(broken_coco.emptied_image)
    assert len(dataset[emptied]['data_samples'].gt_instances) == 0  # still trained on


def test_failures_are_shared_with_the_loader_workers(broken_coco, build_dataset):
    dataset = build_dataset()
    index = [info['img_id'] for info in _infos(dataset)].index(broken_coco.corrupt_image)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=[index] * 4,
                                         num_workers=2, collate_fn=lambda batch: batch)
    assert all(b[0]['data_samples'].img_id != broken_coco.corrupt_image for b in loader)
    assert dataset.num_load_failures == 1  # seen from the main process


def test_testing_leaves_out_an_image_that_fails_at_run_time(broken_coco, build_dataset):
    dataset = build_dataset('val')
    metric = CocoMetric(ann_file=broken_coco.ann_file)  # NaN, negative, missing boxes
    metric.dataset_meta = dataset.metainfo
    for index in range(len(dataset)):
        sample = dataset[index]['data_samples']
        failed = sample.img_id == broken_coco.corrupt_image
        assert sample.metainfo.get('load_failed', False) == failed
        gt = sample.gt_instances  # loaded after the resize: in the image's own pixels
        sample.pred_instances = InstanceData(bboxes=gt.bboxes.tensor,
                                             scores=torch.ones(len(gt)), labels=gt.labels)
        metric.process({}, [sample.to_dict()])
    results = metric.compute_metrics(metric.results)
    evaluated = [i for i in broken_coco.kept_images if i != broken_coco.corrupt_image]
    assert metric.img_ids == evaluated
    # the data set's boxes as predictions: the metric's ground truth also holds the
    # zero-area and the outside boxes, and the unclipped box of annotation 2
    assert 0.5 < results['bbox_mAP'] < 1.0


def _jpeg(size=(48, 32), **save_args) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    img.save(buf, 'JPEG', **save_args)
    return buf.getvalue()


def _png(size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new('RGB', size, (10, 20, 30)).save(buf, 'PNG')
    return buf.getvalue()


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees: OpenCV decodes it 32x48
    return _jpeg(exif=exif.tobytes())


CASES = {  # name: (file content, width and height in the annotation file, problem)
    'jpeg': (_jpeg(), (48, 32), None),
    'jpeg with a trailer': (_jpeg() + b'SEFH trailer that some phones append' * 4, (48, 32),
                            None),
    'truncated jpeg': (_jpeg()[:-200], (48, 32), 'truncated_file'),
    'truncated progressive jpeg': (_jpeg(progressive=True)[:-200], (48, 32),
                                   'truncated_file'),
    'png': (_png(), (48, 32), None),
    'truncated png': (_png()[:-30], (48, 32), 'truncated_file'),
    'empty file': (b'', (48, 32), 'unreadable_file'),
    'html': (b'<html>not found</html>', (48, 32), 'unreadable_file'),
    'other size': (_jpeg(), (32, 48), 'size_mismatch'),
    'exif-rotated jpeg': (_rotated_jpeg(), (32, 48), None),
    'exif-rotated jpeg, unrotated size': (_rotated_jpeg(), (48, 32), 'size_mismatch'),
}


@pytest.mark.parametrize('case', CASES)
def test_check_image_file(tmp_path, case):
    data, size, kind = CASES[case]
    path = tmp_path / 'img'
    path.write_bytes(data)
    problem = check_image_file(str(path), *size)
    assert (problem and problem[0]) == kind, problem
    if problem:
        assert str(path) in problem[1]
