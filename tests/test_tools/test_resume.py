"""A training SIGKILLed mid-way resumes with ``--resume`` and ends as if never stopped.

The first tests use the tiny config of ``conftest.py`` (mmdet's model, no randomness
but the data order); the last ones, the shipped demo config with its random flips and
dropout, killed from outside at an arbitrary moment, and compare bit for bit.
"""
import os
import os.path as osp
import random
import signal
import socket
import time
from typing import List

import pytest
import torch

from projects.deformable_detr.checkpoint import allow_mmengine_checkpoints

allow_mmengine_checkpoints()  # torch.load of Runner checkpoints


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

    # bit for bit, as the README promises: same machine, same data order, same arithmetic
    records, expected = read_records(work_dir), read_records(baseline_run)
    assert sorted(records) == list(range(1, 9))
    for it in range(1, 9):
        assert records[it]['img_ids'] == expected[it]['img_ids']
        assert records[it]['loss'] == expected[it]['loss'], it
    final = torch.load(osp.join(work_dir, 'iter_8.pth'))
    final_baseline = torch.load(osp.join(baseline_run, 'iter_8.pth'))
    assert_bitwise_equal(final, final_baseline)
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
        assert records[it]['loss'] == expected[it]['loss'], it  # bit for bit
    assert_bitwise_equal(torch.load(osp.join(str(tmp_path), 'iter_8.pth')),
                         torch.load(osp.join(baseline_run, 'iter_8.pth')))


# --- the shipped demo config ------------------------------------------------------------
# Run as shipped, shrunk in size and schedule (8 training images of the synthetic set,
# batch 2: 4 iterations an epoch; 3 epochs or 10 iterations; checkpoints of every
# epoch, or every 3 iterations, which falls within epochs). The demo trains without
# dropout (0.0); three cases turn on the paper's 0.1, so that torch's generator is drawn
# from by the model too, not only by the random flips (numpy).
DEMO = 'configs/synthetic/deformable-detr-refine-twostage_r18_1xb8-synthetic.py'


def demo_options(data_root: str, loop: str, checkpoints: str, workers: int,
                 dropout: bool) -> List[str]:
    options = [
        f'train_dataloader.dataset.data_root={data_root}',
        f'val_dataloader.dataset.data_root={data_root}',
        f'val_evaluator.ann_file={data_root}annotations/val.json',
        'train_dataloader.batch_size=2', 'val_dataloader.batch_size=2',
        f'train_dataloader.num_workers={workers}',
        f'train_dataloader.persistent_workers={workers > 0}',
        'default_hooks.logger.interval=1', 'log_processor.window_size=1',
    ]
    if dropout:
        options += ['model.encoder.dropout=0.1', 'model.decoder.dropout=0.1']
    if loop == 'epoch':
        options += ['train_cfg.max_epochs=3']
    else:
        options += ['train_cfg._delete_=True', 'train_cfg.type=IterBasedTrainLoop',
                    'train_cfg.max_iters=10', 'train_cfg.val_interval=5',
                    'log_processor.by_epoch=False']
    if checkpoints == 'iteration':
        options += ['default_hooks.checkpoint.by_epoch=False',
                    'default_hooks.checkpoint.interval=3']
    return options


def last_checkpoint(work_dir: str) -> dict:
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return torch.load(f.read().strip())


def assert_bitwise_equal(resumed: dict, expected: dict) -> None:
    """Weights, optimizer state and the final RNG states, bit for bit."""
    assert resumed['meta']['iter'] == expected['meta']['iter']
    assert resumed['state_dict'].keys() == expected['state_dict'].keys()
    for name, value in expected['state_dict'].items():
        assert torch.equal(resumed['state_dict'][name], value), name
    states, expected_states = resumed['optimizer']['state'], expected['optimizer']['state']
    assert states.keys() == expected_states.keys()
    for key, state in expected_states.items():
        for field, value in state.items():
            assert torch.equal(states[key][field], value), (key, field)
    rng, expected_rng = resumed['meta']['rng_states'], expected['meta']['rng_states']
    assert len(rng) == len(expected_rng) == 1
    assert rng[0]['numpy'] == expected_rng[0]['numpy']
    assert rng[0]['random'] == expected_rng[0]['random']
    assert torch.equal(rng[0]['torch'], expected_rng[0]['torch'])


