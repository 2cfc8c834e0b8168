"""The tools of tools/analysis_tools, run as commands on the tiny run's logs and results."""
import json
import os
import os.path as osp
import pickle

import numpy as np
import pytest
import torch

from projects.deformable_detr.utils.flops import FLOP_HANDLES

TOOLS = 'tools/analysis_tools'


def json_log(work_dir: str) -> str:
    run = sorted(d for d in os.listdir(work_dir)
                 if osp.isfile(osp.join(work_dir, d, 'vis_data', 'scalars.json')))[-1]
    return osp.join(work_dir, run, 'vis_data', f'{run}.json')


def test_analyze_logs(tmp_path, baseline_run, run_tool):
    log = json_log(baseline_run)
    out = str(tmp_path / 'curves.png')
    tool = f'{TOOLS}/analyze_logs.py'
    run_tool([tool, 'plot_curve', log, log, '--keys', 'loss', 'coco/bbox_mAP',
              '--legend', 'a', 'b', '--out', out])
    assert osp.getsize(out) > 1000
    assert 'average iter time' in run_tool([tool, 'cal_train_time', log]).stdout
    proc = run_tool([tool, 'plot_curve', log, '--keys', 'nope', '--out', out], check=False)
    assert proc.returncode != 0
    assert 'KeyError' in proc.stderr and 'no log has the key' in proc.stderr


def test_confusion_matrix_counts(tmp_path, tiny_setup, run_tool):
    """One image whose detections make every kind of count, at the default thresholds."""
    gts = [(1, [0, 0, 10, 10]), (2, [20, 20, 10, 10]), (2, [40, 40, 10, 10])]  # x, y, w, h
    ann = dict(images=[dict(id=1, file_name='000.png', width=100, height=100)],
               annotations=[dict(id=i + 1, image_id=1, category_id=c, bbox=b, area=100,
                                 iscrowd=0) for i, (c, b) in enumerate(gts)],
               categories=[dict(id=1, name='red'), dict(id=2, name='green')])
    with open(tmp_path / 'ann.json', 'w') as f:
        json.dump(ann, f)
    bboxes = np.array([[0, 0, 10, 10],      # class 0 on the class-0 box: right
                       [20, 20, 30, 31],    # class 0 on a class-1 box: confused
                       [60, 60, 70, 70],    # nothing there: false positive (class 1)
                       [40, 40, 50, 50]],   # below the score threshold: ignored
                      np.float32)
    results = [dict(img_id=1, pred_instances=dict(
        bboxes=bboxes, scores=np.array([0.9, 0.8, 0.7, 0.1]), labels=np.array([0, 0, 1, 1])))]
    with open(tmp_path / 'results.pkl', 'wb') as f:
        pickle.dump(results, f)
    run_tool([f'{TOOLS}/confusion_matrix.py', tiny_setup['config'], str(tmp_path / 'results.pkl'),
              str(tmp_path / 'out'), '--cfg-options',
              f'test_dataloader.dataset.ann_file={tmp_path / "ann.json"}'])
    matrix = np.loadtxt(tmp_path / 'out' / 'confusion_matrix.txt', dtype=np.int64)
    np.testing.assert_array_equal(matrix, [[1, 0, 0],    # gt 0 -> pred 0
                                           [1, 0, 1],    # gt 1 -> pred 0, gt 1 missed
                                           [1, 1, 0]])   # false positives of 0 and 1


def test_confusion_matrix_tool(tmp_path, tiny_setup, prediction_run, run_tool):
    results = osp.join(prediction_run, 'results.pkl')
    run_tool([f'{TOOLS}/confusion_matrix.py', tiny_setup['config'], results, str(tmp_path),
              '--score-thr', '0.0'])
    assert osp.getsize(tmp_path / 'confusion_matrix.png') > 1000
    matrix = np.loadtxt(tmp_path / 'confusion_matrix.txt', dtype=np.int64)
    assert matrix.shape == (3, 3)
    assert matrix[-1].sum() > 0  # 10 detections an image on 1-2 objects: false positives


def test_browse_dataset(tmp_path, tiny_setup, run_tool):
    run_tool([f'{TOOLS}/browse_dataset.py', tiny_setup['config'], '--output-dir', str(tmp_path),
              '--not-show', '--max-num', '3'])
    assert sorted(os.listdir(tmp_path)) == ['000.png', '001.png', '002.png']


def test_get_flops(tiny_setup, run_tool):
    tool, config = f'{TOOLS}/get_flops.py', tiny_setup['config']
    out = run_tool([tool, config, '--shape', '64', '64']).stdout
    assert 'Input shape: (64, 64)' in out and 'Flops: ' in out and 'Params: ' in out
    assert '(mean of 2 images)' in run_tool([tool, config, '--num-images', '2']).stdout


