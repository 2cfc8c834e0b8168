"""A training SIGKILLed mid-way resumes with ``--resume`` and ends as if never stopped."""
import os.path as osp
import signal

import numpy as np
import torch

import projects.deformable_detr.safe_checkpoint  # noqa: F401  (torch.load of Runner checkpoints)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tiny_setup, baseline_run,
                                                       run_tool, read_records, last_metrics):
    work_dir = str(tmp_path)
    train = ['tools/train.py', tiny_setup['config'], '--work-dir', work_dir]
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

    records, expected = read_records(work_dir), read_records(baseline_run)
    assert sorted(records) == list(range(1, 9))
    for it in range(1, 9):
        assert records[it]['img_ids'] == expected[it]['img_ids']
        np.testing.assert_allclose(records[it]['loss'], expected[it]['loss'], rtol=1e-5)
    final = torch.load(osp.join(work_dir, 'iter_8.pth'))
    final_baseline = torch.load(osp.join(baseline_run, 'iter_8.pth'))
    assert final['meta']['iter'] == 8
    for name, expected_value in final_baseline['state_dict'].items():
        torch.testing.assert_close(final['state_dict'][name], expected_value, rtol=1e-5,
                                   atol=1e-6, msg=name)
    metrics, metrics_baseline = last_metrics(work_dir), last_metrics(baseline_run)
    for key, value in metrics_baseline.items():
        if key.startswith('coco/'):
            assert metrics[key] == value, key


def test_resume_from_explicit_checkpoint(tmp_path, tiny_setup, baseline_run, run_tool,
                                         read_records):
    """``--resume PATH`` continues from that checkpoint, in another work dir."""
    proc = run_tool(['tools/train.py', tiny_setup['config'], '--work-dir', str(tmp_path),
                     '--resume', osp.join(baseline_run, 'iter_6.pth'),
                     '--cfg-options', 'train_cfg.val_interval=100'])
    assert 'resumed epoch: 0, iter: 6' in proc.stdout + proc.stderr
    records, expected = read_records(str(tmp_path)), read_records(baseline_run)
    assert sorted(records) == [7, 8]
    for it in (7, 8):
        np.testing.assert_allclose(records[it]['loss'], expected[it]['loss'], rtol=1e-5)
