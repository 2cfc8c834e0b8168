"""The demo's picture tools: the convergence plot and the predictions grid."""
import json
import os
import pickle

import numpy as np
import pytest

pytest.importorskip('matplotlib')


def _fake_run(work_dir: str, maps: list, iters_per_epoch: int = 10) -> None:
    """An MMEngine-like scalars.json: training lines every 5 iterations (6 s an
    iteration: a minute an epoch), validation after each epoch."""
    path = os.path.join(work_dir, '20260101_000000', 'vis_data')
    os.makedirs(path)
    with open(os.path.join(path, 'scalars.json'), 'w') as f:
        it = 0
        for epoch, m in enumerate(maps, 1):
            for _ in range(iters_per_epoch // 5):
                it += 5
                f.write(json.dumps(dict(loss=10.0 / epoch, epoch=epoch, iter=it, step=it,
                                        time=6.0)) + '\n')
            f.write(json.dumps({'coco/bbox_mAP': m, 'step': epoch}) + '\n')


def test_plot_convergence(tmp_path, run_tool):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    _fake_run(a, [0.1, 0.3, 0.5])
    _fake_run(b, [0.0, 0.01, 0.02])
    out = str(tmp_path / 'curve.png')
    proc = run_tool(['tools/analysis_tools/plot_convergence.py', a, b, '--labels', 'ours',
                     'detr', '--out', out])
    # the metric of each epoch, and the training time up to it: 10 iterations x 6 s
    assert 'ours: ep1 0.100 (1.0 min), ep2 0.300 (2.0 min), ep3 0.500 (3.0 min)' in proc.stdout
    assert 'detr: ep1 0.000 (1.0 min), ep2 0.010 (2.0 min), ep3 0.020 (3.0 min)' in proc.stdout
    assert os.path.getsize(out) > 1000


def test_draw_predictions(tmp_path, run_tool):
    from PIL import Image
    img_path = str(tmp_path / '000001.jpg')
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(img_path)
    results = [dict(img_id=1, img_path=img_path, pred_instances=dict(
        bboxes=np.array([[4., 4., 30., 30.], [10., 10., 20., 20.]]),
        scores=np.array([0.9, 0.1]), labels=np.array([0, 1])))]
    with open(tmp_path / 'results.pkl', 'wb') as f:
        pickle.dump(results, f)
    ann = dict(images=[dict(id=1, file_name='000001.jpg', width=64, height=64)],
               annotations=[dict(id=1, image_id=1, category_id=1, bbox=[4, 4, 26, 26])],
               categories=[dict(id=1, name='circle'), dict(id=2, name='square')])
    with open(tmp_path / 'val.json', 'w') as f:
        json.dump(ann, f)
    out = str(tmp_path / 'grid.png')
    run_tool(['tools/analysis_tools/draw_predictions.py', str(tmp_path / 'results.pkl'),
              str(tmp_path / 'val.json'), '--out', out, '--scale', '2'])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (128, 128, 3)
    assert (grid != 128).any()  # something was drawn
