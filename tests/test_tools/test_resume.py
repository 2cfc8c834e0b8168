"""A training SIGKILLed mid-way resumes with ``--resume`` and ends as if never stopped."""
import os.path as osp
import signal
import sys

import numpy as np
import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from test_train_test import (last_metrics, read_records, reference_run,  # noqa: E402
                             run_tool, tiny_setup)

import projects.deformable_detr.safe_checkpoint  # noqa: E402,F401


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    setup = tiny_setup()
    work_dir = str(tmp_path)
    train = ['tools/train.py', setup['config'], '--work-dir', work_dir]
    # Checkpoints every 2 iterations; killed after iteration 5, in the middle of the
    # second pass over the 4-batch data set, so the last checkpoint is iter_4.
    killed = run_tool(train, env=dict(KILL_AT_ITER='5'), check=False)
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.stderr[-2000:]
    assert not osp.exists(osp.join(work_dir, 'iter_6.pth'))
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        assert f.read().strip().endswith('iter_4.pth')
    assert max(read_records(work_dir)) == 5

    resumed = run_tool(train + ['--resume'])  # no path: the latest in the work dir
    assert 'resumed epoch: 0, iter: 4' in resumed.stdout + resumed.stderr

    reference = reference_run()
    records, expected = read_records(work_dir), read_records(reference)
    assert sorted(records) == list(range(1, 9))
    for it in range(1, 9):
        assert records[it]['img_ids'] == expected[it]['img_ids']
        np.testing.assert_allclose(records[it]['loss'], expected[it]['loss'], rtol=1e-5)
    final = torch.load(osp.join(work_dir, 'iter_8.pth'))
    final_ref = torch.load(osp.join(reference, 'iter_8.pth'))
    assert final['meta']['iter'] == 8
    for name, ref in final_ref['state_dict'].items():
        torch.testing.assert_close(final['state_dict'][name], ref, rtol=1e-5, atol=1e-6,
                                   msg=name)
    metrics, metrics_ref = last_metrics(work_dir), last_metrics(reference)
    for key, value in metrics_ref.items():
        if key.startswith('coco/'):
            assert metrics[key] == value, key


def test_resume_from_explicit_checkpoint(tmp_path):
    """``--resume PATH`` continues from that checkpoint, in another work dir."""
    setup, reference = tiny_setup(), reference_run()
    proc = run_tool(['tools/train.py', setup['config'], '--work-dir', str(tmp_path),
                     '--resume', osp.join(reference, 'iter_6.pth'),
                     '--cfg-options', 'train_cfg.val_interval=100'])
    assert 'resumed epoch: 0, iter: 6' in proc.stdout + proc.stderr
    records, expected = read_records(str(tmp_path)), read_records(reference)
    assert sorted(records) == [7, 8]
    for it in (7, 8):
        np.testing.assert_allclose(records[it]['loss'], expected[it]['loss'], rtol=1e-5)
