"""tools/train.py then tools/test.py: this project's model learns the tiny set, and the test
tool reports the mAP the training's validation did.

The bar: the tiny config with this project's model (``tiny_ours.py``), 120 iterations at
a constant lr of 1e-3, evaluated on its own 8 training images. Measured on the 2-core
development machine (``tools/train.py tiny_ours.py --cfg-options train_cfg.max_iters=120
"param_scheduler=[]" randomness.seed=S``): mAP 0.279 (seed 0) and 0.296 (seed 1); mmdet's
model in the same config gave 0.270, 0.225 and 0.331 (seeds 0, 1, 2). After 60 iterations
it is 0.10 to 0.13, after 8 about 0. A bar of 0.1, under half the lowest of the five runs
at 120 iterations, leaves room for the seed and for other CPUs' rounding, and still fails
a model or an evaluation that does not work.
"""
import os.path as osp
import re

MIN_MAP = 0.1
ITERS = 120


def test_the_tiny_model_learns_and_tests(tmp_path, tiny_setup, run_tool, last_metrics):
    work_dir = str(tmp_path / 'train')
    run_tool(['tools/train.py', tiny_setup['ours'], '--work-dir', work_dir, '--cfg-options',
              f'train_cfg.max_iters={ITERS}', f'train_cfg.val_interval={ITERS}',
              f'default_hooks.checkpoint.interval={ITERS}', 'default_hooks.logger.interval=20',
              'param_scheduler=[]'])
    trained = last_metrics(work_dir)['coco/bbox_mAP']
    assert trained >= MIN_MAP, trained
    proc = run_tool(['tools/test.py', tiny_setup['ours'], osp.join(work_dir, f'iter_{ITERS}.pth'),
                     '--work-dir', str(tmp_path / 'test')])
    tested = re.findall(r'coco/bbox_mAP: ([0-9.]+)', proc.stdout + proc.stderr)
    assert tested and float(tested[-1]) == trained, (tested, trained)
