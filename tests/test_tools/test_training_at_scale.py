"""The demo trained with EMA, iteration checkpoints and preemption, then stopped.

One uninterrupted run of the "at-scale" demo config (EMA, dropout 0.1, activation
checkpointing; 2 epochs of 4 iterations, an iteration checkpoint every 2 iterations, the
last 2 kept) is the reference. A run SIGKILLed at an arbitrary moment and resumed, and
a run preempted by SIGTERM (sent again and again until it exits) and resumed, each end
bit for bit as the reference, EMA weights included. The reference's EMA checkpoint is
then tested, fine-tuned from and converted.
"""
import os
import os.path as osp
import pickle
import random
import signal
import subprocess
import time

import pytest
import torch

from projects.deformable_detr.checkpoint import allow_mmengine_checkpoints
from projects.deformable_detr.checkpoint.ema import pick_weights
from projects.deformable_detr.engine.hooks import PREEMPTED_EXIT_CODE

from test_resume import assert_bitwise_equal, demo_options, last_checkpoint

allow_mmengine_checkpoints()  # torch.load of Runner checkpoints, as the tools do

AT_SCALE = 'configs/synthetic/deformable-detr-refine-twostage_r18_1xb8-synthetic-at-scale.py'
DEMO = 'configs/synthetic/deformable-detr-refine-twostage_r18_1xb8-synthetic.py'


def options(data_root: str):
    return demo_options(data_root, 'epoch', 'epoch', 0, True) + [
        'train_cfg.max_epochs=2', 'default_hooks.checkpoint.iter_interval=2',
        'default_hooks.checkpoint.max_keep_iter_ckpts=2']


@pytest.fixture(scope='module')
def whole_run(tmp_path_factory, synthetic_set, run_tool) -> str:
    work_dir = str(tmp_path_factory.mktemp('at_scale_whole'))
    run_tool(['tools/train.py', AT_SCALE, '--work-dir', work_dir, '--cfg-options',
              *options(synthetic_set)])
    return work_dir


def assert_ema_equal(resumed: dict, expected: dict) -> None:
    ema, expected_ema = resumed['ema_state_dict'], expected['ema_state_dict']
    assert ema.keys() == expected_ema.keys()
    for name, value in expected_ema.items():
        assert torch.equal(ema[name], value), name


def wait_for(path: str, proc: subprocess.Popen, log: str, seconds: float = 200) -> None:
    deadline = time.monotonic() + seconds
    while not osp.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, open(log).read()[-3000:]


def start_after_first_checkpoint(work_dir, data_root: str, start_tool):
    """Starts the at-scale training into ``work_dir`` and returns, once its first
    iteration checkpoint exists, its command line, work dir, log and process."""
    work_dir = str(work_dir)
    train = ['tools/train.py', AT_SCALE, '--work-dir', work_dir, '--cfg-options',
             *options(data_root)]
    log = work_dir + '.log'
    proc = start_tool(train, log=log)
    wait_for(osp.join(work_dir, 'iter_2.pth'), proc, log)
    return train, work_dir, log, proc


def resume_ends_as(expected: dict, train: list, work_dir: str, at: int, run_tool) -> None:
    """``--resume`` continues from iteration ``at`` and ends bit for bit as ``expected``
    (weights, optimizer, RNG states and both EMA sets)."""
    resumed = run_tool(train + ['--resume'])
    out = resumed.stdout + resumed.stderr
    assert f'iter: {at}' in out and 'resume is not exact' not in out, out[-3000:]
    final = last_checkpoint(work_dir)
    assert_bitwise_equal(final, expected)
    assert_ema_equal(final, expected)


def test_iteration_checkpoints_last_two_kept_beside_epoch_checkpoints(whole_run):
    files = sorted(f for f in os.listdir(whole_run) if f.endswith('.pth'))
    # 8 iterations: iter_2, 4, 6, 8 saved, the last 2 kept; epochs as the demo keeps
    # them (max_keep_ckpts=1, and the best).
    assert [f for f in files if f.startswith('iter_')] == ['iter_6.pth', 'iter_8.pth']
    assert 'epoch_2.pth' in files and 'epoch_1.pth' not in files
    mid = torch.load(osp.join(whole_run, 'iter_6.pth'))
    assert mid['meta']['iter'] == 6 and mid['meta']['epoch'] == 1  # within the 2nd epoch
    assert mid['meta']['data_position'] == dict(epoch=1, batches=2)
    final = last_checkpoint(whole_run)
    assert final['meta']['iter'] == 8
    # EMA: both weight sets, and they differ (the average lags the training weights).
    ema, raw = pick_weights(final, 'ema'), pick_weights(final, 'raw')
    assert ema.keys() == raw.keys() and 'steps' in final['ema_state_dict']
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if ema[k].is_floating_point())


