"""tools/dist_train.sh / dist_test.sh on 2 CPU processes (gloo).

2 processes x batch 1 train as 1 process x batch 2; a process that fails ends the job.
"""
import os
import os.path as osp
import pickle
import signal
import socket
import subprocess
import time

import numpy as np
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_dist_train_matches_single_process(tmp_path, tiny_setup, baseline_run, run_tool,
                                           read_records):
    work_dir = str(tmp_path / 'dist')
    run_tool(['bash', 'tools/dist_train.sh', tiny_setup['config'], '2', '--work-dir', work_dir,
              '--cfg-options', 'train_dataloader.batch_size=1', 'train_cfg.max_iters=4',
              'env_cfg.dist_cfg.backend=gloo', 'train_cfg.val_interval=100'],
             env=dict(PORT=str(free_port())))
    ranks = [read_records(work_dir, rank) for rank in (0, 1)]
    single = read_records(baseline_run)  # 1 process x batch 2, same seed
    for it in range(1, 5):
        ids = [ranks[r][it]['img_ids'] for r in (0, 1)]
        assert all(len(i) == 1 for i in ids)
        # the two processes see different images, together the single process's batch
        assert ids[0] != ids[1]
        assert sorted(ids[0] + ids[1]) == sorted(single[it]['img_ids'])
        # DETR normalises its losses by the number of boxes over all processes, and DDP
        # averages the gradients: the mean of the ranks' losses is the single loss,
        # iteration after iteration (so the weights evolve alike too).
        # Two processes sum the per-image losses and DDP averages gradients in another
        # order than one process: float32 sums of a batch's terms in another order,
        # then a few iterations of AdamW amplifying them (1/sqrt(v) of small v): 1e-4.
        for key in ('loss', 'loss_cls', 'loss_bbox', 'loss_iou'):
            mean = (ranks[0][it][key] + ranks[1][it][key]) / 2
            np.testing.assert_allclose(mean, single[it][key], rtol=1e-4, err_msg=key)
        np.testing.assert_allclose(ranks[0][it]['grad_norm'], single[it]['grad_norm'],
                                   rtol=1e-4)
        assert ranks[0][it]['grad_norm'] == ranks[1][it]['grad_norm']
    assert osp.isfile(osp.join(work_dir, 'iter_4.pth'))


def test_dist_test_collects_all_predictions(tmp_path, tiny_setup, baseline_run, run_tool):
    out = str(tmp_path / 'results.pkl')
    proc = run_tool(['bash', 'tools/dist_test.sh', tiny_setup['config'],
                     osp.join(baseline_run, 'iter_8.pth'), '2', '--work-dir', str(tmp_path),
                     '--out', out], env=dict(PORT=str(free_port())))
    assert 'coco/bbox_mAP' in proc.stdout + proc.stderr
    with open(out, 'rb') as f:
        results = pickle.load(f)
    assert sorted(r['img_id'] for r in results) == list(range(1, 9))  # both ranks' halves


def test_a_failing_rank_ends_the_job_soon(tmp_path, tiny_setup, start_tool):
    """Rank 1 raises before iteration 3 while rank 0 goes on into the step's collectives.
    It also leaves a non-daemon thread running, as a stuck teardown would: left to the
    interpreter's exit it would hold the job until the 30-minute collective timeout."""
    log = tmp_path / 'dist.log'
    start = time.monotonic()
    proc = start_tool(['bash', 'tools/dist_train.sh', tiny_setup['config'], '2', '--work-dir',
                       str(tmp_path / 'dist'), '--cfg-options', 'train_dataloader.batch_size=1',
                       'train_cfg.max_iters=6', 'env_cfg.dist_cfg.backend=gloo',
                       'train_cfg.val_interval=100'], log=str(log),
                      env=dict(PORT=str(free_port()), RAISE_AT_ITER='3', RAISE_RANK='1',
                               RAISE_STUCK='1'))
    try:
        proc.wait(timeout=150)  # startup included; the failure itself ends it in seconds
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f'the job still ran {time.monotonic() - start:.0f} s after starting: '
                    + log.read_text()[-3000:])
    out = log.read_text()
    assert proc.returncode != 0
    assert '[rank1]: RuntimeError: injected failure on rank 1 at iteration 3' in out, out[-3000:]
    assert 'rank 1 failed: RuntimeError: injected failure' in out
    # torchrun's summary: the root cause is rank 1, with the exception (torch's record)
    summary = out[out.index('Root Cause'):]
    assert 'rank      : 1 (local_rank: 1)' in summary
    assert 'RuntimeError: injected failure on rank 1 at iteration 3' in summary
    with pytest.raises(ProcessLookupError):  # no process of the job is left
        os.killpg(proc.pid, 0)
