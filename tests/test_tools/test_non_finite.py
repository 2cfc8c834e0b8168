"""A NaN in training, through tools/train.py: the run stops, or with the switch skips.

The demo's model (configs/synthetic, two-stage with box refinement, training BatchNorm)
on 8 synthetic images of tools/dataset_converters/synthetic_coco.py, batch 2: 4
iterations an epoch, 2 epochs. ``nan_hooks.InjectNaNHook`` puts a NaN pixel into the
batch's first image at the iterations of ``NAN_AT_ITERS``; ``nan_hooks.RecordStateHook``
records what every step changed (see tests/test_tools/nan_hooks.py).
"""
import json
import os
import os.path as osp
import re
import socket

import pytest
import torch

from projects.deformable_detr.checkpoint import allow_mmengine_checkpoints

allow_mmengine_checkpoints()  # torch.load of Runner checkpoints

HERE = osp.dirname(osp.abspath(__file__))
DEMO = osp.join(osp.dirname(osp.dirname(HERE)), 'configs', 'synthetic',
                'deformable-detr-refine-twostage_r18_1xb8-synthetic.py')
HOOKS = ("dict(type='InjectNaNHook'), dict(type='RecordStateHook'), "
         "dict(type='CollectiveInForwardHook')")
CONFIG = f'''_base_ = {DEMO!r}
custom_imports = dict(imports=['projects.deformable_detr', 'nan_hooks'],
                      allow_failed_imports=False)
custom_hooks = [{HOOKS}]
'''
# The switch, as docs/training.md gives it (the test hooks kept).
SKIP_CONFIG = f'''_base_ = './nan.py'
custom_hooks = [{HOOKS}, dict(type='ddetr.SkipNonFiniteHook')]
'''
ERROR = (r'NonFiniteError: iteration {it} \(epoch {epoch}\): non-finite loss terms '
         r'loss_cls=nan, loss_bbox=nan, loss_iou=nan, d0\.loss_cls=nan, .*enc_loss_iou=nan; '
         r'the first non-finite tensor: the input images: NaN in 1 of \d+ values, in images '
         r"\[0\] \(\['[^']+/train/\d+\.jpg'\]\)")


@pytest.fixture(scope='module')
def setup(tmp_path_factory, run_tool):
    """The data, the two configs, and the command line's start (train.py, tiny data)."""
    tmp = tmp_path_factory.mktemp('non_finite')
    data = str(tmp / 'data')
    run_tool(['tools/dataset_converters/synthetic_coco.py', '--out', data, '--num-train', '8',
              '--num-val', '2', '--no-validate'])
    (tmp / 'nan.py').write_text(CONFIG)
    (tmp / 'skip.py').write_text(SKIP_CONFIG)
    ann = osp.join(data, 'annotations', 'val.json')
    options = ['--cfg-options', f'train_dataloader.dataset.data_root={data}/',
               f'val_dataloader.dataset.data_root={data}/',
               f'test_dataloader.dataset.data_root={data}/', f'val_evaluator.ann_file={ann}',
               f'test_evaluator.ann_file={ann}', 'train_dataloader.batch_size=2',
               'train_cfg.max_epochs=2', 'train_cfg.val_interval=2',
               'default_hooks.logger.interval=1', 'log_processor.window_size=1']
    return dict(tmp=tmp, nan=str(tmp / 'nan.py'), skip=str(tmp / 'skip.py'), options=options)


def train(run_tool, setup, config, work_dir, *flags, options=(), nan_at=None, env=None,
          check=True, launcher=None):
    """tools/train.py (or dist_train.sh on ``launcher`` processes) with the test hooks:
    ``flags`` such as --amp, then the tiny data's --cfg-options and ``options``."""
    env = dict(env or {}, NAN_AT_ITERS=str(nan_at or ''))
    cmd = ['tools/train.py', config] if launcher is None else \
        ['bash', 'tools/dist_train.sh', config, str(launcher)]
    proc = run_tool(cmd + ['--work-dir', str(work_dir), *flags, *setup['options'], *options],
                    env=env, check=check, pythonpath=[HERE])
    proc.output = proc.stdout + proc.stderr
    return proc


