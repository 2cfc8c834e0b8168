"""Smoke tests of tools/analysis_tools on the tiny run, in this process (runpy)."""
import os
import os.path as osp
import runpy
import sys
from typing import List

import numpy as np
import pytest
import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from test_train_test import (ROOT, prediction_run, reference_run,  # noqa: E402
                             tiny_setup)

TOOLS = osp.join(ROOT, 'tools', 'analysis_tools')


def run_main(tool: str, argv: List[str], monkeypatch) -> None:
    """Runs tools/analysis_tools/TOOL.py as ``__main__`` with ``argv``."""
    monkeypatch.setattr(sys, 'argv', [tool] + argv)
    runpy.run_path(osp.join(TOOLS, tool), run_name='__main__')


def json_log(work_dir: str) -> str:
    run = sorted(d for d in os.listdir(work_dir)
                 if osp.isfile(osp.join(work_dir, d, 'vis_data', 'scalars.json')))[-1]
    return osp.join(work_dir, run, 'vis_data', f'{run}.json')


def test_analyze_logs(tmp_path, monkeypatch, capsys):
    log = json_log(reference_run())
    out = str(tmp_path / 'curves.png')
    run_main('analyze_logs.py', ['plot_curve', log, log, '--keys', 'loss', 'coco/bbox_mAP',
                                 '--legend', 'a', 'b', '--out', out], monkeypatch)
    assert osp.getsize(out) > 1000
    run_main('analyze_logs.py', ['cal_train_time', log], monkeypatch)
    assert 'average iter time' in capsys.readouterr().out
    with pytest.raises(KeyError, match='no log has the key'):
        run_main('analyze_logs.py', ['plot_curve', log, '--keys', 'nope', '--out', out],
                 monkeypatch)


def test_confusion_matrix_counts():
    module = runpy.run_path(osp.join(TOOLS, 'confusion_matrix.py'), run_name='cm')
    matrix = np.zeros((3, 3), dtype=np.int64)  # 2 classes + background
    gt_bboxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32)
    gt_labels = np.array([0, 1, 1])
    bboxes = np.array([[0, 0, 10, 10],      # class 0 on the class-0 box: right
                       [20, 20, 30, 31],    # class 0 on a class-1 box: confused
                       [60, 60, 70, 70],    # nothing there: false positive (class 1)
                       [40, 40, 50, 50]],   # below the score threshold: ignored
                      np.float32)
    module['image_confusion'](matrix, gt_bboxes, gt_labels, bboxes,
                              np.array([0.9, 0.8, 0.7, 0.1]), np.array([0, 0, 1, 1]),
                              score_thr=0.3, tp_iou_thr=0.5)
    np.testing.assert_array_equal(matrix, [[1, 0, 0],    # gt 0 -> pred 0
                                           [1, 0, 1],    # gt 1 -> pred 0, gt 1 missed
                                           [1, 1, 0]])   # false positives of 0 and 1


def test_confusion_matrix_tool(tmp_path, monkeypatch):
    results = osp.join(prediction_run(), 'results.pkl')
    run_main('confusion_matrix.py', [tiny_setup()['config'], results, str(tmp_path),
                                     '--score-thr', '0.0'], monkeypatch)
    assert osp.getsize(tmp_path / 'confusion_matrix.png') > 1000
    matrix = np.loadtxt(tmp_path / 'confusion_matrix.txt', dtype=np.int64)
    assert matrix.shape == (3, 3)
    assert matrix[-1].sum() > 0  # 10 detections an image on 1-2 objects: false positives


def test_browse_dataset(tmp_path, monkeypatch):
    run_main('browse_dataset.py', [tiny_setup()['config'], '--output-dir', str(tmp_path),
                                   '--not-show', '--max-num', '3'], monkeypatch)
    assert sorted(os.listdir(tmp_path)) == ['000.png', '001.png', '002.png']


def test_get_flops(monkeypatch, capfd):
    config = tiny_setup()['config']
    run_main('get_flops.py', [config, '--shape', '64', '64'], monkeypatch)
    out = capfd.readouterr().out
    assert 'Input shape: (64, 64)' in out and 'Flops: ' in out and 'Params: ' in out
    run_main('get_flops.py', [config, '--num-images', '2'], monkeypatch)
    assert '(mean of 2 images)' in capfd.readouterr().out


def test_op_flop_handle():
    """The handle counts 5 multiply-adds per channel and sampled point."""
    ops = pytest.importorskip('ops')
    if not ops.has_kernel('cpu'):
        pytest.skip('ops._C is not built')
    from mmengine.analysis import FlopAnalyzer
    handles = runpy.run_path(osp.join(TOOLS, 'get_flops.py'), run_name='flops')['HANDLES']
    bs, heads, dim, nq, levels, points = 2, 4, 8, 5, 2, 3
    shapes = torch.tensor([[4, 4], [2, 2]])
    starts = torch.tensor([0, 16])

    class Attend(torch.nn.Module):
        def forward(self, value, locations, weights):
            return torch.ops.ddetr.multi_scale_deformable_attn(value, shapes, starts, locations, weights)

    inputs = (torch.rand(bs, 20, heads, dim), torch.rand(bs, nq, heads, levels, points, 2),
              torch.rand(bs, nq, heads, levels, points))
    flops = FlopAnalyzer(Attend(), inputs).set_op_handle(**handles)
    assert flops.total() == bs * nq * heads * levels * points * dim * 5


def test_benchmark(monkeypatch, capfd):
    checkpoint = osp.join(reference_run(), 'iter_8.pth')
    config = tiny_setup()['config']
    run_main('benchmark.py', [config, '--checkpoint', checkpoint, '--max-iter', '4',
                              '--num-warmup', '1', '--log-interval', '2'], monkeypatch)
    assert 'Overall fps' in capfd.readouterr().out
    run_main('benchmark.py', [config, '--task', 'dataloader', '--max-iter', '3',
                              '--num-warmup', '1', '--log-interval', '1'], monkeypatch)
    assert 'batch/s' in capfd.readouterr().out


def test_get_flops_counts_our_op(monkeypatch, capfd):
    """With this project's model the deformable attention is one traced ddetr::multi_scale_deformable_attn."""
    pytest.importorskip('ops')
    run_main('get_flops.py', [tiny_setup()['ours'], '--shape', '64', '64'], monkeypatch)
    out = capfd.readouterr().out
    assert 'Flops: ' in out
    assert 'forward: ' in out  # FlopAnalyzer names ddetr::multi_scale_deformable_attn by its op name
    assert 'ddetr::multi_scale_deformable_attn' not in out.split('Not counted')[-1]
