"""The tools on the broken set: check_dataset.py, and training and testing the demo model."""
import json
import math
import os
import os.path as osp

import pytest

pytest.importorskip('mmdet')


def test_check_dataset_prints_the_report(broken_coco, run_tool):
    out = osp.join(broken_coco.tmp, 'report.json')
    proc = run_tool(['tools/misc/check_dataset.py', broken_coco.config, '--split', 'val',
                     '--out', out], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    broken_coco.assert_reported(proc.stdout)
    with open(out) as f:
        (report,) = json.load(f)
    assert report['counts'] == {kind: len(ids) for kind, ids in broken_coco.expected.items()}
    assert report['kept_images'] == len(broken_coco.kept_images)

    # decoding also finds the image whose data is corrupt behind a good header
    proc = run_tool(['tools/misc/check_dataset.py', broken_coco.config, '--decode',
                     '--out', out], check=False)
    assert proc.returncode == 1
    with open(out) as f:
        (report,) = json.load(f)
    assert report['counts']['unreadable_file'] == 1
    assert f"image {broken_coco.corrupt_image} " in report['problems']['unreadable_file'][0]
    assert report['kept_images'] == len(broken_coco.kept_images) - 1


def test_training_and_testing_finish_on_the_broken_set(broken_coco, run_tool):
    work_dir = osp.join(broken_coco.tmp, 'work')
    proc = run_tool(['tools/train.py', broken_coco.config, '--work-dir', work_dir])
    log = proc.stdout + proc.stderr
    broken_coco.assert_reported(log)
    for mode in ('training', 'test mode'):  # the training and the validation set
        assert f'data set check ({mode}, strict=False' in log
        assert (f'image {broken_coco.corrupt_image} {broken_coco.data}/images/'
                f'{broken_coco.corrupt_image:03d}.jpg failed to load and is skipped ({mode})'
                in log)
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))
    (run,) = [d for d in os.listdir(work_dir) if osp.isdir(osp.join(work_dir, d))]
    with open(osp.join(work_dir, run, 'vis_data', 'scalars.json')) as f:
        lines = [json.loads(line) for line in f]
    losses = [line['loss'] for line in lines if 'loss' in line]
    assert len(losses) == 4 and all(map(math.isfinite, losses))  # 7 images, batch 2
    assert 'coco/bbox_mAP' in lines[-1]

    proc = run_tool(['tools/test.py', broken_coco.config, osp.join(work_dir, 'epoch_1.pth'),
                     '--work-dir', osp.join(work_dir, 'test')])
    log = proc.stdout + proc.stderr
    assert 'coco/bbox_mAP' in log
    assert 'CocoMetric evaluates 6 of the 10 images' in log


def test_strict_training_refuses_to_start(broken_coco, run_tool):
    work_dir = osp.join(broken_coco.tmp, 'strict')
    proc = run_tool(['tools/train.py', broken_coco.config, '--work-dir', work_dir,
                     '--cfg-options', 'train_dataloader.dataset.strict=True'], check=False)
    assert proc.returncode != 0
    assert 'DatasetError: the data set has problems and strict=True' in proc.stderr
    broken_coco.assert_reported(proc.stderr)
    assert not [f for f in os.listdir(work_dir) if f.endswith('.pth')]