def states(work_dir, rank=0):
    """RecordStateHook's lines by iteration."""
    with open(osp.join(work_dir, f'state_rank{rank}.jsonl')) as f:
        return {line['iter']: line for line in map(json.loads, f)}


def load_finite(path):
    """A checkpoint, after checking that its weights and optimizer state are finite."""
    ckpt = torch.load(path)
    for name, value in ckpt['state_dict'].items():
        assert not value.is_floating_point() or torch.isfinite(value).all(), name
    for state in ckpt['optimizer']['state'].values():
        for key, value in state.items():
            assert torch.isfinite(value).all(), key
    return ckpt


def test_nan_stops_the_run_and_the_last_checkpoint_resumes(setup, run_tool):
    work_dir = setup['tmp'] / 'stop'
    proc = train(run_tool, setup, setup['nan'], work_dir, nan_at=6, check=False)
    assert proc.returncode != 0
    assert re.search(ERROR.format(it=6, epoch=2), proc.stderr), proc.output[-3000:]
    # The run's log file says why it ended, with the traceback.
    (log, ) = work_dir.glob('2*/2*.log')
    assert re.search('the run failed: ' + ERROR.format(it=6, epoch=2), log.read_text()), \
        log.read_text()[-3000:]
    # Steps 1-5 finished, finite; step 6 never reached its update.
    records = states(work_dir)
    assert sorted(records) == [1, 2, 3, 4, 5] and all(r['finite'] for r in records.values())
    assert not osp.exists(work_dir / 'epoch_2.pth')
    assert (work_dir / 'last_checkpoint').read_text().strip().endswith('epoch_1.pth')
    ckpt = load_finite(work_dir / 'epoch_1.pth')
    assert (ckpt['meta']['epoch'], ckpt['meta']['iter']) == (1, 4)

    resumed = train(run_tool, setup, setup['nan'], work_dir, '--resume')  # no NaN now
    assert 'resumed epoch: 1, iter: 4' in resumed.output
    assert sorted(states(work_dir)) == list(range(1, 9))
    assert load_finite(work_dir / 'epoch_2.pth')['meta']['iter'] == 8


def test_skip_switch_skips_the_step_and_counts_it(setup, run_tool):
    work_dir = setup['tmp'] / 'skip'
    proc = train(run_tool, setup, setup['skip'], work_dir, nan_at=6)
    assert re.search('skipped training step \\(1 so far\\): ' + ERROR[len('NonFiniteError: '):]
                     .format(it=6, epoch=2), proc.output), proc.output[-3000:]
    assert '1 training steps skipped so far (non-finite losses)' in proc.output
    records = states(work_dir)
    assert sorted(records) == list(range(1, 9))
    assert all(r['finite'] for r in records.values())
    # The skipped step changed nothing: weights, BatchNorm statistics, AdamW's moments.
    assert (records[6]['params_diff'], records[6]['buffers_diff'],
            records[6]['optim_diff']) == (0, 0, 0)
    for it in (5, 7):  # the steps around it did train
        assert records[it]['params_diff'] > 0 and records[it]['buffers_diff'] > 0
        assert records[it]['optim_diff'] > 0
    ckpt = load_finite(work_dir / 'epoch_2.pth')
    steps = {float(s['step']) for s in ckpt['optimizer']['state'].values()}
    assert steps == {7.0}  # 8 iterations, 7 updates
    # The count in the log lines from the skip on (scalars.json), and in the checkpoint.
    run = next(d for d in os.listdir(work_dir) if osp.isdir(work_dir / d / 'vis_data'))
    with open(work_dir / run / 'vis_data' / 'scalars.json') as f:
        lines = [json.loads(line) for line in f]
    skips = {line['iter']: line.get('non_finite_skips') for line in lines if 'iter' in line}
    assert skips[5] is None and skips[7] == skips[8] == 1
    assert ckpt['message_hub']['log_scalars']['train/non_finite_skips'].current() == 1

    # Resumed for a third epoch, with another NaN: the count goes on.
    resumed = train(run_tool, setup, setup['skip'], work_dir, '--resume',
                    options=['train_cfg.max_epochs=3'], nan_at=10)
    assert 'skipped training step (2 so far): iteration 10 (epoch 3)' in resumed.output
    ckpt = load_finite(work_dir / 'epoch_3.pth')
    assert {float(s['step']) for s in ckpt['optimizer']['state'].values()} == {10.0}