@pytest.mark.parametrize('loop, checkpoints, workers, dropout', [
    # the config as it is: the flips draw from the main process's numpy
    ('epoch', 'epoch', 0, False),
    # 2 persistent workers make the flips, and dropout draws from torch
    ('epoch', 'epoch', 2, True),
    # checkpoints within epochs: the resumed run skips the epoch's trained batches
    ('epoch', 'iteration', 0, True),
    # an iteration-based loop (MMEngine's advances its data loader itself)
    ('iter', 'iteration', 0, True),
])
def test_killed_demo_run_resumes_bitwise_equal(tmp_path, synthetic_set, run_tool, start_tool,
                                               loop, checkpoints, workers, dropout):
    options = demo_options(synthetic_set, loop, checkpoints, workers, dropout)
    whole, killed = str(tmp_path / 'whole'), str(tmp_path / 'killed')
    run_tool(['tools/train.py', DEMO, '--work-dir', whole, '--cfg-options', *options])
    expected = last_checkpoint(whole)

    # Killed at an arbitrary moment after its first checkpoint (in a save or a
    # validation, maybe), with at least half of the run left.
    first = osp.join(killed, 'epoch_1.pth' if checkpoints == 'epoch' else 'iter_3.pth')
    train = ['tools/train.py', DEMO, '--work-dir', killed, '--cfg-options', *options]
    proc = start_tool(train, log=str(tmp_path / 'killed.log'))
    deadline = time.monotonic() + 200
    while not osp.exists(first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    delay = random.uniform(0.0, 1.5)
    time.sleep(delay)
    assert proc.poll() is None, open(tmp_path / 'killed.log').read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at = last_checkpoint(killed)['meta']['iter']
    assert at < expected['meta']['iter']

    resumed = run_tool(train + ['--resume'])
    log = resumed.stdout + resumed.stderr
    assert f'iter: {at}' in log and 'resume is not exact' not in log, log[-3000:]
    try:
        assert_bitwise_equal(last_checkpoint(killed), expected)
    except AssertionError as err:
        raise AssertionError(f'killed {delay:.2f} s after {osp.basename(first)} appeared, '
                             f'resumed from iteration {at}: {err}') from err


def test_distributed_run_resumes_with_each_process_states(tmp_path, tiny_setup, run_tool,
                                                          read_records):
    """2 processes: every checkpoint holds both processes' RNG states, each restores its
    own, and the resumed run ends as the uninterrupted one (dropout on)."""
    options = ['--cfg-options', 'train_dataloader.batch_size=1', 'train_cfg.max_iters=4',
               'env_cfg.dist_cfg.backend=gloo', 'train_cfg.val_interval=100',
               'model.encoder.layer_cfg.ffn_cfg.ffn_drop=0.1']

    def dist_train(work_dir, *extra):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        return run_tool(['bash', 'tools/dist_train.sh', tiny_setup['config'], '2',
                         '--work-dir', work_dir, *extra, *options], env=dict(PORT=str(port)))

    whole, resumed = str(tmp_path / 'whole'), str(tmp_path / 'resumed')
    dist_train(whole)
    saved = torch.load(osp.join(whole, 'iter_2.pth'))['meta']['rng_states']
    assert len(saved) == 2
    proc = dist_train(resumed, '--resume', osp.join(whole, 'iter_2.pth'))
    out = proc.stdout + proc.stderr
    assert 'resumed epoch: 0, iter: 2' in out and 'resume is not exact' not in out
    final, expected = (torch.load(osp.join(d, 'iter_4.pth')) for d in (resumed, whole))
    for name, value in expected['state_dict'].items():
        assert torch.equal(final['state_dict'][name], value), name
    for rank in (0, 1):
        records, expected_records = read_records(resumed, rank), read_records(whole, rank)
        assert sorted(records) == [3, 4]
        for it in (3, 4):
            assert records[it]['loss'] == expected_records[it]['loss']
