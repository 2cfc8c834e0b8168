"""Faults of a distributed run: a preemption signal, a killed worker, a Slurm requeue.

2 gloo processes train the tiny config (dropout on, 8 iterations, checkpoints every 2)
with ``ddetr.PreemptionHook``. The reference is the same run uninterrupted. A signal
sent to one process from outside stops both after the same iteration with a saved
checkpoint; a worker SIGKILLed at an arbitrary moment makes torchrun restart both, which
resume by themselves; a preempted single-process run under ``tools/slurm_train.sh``
(a fake ``srun`` and ``scontrol`` on PATH) requeues its job. Each ends bit for bit as
its reference.
"""
import os
import os.path as osp
import random
import signal
import socket
import stat
import subprocess
import time
from typing import Dict, List

import pytest
import torch

from projects.deformable_detr.checkpoint import allow_mmengine_checkpoints
from projects.deformable_detr.engine.auto_resume import resume_if_restarted
from projects.deformable_detr.engine.hooks import PREEMPTED_EXIT_CODE, PreemptionHook

allow_mmengine_checkpoints()  # torch.load of Runner checkpoints, as the tools do

OPTIONS = ['train_dataloader.batch_size=1', 'train_cfg.max_iters=8',
           'env_cfg.dist_cfg.backend=gloo', 'train_cfg.val_interval=100',
           'model.encoder.layer_cfg.ffn_cfg.ffn_drop=0.1']
PREEMPTIBLE = '''
_base_ = './tiny_ddetr.py'
custom_imports = dict(imports=['tiny_hooks', 'projects.deformable_detr'],
                      allow_failed_imports=False)
custom_hooks = [dict(type='RecordHook'), dict(type='ddetr.PreemptionHook')]
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def preemptible(tiny_setup) -> str:
    path = osp.join(tiny_setup['tmp'], 'tiny_preemptible.py')
    with open(path, 'w') as f:
        f.write(PREEMPTIBLE)
    return path


def dist_command(config: str, work_dir: str, *extra: str) -> List[str]:
    return ['bash', 'tools/dist_train.sh', config, '2', '--work-dir', work_dir, *extra,
            '--cfg-options', *OPTIONS]


@pytest.fixture(scope='module')
def dist_whole(tmp_path_factory, preemptible, run_tool) -> str:
    work_dir = str(tmp_path_factory.mktemp('dist_whole'))
    run_tool(dist_command(preemptible, work_dir), env=dict(PORT=str(free_port())))
    return work_dir


def workers(work_dir: str) -> Dict[int, int]:
    """The pids of the training processes whose command line names ``work_dir``, by rank
    (their environment's ``RANK``, set by torchrun, or ``SLURM_PROCID``, by srun)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmd = f.read().split(b'\0')
            with open(f'/proc/{pid}/environ', 'rb') as f:
                env = dict(v.split(b'=', 1) for v in f.read().split(b'\0') if b'=' in v)
        except OSError:
            continue
        rank = env.get(b'RANK', env.get(b'SLURM_PROCID'))  # torchrun's, or srun's
        if any(c.endswith(b'train.py') for c in cmd) and \
                any(work_dir.encode() in c for c in cmd) and rank is not None:
            found[int(rank)] = int(pid)
    return found


def records(work_dir: str, rank: int) -> List[dict]:
    import json
    path = osp.join(work_dir, f'record_rank{rank}.jsonl')
    if not osp.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith('\n')]


def wait_until_iteration(work_dir: str, it: int, proc: subprocess.Popen, log: str,
                         seconds: float = 200) -> None:
    deadline = time.monotonic() + seconds
    while not any(r['iter'] >= it for r in records(work_dir, 0)):
        assert proc.poll() is None and time.monotonic() < deadline, \
            open(log).read()[-3000:]
        time.sleep(0.05)


def assert_same_weights(work_dir: str, expected_dir: str, name: str = 'iter_8.pth') -> None:
    final, expected = (torch.load(osp.join(d, name)) for d in (work_dir, expected_dir))
    assert final['meta']['iter'] == expected['meta']['iter']
    for key, value in expected['state_dict'].items():
        assert torch.equal(final['state_dict'][key], value), key
    for rank, state in enumerate(expected['meta']['rng_states']):
        assert torch.equal(final['meta']['rng_states'][rank]['torch'], state['torch'])


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_signal_to_one_process_stops_both_after_the_same_iteration(
        tmp_path, preemptible, dist_whole, run_tool, start_tool):
    work_dir, log = str(tmp_path / 'preempted'), str(tmp_path / 'preempted.log')
    port = str(free_port())
    proc = start_tool(dist_command(preemptible, work_dir), log=log, env=dict(PORT=port))
    try:
        wait_until_iteration(work_dir, 2, proc, log)
        time.sleep(random.uniform(0.0, 0.5))
        pids = workers(work_dir)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], signal.SIGUSR1)  # as srun's tasks each get Slurm's signal
        proc.wait(timeout=120)
    finally:
        stop(proc)
    out = open(log).read()
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    last = [max(r['iter'] for r in records(work_dir, rank)) for rank in (0, 1)]
    assert last[0] == last[1] < 8, last
    at = last[0]
    assert 'preempted by SIGUSR1' in out  # rank 1, which got it
    assert "preempted by another process's signal" in out  # rank 0
    saved = torch.load(osp.join(work_dir, f'iter_{at}.pth'))
    assert saved['meta']['iter'] == at and len(saved['meta']['rng_states']) == 2

    proc = run_tool(dist_command(preemptible, work_dir, '--resume'),
                    env=dict(PORT=str(free_port())))
    out = proc.stdout + proc.stderr
    assert f'resumed epoch: 0, iter: {at}' in out and 'resume is not exact' not in out
    assert_same_weights(work_dir, dist_whole)
    for rank in (0, 1):
        got = {r['iter']: r['loss'] for r in records(work_dir, rank)}
        expected = {r['iter']: r['loss'] for r in records(dist_whole, rank)}
        assert got == expected


def test_killed_worker_restarted_by_torchrun_resumes_by_itself(
        tmp_path, preemptible, dist_whole, start_tool):
    work_dir, log = str(tmp_path / 'restarted'), str(tmp_path / 'restarted.log')
    proc = start_tool(dist_command(preemptible, work_dir), log=log,
                      env=dict(PORT=str(free_port()), MAX_RESTARTS='1'))
    try:
        # At an arbitrary moment after the first checkpoint (iter_2.pth), with at
        # least one more to go.
        while not osp.exists(osp.join(work_dir, 'iter_2.pth')):
            assert proc.poll() is None, open(log).read()[-3000:]
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 1.0))
        pids = workers(work_dir)
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], signal.SIGKILL)
        proc.wait(timeout=200)
    finally:
        stop(proc)
    out = open(log).read()
    assert proc.returncode == 0, out[-3000:]
    assert 'TORCHELASTIC_RESTART_COUNT=1: a restarted run; resuming from' in out, out[-3000:]
    assert 'resume is not exact' not in out
    assert_same_weights(work_dir, dist_whole)
    for rank in (0, 1):
        got = {r['iter']: r['loss'] for r in records(work_dir, rank)}  # later lines win
        expected = {r['iter']: r['loss'] for r in records(dist_whole, rank)}
        assert got == expected


FAKE_SRUN = '''#!/usr/bin/env bash
# srun for one task on this machine: skips its options, runs the command.
while [[ "$1" == -* ]]; do
    if [ "$1" = -p ]; then shift; fi
    shift
