"""tools/train.py and tools/test.py end to end on a tiny Deformable DETR and tiny data.

The data, configs and the shared runs are fixtures of ``conftest.py``.
"""
import os
import os.path as osp
import pickle

import numpy as np


def test_train_writes_checkpoints_logs_and_metrics(baseline_run, read_records, last_metrics):
    work_dir = baseline_run
    for i in (2, 4, 6, 8):
        assert osp.isfile(osp.join(work_dir, f'iter_{i}.pth'))
    records = read_records(work_dir)
    assert sorted(records) == list(range(1, 9))
    assert all(np.isfinite(r['loss']) and r['dtype'] == 'torch.float32'
               for r in records.values())
    # pycocotools reports -1 when it finds no ground truth to score against: >= 0 says the
    # validation evaluated the annotated images. 8 iterations learn nothing measurable;
    # that the model learns is test_smoke_map.py's bar (mAP >= 0.1 after 120 iterations).
    assert last_metrics(work_dir)['coco/bbox_mAP'] >= 0


def test_test_dumps_predictions_and_draws_them(prediction_run):
    out_dir = prediction_run
    with open(osp.join(out_dir, 'stdout.txt')) as f:
        assert 'coco/bbox_mAP' in f.read()
    with open(osp.join(out_dir, 'results.pkl'), 'rb') as f:
        results = pickle.load(f)
    assert len(results) == 8
    assert {'img_id', 'pred_instances'} <= set(results[0])
    assert len(results[0]['pred_instances']['bboxes']) == 10  # max_per_img
    drawn = [f for _, _, files in os.walk(out_dir) for f in files if f.endswith('.png')]
    assert len(drawn) == 8


def test_test_tta(tmp_path, tiny_setup, baseline_run, prediction_run, run_tool):
    """--tta merges the predictions on each image and on its mirror image by NMS."""
    out = str(tmp_path / 'tta.pkl')
    proc = run_tool(['tools/test.py', tiny_setup['config'], osp.join(baseline_run, 'iter_8.pth'),
                     '--work-dir', str(tmp_path), '--tta', '--out', out])
    log = proc.stdout + proc.stderr
    assert 'coco/bbox_mAP' in log and 'using DetTTAModel with NMS 0.5' in log
    with open(out, 'rb') as f:
        tta = {r['img_id']: r['pred_instances'] for r in pickle.load(f)}
    with open(osp.join(prediction_run, 'results.pkl'), 'rb') as f:
        plain = {r['img_id']: r['pred_instances'] for r in pickle.load(f)}
    assert sorted(tta) == sorted(plain) and len(tta) == 8
    differ = 0
    for img_id, pred in tta.items():
        # the merged set holds the best box of both passes: a score at least the plain
        # pass's best (NMS keeps the highest-scoring box of a cluster)
        assert pred['scores'].max() >= plain[img_id]['scores'].max()
        same = (len(pred['bboxes']) == len(plain[img_id]['bboxes'])
                and np.array_equal(np.asarray(pred['bboxes']),
                                   np.asarray(plain[img_id]['bboxes'])))
        differ += not same
    # an ignored --tta would give the plain predictions on every image
    assert differ >= 4, differ


def test_amp_trains_in_bfloat16_on_cpu_and_auto_scale_lr(tmp_path, tiny_setup, baseline_run,
                                                        run_tool, read_records):
    proc = run_tool(['tools/train.py', tiny_setup['config'], '--work-dir', str(tmp_path), '--amp',
                     '--auto-scale-lr', '--cfg-options', 'train_cfg.max_iters=3',
                     'auto_scale_lr.base_batch_size=1', 'train_cfg.val_interval=100',
                     'default_hooks.checkpoint.interval=100'])
    # --auto-scale-lr: lr x total batch / base_batch_size = 1e-3 x 2 / 1
    assert 'lr: 2.0000e-03' in proc.stdout + proc.stderr
    records = read_records(str(tmp_path))
    assert sorted(records) == [1, 2, 3]
    for r in records.values():
        assert r['dtype'] == 'torch.bfloat16'
        assert np.isfinite(r['loss'])
    baseline = read_records(baseline_run)
    # same data and initial weights: bfloat16 changes the first loss only slightly
    assert records[1]['loss'] != baseline[1]['loss']
    assert abs(records[1]['loss'] - baseline[1]['loss']) < 0.05 * baseline[1]['loss']


def test_train_and_test_our_model(tmp_path, tiny_setup, run_tool, read_records):
    """The tools with this project's Deformable DETR (ddetr scope, our op)."""
    config = tiny_setup['ours']
    run_tool(['tools/train.py', config, '--work-dir', str(tmp_path), '--cfg-options',
              'train_cfg.max_iters=2', 'train_cfg.val_interval=2'])
    records = read_records(str(tmp_path))
    assert sorted(records) == [1, 2] and all(np.isfinite(r['loss']) for r in records.values())
    proc = run_tool(['tools/test.py', config, str(tmp_path / 'iter_2.pth'), '--work-dir',
                     str(tmp_path / 'test')])
    assert 'coco/bbox_mAP' in proc.stdout + proc.stderr
