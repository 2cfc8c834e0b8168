"""Checkpoints: safe loading, atomic writes, fitting, converters, EMA weights (:mod:`.ema`).

Nothing here changes global state when imported but the registration of the atomic
file backend (as MMEngine registers its own); the checkpoint safety is installed by
:func:`allow_mmengine_checkpoints`, which the tools call.
"""
from .atomic_io import ATOMIC_BACKEND, AtomicLocalBackend, atomic_write, remove_stale_partial_files
from .class_branches import CheckpointMismatchError, fit_class_branches
from .safe_load import (CheckpointError, allow_mmengine_checkpoints, checkpoint_problem,
                        load_local_checkpoint, safe_globals)
from .state_dict import load_weights, strip_ddp_prefix

__all__ = ['ATOMIC_BACKEND', 'AtomicLocalBackend', 'atomic_write', 'remove_stale_partial_files',
           'CheckpointMismatchError', 'fit_class_branches', 'CheckpointError',
           'allow_mmengine_checkpoints', 'checkpoint_problem', 'load_local_checkpoint',
           'safe_globals', 'load_weights', 'strip_ddp_prefix']