def test_op_flop_handle():
    """The handle counts 5 multiply-adds per channel and sampled point."""
    ops = pytest.importorskip('ops')
    if not ops.has_kernel('cpu'):
        pytest.skip('ops._C is not built')
    from mmengine.analysis import FlopAnalyzer
    bs, heads, dim, nq, levels, points = 2, 4, 8, 5, 2, 3
    shapes = torch.tensor([[4, 4], [2, 2]])
    starts = torch.tensor([0, 16])

    class Attend(torch.nn.Module):
        def forward(self, value, locations, weights):
            return torch.ops.ddetr.multi_scale_deformable_attn(value, shapes, starts, locations,
                                                               weights)

    inputs = (torch.rand(bs, 20, heads, dim), torch.rand(bs, nq, heads, levels, points, 2),
              torch.rand(bs, nq, heads, levels, points))
    flops = FlopAnalyzer(Attend(), inputs).set_op_handle(**FLOP_HANDLES)
    assert flops.total() == bs * nq * heads * levels * points * dim * 5


def test_benchmark(tiny_setup, baseline_run, run_tool):
    tool, config = f'{TOOLS}/benchmark.py', tiny_setup['config']
    checkpoint = osp.join(baseline_run, 'iter_8.pth')
    out = run_tool([tool, config, '--checkpoint', checkpoint, '--max-iter', '4',
                    '--num-warmup', '1', '--log-interval', '2']).stdout
    assert 'Overall fps' in out
    out = run_tool([tool, tiny_setup['ours'], '--checkpoint', checkpoint, '--max-iter', '3',
                    '--num-warmup', '1', '--amp', 'bf16']).stdout
    assert 'Overall fps' in out
    out = run_tool([tool, config, '--task', 'dataloader', '--max-iter', '3',
                    '--num-warmup', '1', '--log-interval', '1']).stdout
    assert 'batch/s' in out


def test_get_flops_counts_our_op(tiny_setup, run_tool):
    """With this project's model the deformable attention is one traced op."""
    pytest.importorskip('ops')
    out = run_tool([f'{TOOLS}/get_flops.py', tiny_setup['ours'], '--shape', '64', '64']).stdout
    assert 'Flops: ' in out
    counted, _, not_counted = out.partition('Not counted')
    # FlopAnalyzer lists an op by the last part of its name
    assert 'multi_scale_deformable_attn: ' in counted.split('Flops by operator')[-1]
    assert 'multi_scale_deformable_attn' not in not_counted


def test_benchmark_multi_scale_deformable_attn(run_tool):
    """The op benchmark's table on the CPU, at a smoke test's size."""
    out = run_tool([f'{TOOLS}/benchmark_multi_scale_deformable_attn.py', '--cases',
                    'enc-128x128-b1', '--min-time', '0', '--max-repeat', '1']).stdout
    rows = [line.split('|') for line in out.splitlines() if line.startswith('| enc-128x128-b1')]
    assert [row[3].strip() for row in rows] == ['ours', 'mmcv-pytorch'], out
    assert all(float(row[4]) > 0 and float(row[5]) > 0 for row in rows), out


def test_benchmark_model(run_tool):
    """Both models' training step and inference, with agreeing losses, at a tiny size."""
    out = run_tool([f'{TOOLS}/benchmark_model.py', '--size', '64', '--batch', '1',
                    '--repeat', '1', '--warmup', '0', '--threads', '1']).stdout
    assert '| training step (fwd + bwd)' in out and '| inference' in out, out
    diff = float(out.rsplit('max |loss difference| over 18 losses:', 1)[1].split()[0])
    # Loss differences of mmdet's and our model in float32 (the same bound as
    # test_mmdet_equivalence's losses, whose scale is O(1)): 1e-4.
    assert diff < 1e-4, out


def test_profile_training_splits_an_iteration(tmp_path, synthetic_set, run_tool):
    """The demo config's iteration in its phases, the detector's parts and a validation."""
    import re
    demo = 'configs/synthetic/deformable-detr-refine-twostage_r18_1xb8-synthetic.py'
    out = run_tool([f'{TOOLS}/profile_training.py', demo, '--iters', '2', '--warmup', '1',
                    '--work-dir', str(tmp_path), '--cfg-options',
                    f'train_dataloader.dataset.data_root={synthetic_set}',
                    f'val_dataloader.dataset.data_root={synthetic_set}',
                    f'val_evaluator.ann_file={synthetic_set}annotations/val.json',
                    'train_dataloader.batch_size=2', 'val_dataloader.batch_size=2']).stdout
    phases = dict(re.findall(r'\| (data|preprocess|forward \+ loss|backward|optimizer step) '
                             r'\| ([\d.]+) \|', out))
    assert len(phases) == 5 and all(float(v) > 0 for v in phases.values()), out
    parts = dict(re.findall(r'\| ([\w ()+]+) \| ([\d.]+) \|\n', out.split('| forward of |')[1]))
    assert {'backbone', 'neck', 'encoder', 'decoder', 'criterion (matching + loss)'} <= \
        set(parts), out
    assert all(float(v) > 0 for v in parts.values()), out
    assert '4 iterations an epoch' in out  # 8 images, batch 2
    assert re.search(r'validation: [\d.]+ s inference \(2 images\)', out), out