def test_non_finite_loss_under_amp_stops_the_run(setup, run_tool):
    """--amp on the CPU (bfloat16 autocast): a NaN loss still stops the run."""
    work_dir = setup['tmp'] / 'amp'
    proc = train(run_tool, setup, setup['nan'], work_dir, '--amp', nan_at=2, check=False)
    assert proc.returncode != 0
    assert re.search(ERROR.format(it=2, epoch=1), proc.stderr), proc.output[-3000:]
    assert "type='CPUAmpOptimWrapper'" in (work_dir / 'nan.py').read_text()  # dumped config
    assert sorted(states(work_dir)) == [1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def dist_train(run_tool, setup, config, work_dir, **kwargs):
    """2 processes (gloo), batch 1 each, one epoch (4 iterations); a NaN at iteration 2
    in rank 1 only. Each forward pass holds a collective, as SyncBatchNorm's."""
    return train(run_tool, setup, config, work_dir, nan_at=2, launcher=2,
                 options=['train_dataloader.batch_size=1', 'train_cfg.max_epochs=1',
                          'env_cfg.dist_cfg.backend=gloo', 'env_cfg.dist_cfg.timeout=60'],
                 env=dict(kwargs.pop('env', {}), NAN_RANKS='1', PORT=str(free_port())),
                 **kwargs)


def test_processes_stop_together_with_their_errors(setup, run_tool):
    """An overflow inside rank 1's network: both processes stop at that step, naming the
    module of rank 1. Naming it takes a forward pass, with its collective: rank 0 runs
    one too (else rank 1 would wait on it, and die with a lost connection instead).

    Both ranks raise rank 1's cause, but torchrun stops the other as soon as one has
    exited, so only one report is certain to be printed."""
    work_dir = setup['tmp'] / 'dist_stop'
    proc = dist_train(run_tool, setup, setup['nan'], work_dir, env=dict(NAN_IN='neck'),
                      check=False)
    assert proc.returncode != 0
    assert re.search(r'NonFiniteError: iteration 2 \(epoch 1\): (another process met '
                     r'non-finite losses \| )?rank 1: non-finite loss terms loss_cls=nan, '
                     r'.*; the first non-finite tensor: the output of neck '
                     r'\(ChannelMapper\): ', proc.output), proc.output[-3000:]
    assert 'rank 0: non-finite' not in proc.output
    assert [sorted(states(work_dir, rank)) for rank in (0, 1)] == [[1], [1]]


def test_processes_skip_together(setup, run_tool):
    work_dir = setup['tmp'] / 'dist_skip'
    proc = dist_train(run_tool, setup, setup['skip'], work_dir)
    # (the log shows rank 0's warning; it learnt of rank 1's NaN from the all-reduce)
    assert 'skipped training step (1 so far): iteration 2 (epoch 1): another process ' \
        'met non-finite losses | rank 1: non-finite loss terms loss_cls=nan' in proc.output
    for rank in (0, 1):
        records = states(work_dir, rank)
        assert sorted(records) == [1, 2, 3, 4] and all(r['finite'] for r in records.values())
        assert (records[2]['params_diff'], records[2]['optim_diff']) == (0, 0)
        assert records[3]['params_diff'] > 0
