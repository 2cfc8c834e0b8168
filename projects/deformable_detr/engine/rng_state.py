"""The random number generators of a process: saved, restored, and seeded per worker.

What exact resume (:mod:`.hooks.exact_resume_hook`) saves in each checkpoint and sets
again where the interrupted run stood.
"""
import logging
import random
from typing import Any, Dict

import numpy as np
import torch
from mmengine.logging import print_log

RNGState = Dict[str, Any]


def get_rng_state() -> RNGState:
    """The states of this process's generators: torch CPU and CUDA, numpy, ``random``.

    Plain types and tensors only, so that a checkpoint holding them loads with
    ``torch.load(weights_only=True)`` as it is.
    """
    name, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    # A process that never initialised CUDA drew nothing there (and keeps it so).
    cuda_used = torch.cuda.is_available() and torch.cuda.is_initialized()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if cuda_used else [],
        numpy=(name, keys.tolist(), int(pos), int(has_gauss), float(cached_gauss)),
        random=random.getstate())


def set_rng_state(state: RNGState) -> None:
    """Sets this process's generators to a state of :func:`get_rng_state`.

    CUDA states of another number of devices than this process sees are left out, with
    a warning.
    """
    torch.set_rng_state(state['torch'])
    cuda = state['cuda']
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda and have == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        print_log(f'resume is not exact: the RNG states are of {len(cuda)} CUDA devices, '
                  f'this process sees {have}; their CUDA states are not restored',
                  logger='current', level=logging.WARNING)
    name, keys, pos, has_gauss, cached_gauss = state['numpy']
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss,
                         cached_gauss))
    version, internal, gauss_next = state['random']
    random.setstate((version, tuple(internal), gauss_next))


def seed_worker(worker_id: int, num_workers: int, rank: int, seed: int, epoch: int) -> None:
    """Seeds a data-loader worker's numpy, ``random`` and torch for one epoch.

    The seed mixes ``(seed, rank, worker_id, epoch)``, so that every worker of every
    process draws its own numbers, and every epoch new ones.

    Args:
        worker_id: The worker's index, ``0 .. num_workers - 1`` (DataLoader's argument).
        num_workers: The loader's number of workers (kept for MMEngine's signature).
        rank: The process's rank.
        seed: The run's seed (``runner.seed``).
        epoch: The epoch whose batches the worker makes.
    """
    del num_workers
    worker_seed = int(np.random.SeedSequence([seed % 2**32, rank, worker_id, epoch])
                      .generate_state(1)[0])
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    torch.manual_seed(worker_seed)


__all__ = ['RNGState', 'get_rng_state', 'set_rng_state', 'seed_worker']