done
export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0 SLURM_NODELIST=node-a
exec "$@"
'''
FAKE_SCONTROL = '''#!/usr/bin/env bash
echo "$@" >> "$SCONTROL_LOG"
if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; fi
'''


def fake_slurm(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    for name, text in (('srun', FAKE_SRUN), ('scontrol', FAKE_SCONTROL)):
        path = osp.join(folder, name)
        with open(path, 'w') as f:
            f.write(text)
        os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return folder


def test_slurm_train_requeues_a_preempted_job(tmp_path, preemptible, baseline_run,
                                             start_tool, run_tool):
    bin_dir = fake_slurm(str(tmp_path / 'bin'))
    work_dir, log = str(tmp_path / 'slurm'), str(tmp_path / 'slurm.log')
    scontrol_log = str(tmp_path / 'scontrol.log')
    env = dict(PATH=bin_dir + os.pathsep + os.environ['PATH'], GPUS='1', GPUS_PER_NODE='1',
               REQUEUE='1', SLURM_JOB_ID='4242', SCONTROL_LOG=scontrol_log,
               MASTER_PORT=str(free_port()))
    command = ['bash', 'tools/slurm_train.sh', 'part', 'job', preemptible, work_dir]
    proc = start_tool(command, log=log, env=env)
    try:
        wait_until_iteration(work_dir, 3, proc, log)
        os.kill(workers(work_dir)[0], signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        stop(proc)
    out = open(log).read()
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    with open(scontrol_log) as f:
        assert 'requeue 4242' in f.read().splitlines()
    at = max(r['iter'] for r in records(work_dir, 0))
    assert at < 8

    # The requeued job: the same command, SLURM_RESTART_COUNT set.
    env.update(SLURM_RESTART_COUNT='1', MASTER_PORT=str(free_port()))
    proc = run_tool(command, env=env)
    out = proc.stdout + proc.stderr
    assert 'SLURM_RESTART_COUNT=1: a restarted run; resuming from' in out, out[-3000:]
    assert f'resumed epoch: 0, iter: {at}' in out
    got = {r['iter']: r['loss'] for r in records(work_dir, 0)}
    expected = {r['iter']: r['loss'] for r in records(baseline_run, 0)}
    assert got == expected
    assert_same_weights(work_dir, baseline_run)


def test_restart_resumes_from_the_last_checkpoint_if_any(tmp_path, monkeypatch):
    from mmengine.config import Config
    cfg = Config(dict(work_dir=str(tmp_path), resume=False, load_from='init.pth'))
    monkeypatch.delenv('SLURM_RESTART_COUNT', raising=False)
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '0')
    assert not resume_if_restarted(cfg)  # the first launch
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '2')
    assert not resume_if_restarted(cfg) and cfg.load_from == 'init.pth'  # nothing saved yet
    (tmp_path / 'iter_4.pth').write_bytes(b'')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_4.pth'))
    assert resume_if_restarted(cfg)
    assert cfg.resume and cfg.load_from == str(tmp_path / 'iter_4.pth')


@pytest.mark.parametrize('name, why', [
    ('SIGKILL', 'can not be caught'), ('STOP', 'can not be caught'),
    ('SIGSEGV', 'Slurm does not stop jobs with it'), ('SIGFOO', 'no such signal'),
    (9, 'give a signal name')])
def test_a_signal_slurm_would_not_send_is_refused(name, why):
    with pytest.raises(ValueError, match=why):
        PreemptionHook(signals=[name])


def test_signal_names_short_or_full():
    hook = PreemptionHook(signals=('usr1', 'SIGTERM', 'USR2'))
    assert [s.name for s in hook.signals] == ['SIGUSR1', 'SIGTERM', 'SIGUSR2']
