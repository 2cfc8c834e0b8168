"""Automatic resume of a restarted run.

torchrun restarts the processes of a job when one fails (``--max-restarts``, set by
``MAX_RESTARTS`` in ``tools/dist_train.sh``); Slurm reruns a requeued job's script. Both
run the same command line again, and say so in the environment:
``TORCHELASTIC_RESTART_COUNT`` and ``SLURM_RESTART_COUNT`` count the restarts. A
restarted run then resumes by itself, as ``--resume`` without a path does: from the
checkpoint named in the work dir's ``last_checkpoint`` (written only once the checkpoint
is complete); if there is none yet, it starts as the first launch did.

A restarted process of torchrun's fixed (static) rendezvous also joins its process group
through :func:`join_restarted_group`: that rendezvous keeps one key-value store for all
attempts (torch 2.13), so that the restarted processes would otherwise read the
addresses that the processes of the failed attempt published, and fail to connect
("Gloo connectFullMesh failed ... Connection refused").
"""
import datetime
import os
from typing import Optional, Tuple

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import find_latest_checkpoint

RESTART_COUNTS = ('TORCHELASTIC_RESTART_COUNT', 'SLURM_RESTART_COUNT')


def restart() -> Optional[Tuple[str, int]]:
    """The variable and count of a restart of this run by torchrun or Slurm, or None."""
    for name in RESTART_COUNTS:
        value = os.environ.get(name, '').strip()
        if value.isdigit() and int(value) > 0:
            return name, int(value)
    return None


def resume_if_restarted(cfg: Config) -> bool:
    """Sets ``cfg`` to resume from the work dir's latest checkpoint if this is a restart.

    A run told to resume already (``cfg.resume``) is left as it is; so is a restart
    that finds no checkpoint yet (it starts as the first launch did, from ``load_from``
    if the config names one). Returns whether it set the resume.
    """
    restarted = restart()
    if restarted is None or cfg.get('resume'):
        return False
    latest = find_latest_checkpoint(cfg.work_dir)
    if latest is None:
        print_log(f'{restarted[0]}={restarted[1]}: a restarted run, but {cfg.work_dir} '
                  'holds no checkpoint yet: starting from the beginning', logger='current')
        return False
    cfg.resume, cfg.load_from = True, latest
    print_log(f'{restarted[0]}={restarted[1]}: a restarted run; resuming from {latest}',
              logger='current')
    return True


def join_restarted_group(dist_cfg: dict) -> bool:
    """Initialises the process group of a process that torchrun restarted, through the
    agent's store with a prefix of its own attempt. Returns False (and does nothing)
    for a first attempt, or where the process group is initialised already.

    Args:
        dist_cfg: ``env_cfg.dist_cfg``: ``backend`` (default nccl; gloo without CUDA),
            ``timeout`` (seconds or a timedelta) and other ``init_process_group``
            arguments.
    """
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
    if attempt in ('', '0') or os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True' or \
            torch.distributed.is_initialized():
        return False
    args = dict(dist_cfg)
    args.pop('init_backend', None)
    args.setdefault('backend', 'nccl')
    if not torch.cuda.is_available():  # as setup_cpu_distributed does
        args['backend'] = 'gloo'
    timeout = args.pop('timeout', datetime.timedelta(minutes=30))
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=timeout)
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    store = torch.distributed.TCPStore(os.environ['MASTER_ADDR'],
                                       int(os.environ['MASTER_PORT']), world,
                                       is_master=False, timeout=timeout)
    store = torch.distributed.PrefixStore(f'ddetr/attempt_{attempt}', store)
    torch.distributed.init_process_group(store=store, rank=rank, world_size=world,
                                         timeout=timeout, **args)
    return True