def test_sigkill_and_resume_with_ema_bitwise_equal(tmp_path, whole_run, synthetic_set,
                                                   run_tool, start_tool):
    train, work_dir, log, proc = start_after_first_checkpoint(tmp_path / 'killed',
                                                              synthetic_set, start_tool)
    time.sleep(random.uniform(0.0, 1.5))
    assert proc.poll() is None, open(log).read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at = last_checkpoint(work_dir)['meta']['iter']
    assert at < 8

    resume_ends_as(last_checkpoint(whole_run), train, work_dir, at, run_tool)


def test_preempted_run_saves_exits_75_and_resumes_bitwise_equal(
        tmp_path, whole_run, synthetic_set, run_tool, start_tool):
    """SIGTERM at an arbitrary moment, then again every 20 ms until the process has
    exited: the later ones arrive while the checkpoint is written."""
    train, work_dir, log, proc = start_after_first_checkpoint(tmp_path / 'preempted',
                                                              synthetic_set, start_tool)
    time.sleep(random.uniform(0.0, 1.0))
    signals = 0
    while proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)  # the Python process itself (nice execs it)
        signals += 1
        time.sleep(0.02)
    out = open(log).read()
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert signals > 1
    at = last_checkpoint(work_dir)['meta']['iter']
    assert 2 <= at < 8
    assert f'preempted by SIGTERM: stopped after iteration {at} and saved' in out, out[-3000:]
    assert osp.basename(open(osp.join(work_dir, 'last_checkpoint')).read()) == \
        f'iter_{at}.pth'

    resume_ends_as(last_checkpoint(whole_run), train, work_dir, at, run_tool)


def predictions(path: str) -> list:
    with open(path, 'rb') as f:
        return [(r['img_id'], r['pred_instances']['scores'], r['pred_instances']['bboxes'])
                for r in pickle.load(f)]


def test_tools_test_evaluates_the_ema_weights(tmp_path, whole_run, synthetic_set, run_tool):
    """test.py of the EMA checkpoint predicts what a checkpoint of its EMA weights alone
    predicts, and not what its training weights predict."""
    root = synthetic_set
    data = [f'val_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}',
            f'val_evaluator.ann_file={root}annotations/val.json',
            f'test_evaluator.ann_file={root}annotations/val.json']
    checkpoint = last_checkpoint(whole_run)
    for weights in ('ema', 'raw'):
        torch.save(dict(state_dict=pick_weights(checkpoint, weights)),
                   str(tmp_path / f'{weights}.pth'))
    runs = {'checkpoint': (AT_SCALE, osp.join(whole_run, 'epoch_2.pth')),
            'ema': (DEMO, str(tmp_path / 'ema.pth')), 'raw': (DEMO, str(tmp_path / 'raw.pth'))}
    got = {}
    for name, (config, path) in runs.items():
        out = str(tmp_path / f'{name}.pkl')
        run_tool(['tools/test.py', config, path, '--work-dir', str(tmp_path / name), '--out',
                  out, '--cfg-options', *data])
        got[name] = predictions(out)
    for (i, s, b), (j, t, c) in zip(got['checkpoint'], got['ema']):
        assert i == j and torch.equal(s, t) and torch.equal(b, c)
    assert any(not torch.equal(s, t) for (_, s, _), (_, t, _) in zip(got['checkpoint'],
                                                                     got['raw']))


def test_fine_tuning_loads_either_weight_set(whole_run, build_runner_for_demo):
    from projects.deformable_detr.engine.hooks import FineTuneHook
    checkpoint = last_checkpoint(whole_run)
    for weights in ('ema', 'raw', None):
        loaded = dict(checkpoint, state_dict=dict(checkpoint['state_dict']))
        runner = build_runner_for_demo()
        FineTuneHook(weights=weights).after_load_checkpoint(runner, loaded)
        expected = pick_weights(checkpoint, weights or 'ema')
        assert loaded['state_dict'].keys() == expected.keys()
        assert all(loaded['state_dict'][k] is expected[k] for k in expected)
        runner.model.load_state_dict(loaded['state_dict'], strict=True)


@pytest.fixture
def build_runner_for_demo():
    import types

    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    def build():
        init_default_scope('mmdet')
        model = MODELS.build(Config.fromfile(DEMO).model)
        model.init_weights()
        return types.SimpleNamespace(model=model, _resume=False, _load_from='x.pth')
    return build
