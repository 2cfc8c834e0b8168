"""Launch helpers of ``tools/train.py`` and ``tools/test.py``.

- :func:`setup_cpu_distributed`: ``--launcher pytorch`` or ``slurm`` without CUDA (gloo);
- :func:`close_distributed`: tears the process group down before the process exits;
- :func:`run_main`: runs a tool's ``main`` so that a failing process ends the whole job,
  and a preempted run exits with ``PREEMPTED_EXIT_CODE``.
"""
import datetime
import logging
import os
import subprocess
import sys
from typing import Callable

import torch
from mmengine.config import Config
from mmengine.logging import MMLogger, print_log
from torch.distributed.elastic.multiprocessing.errors import record

from .hooks import PREEMPTED_EXIT_CODE, Preempted


def setup_cpu_distributed(cfg: Config) -> None:
    """Lets ``--launcher pytorch`` or ``slurm`` run without CUDA: gloo, DDP without device_ids.

    MMEngine's ``init_dist`` calls ``torch.cuda.set_device``, which a CPU build of torch
    lacks, so the process group is initialised here (the Runner then skips it).

    Args:
        cfg: The config, with ``launcher`` set; ``model_wrapper_cfg`` is set in place.

    Raises:
        NotImplementedError: a launcher other than ``pytorch`` or ``slurm`` without CUDA.
    """
    if cfg.launcher == 'none' or torch.cuda.is_available():
        return
    if cfg.launcher == 'slurm':
        slurm_environment()
    elif cfg.launcher != 'pytorch':
        raise NotImplementedError(f'--launcher {cfg.launcher} needs CUDA; on CPU use '
                                  '--launcher pytorch (tools/dist_train.sh) or slurm')
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    dist_cfg.pop('init_backend', None)
    if dist_cfg.get('backend', 'nccl') != 'gloo':
        print_log(f"no CUDA: dist backend {dist_cfg.get('backend', 'nccl')} -> gloo",
                  logger='current', level=logging.WARNING)
    dist_cfg['backend'] = 'gloo'
    if isinstance(dist_cfg.get('timeout'), (int, float)):
        dist_cfg['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(**dist_cfg)
    if cfg.get('model_wrapper_cfg') is None:
        # The Runner's default passes device_ids=[LOCAL_RANK], which
        # DistributedDataParallel refuses for a CPU module.
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))


def slurm_environment() -> None:
    """Sets torch's ``env://`` variables from a Slurm task's, as MMEngine's slurm launcher
    does (rank, world size, the first node's address, ``MASTER_PORT`` or 29500)."""
    try:
        rank, world = os.environ['SLURM_PROCID'], os.environ['SLURM_NTASKS']
        nodes = os.environ['SLURM_NODELIST']
    except KeyError as err:
        raise RuntimeError(f'--launcher slurm: {err.args[0]} is not set; run it under srun '
                           '(tools/slurm_train.sh)') from None
    if 'MASTER_ADDR' not in os.environ:
        os.environ['MASTER_ADDR'] = subprocess.run(
            ['scontrol', 'show', 'hostnames', nodes], check=True, capture_output=True,
            text=True).stdout.split()[0]
    os.environ.setdefault('MASTER_PORT', '29500')
    os.environ.update(RANK=rank, WORLD_SIZE=world,
                      LOCAL_RANK=os.environ.get('SLURM_LOCALID', '0'))


def close_distributed() -> None:
    """Tears the process group down before exit (MMEngine leaves it to the interpreter).

    Otherwise gloo's threads may still run while the process exits: "terminate called
    without an active exception", SIGABRT, and torchrun reports the run as failed.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _log_to_files(err: BaseException) -> None:
    """Writes an error that ends a run, with its traceback, to the run's log files.

    The terminal gets Python's own report; on a cluster the work dir's log is often all
    that is kept, and it would otherwise end without saying why.
    """
    logger = MMLogger.get_current_instance()
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    if not files:
        return
    if isinstance(err, Preempted):  # not a failure: no traceback
        record = logger.makeRecord(logger.name, logging.WARNING, __file__, 0, str(err),
                                   None, None)
    else:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0,
                                   f'the run failed: {type(err).__name__}: {err}', None,
                                   (type(err), err, err.__traceback__))
    for handler in files:
        handler.handle(record)


def run_main(main: Callable[[], None]) -> None:
    """Runs a tool's ``main``; in a distributed job, a process that fails ends the job.

    The other processes of a job wait in their next collective for the failed one; they
    are stopped by torchrun only once the failed process has exited. Left to the
    interpreter's shutdown, that exit can hang (the process group's teardown, a
    non-daemon thread), and the job with it, until the collectives time out (30
    minutes). So a process of an initialised process group that raises prints its rank
    and the error and exits at once, with status 1. Under torchrun the exception also
    goes to the process's error file (torch's ``record``), so that torchrun's summary
    names the rank with the exception and its traceback.

    Args:
        main: The tool's ``main`` function.
    """
    try:
        record(main)()
    except Preempted as err:  # every process saved and stopped after the same iteration
        _log_to_files(err)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = f'rank {torch.distributed.get_rank()}: ' if distributed else ''
        print(f'{rank}{err}', file=sys.stderr, flush=True)
        close_distributed()
        sys.exit(PREEMPTED_EXIT_CODE)
    except BaseException as err:
        if isinstance(err, SystemExit) and not err.code:
            raise
        _log_to_files(err)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise
        rank = torch.distributed.get_rank()
        sys.excepthook(type(err), err, err.__traceback__)  # torch's: lines '[rankN]: ...'
        print(f'rank {rank} failed: {type(err).__name__}: {err}; exiting now so that the '
              'launcher stops the other processes', file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
