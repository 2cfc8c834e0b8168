"""Exact and crash-safe resume: ``ddetr.ExactResumeHook`` (alias ``ddetr.CheckpointHook``).

MMEngine's checkpoints restore the weights, the optimizer, the schedulers and the loop
counters, and its samplers reshuffle from ``seed + epoch``. What they miss is every
random number generator that the run consumes in between: dropout (torch, on CPU and
on each CUDA device), the random augmentations (numpy and Python's ``random``, in the
main process or in the data-loader workers), and the draw with which each new
data-loader iterator seeds its workers. A resumed run therefore diverged from the
uninterrupted one. This hook closes the gap:

- **Main-process states.** Each checkpoint carries the torch CPU, CUDA (every device),
  numpy and ``random`` states of every rank (gathered to rank 0 when distributed) and
  the data position they belong to (epoch, batches of it trained). A resumed run sets
  them at the exact point where the uninterrupted run stood when it saved them: just
  before it asks the data loader for the next batch (after the batches of the
  interrupted epoch that MMEngine's iteration-based loop, or this hook for an
  epoch-based one, replays to put the loader where it was).
- **Validation draws nothing.** Validation inside training runs between a checkpoint
  and the next training batch, but a resumed run does not repeat it; so the states are
  put back after each validation as they were before it.
- **Data-loader workers, epoch by epoch.** In an epoch-based loop, workers are seeded
  at the start of every epoch from ``(seed, rank, worker id, epoch)`` (MMEngine seeds
  them from ``(seed, rank, worker id)`` at each start), and persistent workers are
  restarted at each epoch so that they are seeded so too; within an epoch their
  states follow from the batches they have made, which the replay reproduces. An
  iteration-based loop replays the whole run's batches on resume, so its workers
  (persistent or not) keep MMEngine's seeding.
- **Atomic files.** Checkpoints and ``last_checkpoint`` are written to a temporary
  file in the same directory, synced and renamed (:mod:`...checkpoint.atomic_io`); a
  checkpoint that ``max_keep_ckpts`` or a new best one makes obsolete is deleted only
  after its successor is complete. A run killed at any moment leaves its previous
  checkpoint loadable and named in ``last_checkpoint``.

The resumed run must use the same machine, settings and number of processes as the
interrupted one; where it cannot be exact (another number of processes, a checkpoint
without RNG states, a loop other than MMEngine's two), it says so in the log.

:func:`use_exact_resume` puts this hook in the place of MMEngine's ``CheckpointHook``
in a config (``tools/train.py`` calls it); it takes the same arguments. It was first
registered as ``ddetr.CheckpointHook``, MMEngine's own name; that name stays an alias,
so that configs that use it keep working.

Two of MMEngine's private methods are overridden, where no public hook gives the same
behaviour; they are in one marked section of the class, and
``tests/test_engine/test_hooks/test_mmengine_overrides.py`` fails if the MMEngine methods
they replace change (checked against MMEngine :data:`MMENGINE_CHECKED`).
"""
import logging
import os.path as osp
import time
from collections import deque
from functools import partial
from typing import Any, Deque, Iterator, List, Optional

from mmengine.config import Config
from mmengine.dataset import worker_init_fn as mmengine_worker_init_fn
from mmengine.dist import all_gather_object, get_rank, get_world_size, is_main_process
from mmengine.hooks import CheckpointHook as MMEngineCheckpointHook
from mmengine.logging import print_log
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

from ...checkpoint.atomic_io import ATOMIC_BACKEND, atomic_write, remove_stale_partial_files
from ...registry import HOOKS
from ..rng_state import RNGState, get_rng_state, seed_worker, set_rng_state

# The MMEngine version whose private CheckpointHook methods the overrides below were
# checked against (see the module's docstring).
MMENGINE_CHECKED = '0.10.7'


class _ReplayLoader:
    """Stands in for an epoch-based loop's data loader during the first resumed epoch.

    Iterating it skips (makes, and drops) the batches of the epoch that were trained
    before the checkpoint, sets the saved RNG states, and hands the loop the rest;
    then it puts the real loader back into the loop. Everything else is the loader's.
    """

    def __init__(self, loop: EpochBasedTrainLoop, skip: int, state: RNGState) -> None:
        self._loop, self._loader = loop, loop.dataloader
        self._skip, self._state = skip, state

    def __iter__(self) -> Iterator:
        if self._skip == 0:  # before the new iterator draws its workers' base seed
            set_rng_state(self._state)
        batches = iter(self._loader)
        for _ in range(self._skip):
            next(batches)
        if self._skip:
            set_rng_state(self._state)
        self._loop.dataloader = self._loader
        yield from batches

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _ReplayIterator:
    """Wraps an iteration-based loop's data iterator in the first resumed iteration.

    MMEngine's loop first advances the iterator by the iterations already trained
    (making those batches again); the saved RNG states are set after that, when the
    loop asks for its first new batch.
    """

    def __init__(self, loop: IterBasedTrainLoop, skip: int, state: RNGState) -> None:
        self._loop, self._iterator = loop, loop.dataloader_iterator
        self._skip, self._state = skip, state

    def __iter__(self) -> '_ReplayIterator':
        return self

    def __next__(self) -> Any:
        if self._skip > 0:
            self._skip -= 1
            return next(self._iterator)
        set_rng_state(self._state)
        self._loop.dataloader_iterator = self._iterator
        return next(self._iterator)


def _warn(message: str) -> None:
    print_log(message, logger='current', level=logging.WARNING)


@HOOKS.register_module()
class ExactResumeHook(MMEngineCheckpointHook):
    """MMEngine's ``CheckpointHook`` (same arguments) for exact, crash-safe resume.

    On top of MMEngine's, each checkpoint holds the RNG states of every process and
    the data position they belong to; a resumed run restores them where the
    uninterrupted run stood; validation leaves the states as it found them; workers
    are seeded per epoch; files are written atomically, and old checkpoints removed
    only after their successor is complete. See the module's docstring.

    In an epoch-based run (``by_epoch=True``), ``iter_interval=N`` also saves a
    resumable ``iter_{N}.pth`` every N iterations, within epochs, and keeps the last
    ``max_keep_iter_ckpts`` of them (-1: all); the epoch checkpoints are kept as
    ``max_keep_ckpts`` says, apart from them.

    Args:
        backend_args: MMEngine's. Left ``None`` with a local ``out_dir``, the files are
            written atomically (``checkpoint.atomic_io.ATOMIC_BACKEND``).
        iter_interval: Iterations between iteration checkpoints of an epoch-based run
            (0: none).
        max_keep_iter_ckpts: Iteration checkpoints kept (-1: all).
        **kwargs: MMEngine ``CheckpointHook``'s other arguments.
    """

    def __init__(self, backend_args: Optional[dict] = None, iter_interval: int = 0,
                 max_keep_iter_ckpts: int = -1, **kwargs) -> None:
        local = '://' not in str(kwargs.get('out_dir') or '')
        if backend_args is None and kwargs.get('file_client_args') is None and local:
            backend_args = dict(backend=ATOMIC_BACKEND)
        super().__init__(backend_args=backend_args, **kwargs)
        if isinstance(iter_interval, bool) or not isinstance(iter_interval, int) or \
                iter_interval < 0:
            raise ValueError(f'iter_interval={iter_interval!r}: iterations between '
                             'iteration checkpoints, an int >= 0 (0: none)')
        if iter_interval and not self.by_epoch:
            raise ValueError(f'iter_interval={iter_interval} is for epoch-based checkpoints '
                             '(by_epoch=True); with by_epoch=False, `interval` counts '
                             'iterations already')
        if isinstance(max_keep_iter_ckpts, bool) or not isinstance(max_keep_iter_ckpts, int) \
                or max_keep_iter_ckpts == 0 or max_keep_iter_ckpts < -1:
            raise ValueError(f'max_keep_iter_ckpts={max_keep_iter_ckpts!r}: the iteration '
                             'checkpoints to keep, an int >= 1, or -1 for all')
        self.iter_interval, self.max_keep_iter_ckpts = iter_interval, max_keep_iter_ckpts
        self.keep_iter_ckpt_ids: Deque[int] = deque()
        self.saved_step: Optional[int] = None  # the iteration of the last save, if any
        self._resumed: Optional[dict] = None  # what the loaded checkpoint holds for us
        self._before_val: Optional[RNGState] = None  # the states validation found
        self._training = False
        self._epoch_batches = 0  # batches of the current epoch trained
        self._first_epoch_batches = 0  # where the first epoch of this run starts
        self._position = dict(epoch=0, batches=0)  # of the last batch trained

    # --- resume -------------------------------------------------------------------
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        meta = checkpoint.get('meta', {})
        self._resumed = dict(rng_states=meta.get('rng_states'),
                             data_position=meta.get('data_position'),
                             iter=meta.get('iter'))

    def before_train(self, runner) -> None:
        super().before_train(runner)
        self._training = True
        self.keep_iter_ckpt_ids = deque(runner.message_hub.get_info('keep_iter_ckpt_ids')
                                        or [])
        if is_main_process() and ATOMIC_BACKEND == (self.backend_args or {}).get('backend'):
            remove_stale_partial_files(self.out_dir)
        loop = runner.train_loop
        if runner.iter == 0:  # a new run (load_from is not a resume)
            return
        saved = self._resumed or {}
        states, position = saved.get('rng_states'), saved.get('data_position')
        if saved.get('iter') != runner.iter or states is None or position is None:
            _warn('resume is not exact: the checkpoint holds no RNG states (saved by '
                  'another hook than ddetr.ExactResumeHook, or a best_* checkpoint); '
                  'dropout and random augmentations will draw other numbers than the '
                  'interrupted run would have')
            return
        if len(states) != get_world_size():
            _warn(f'resume is not exact: the checkpoint holds the RNG states of '
                  f'{len(states)} processes, this run has {get_world_size()}')
            return
        state = states[get_rank()]
        if isinstance(loop, EpochBasedTrainLoop):
            # An epoch checkpoint resumes at the next epoch's start; one saved within an
            # epoch (by_epoch=False) in the same epoch, after the batches trained.
            skip = position['batches'] if position['epoch'] == runner.epoch else 0
            self._first_epoch_batches = skip
            loop.dataloader = _ReplayLoader(loop, skip, state)
        elif isinstance(loop, IterBasedTrainLoop):
            self._check_worker_seed(runner, loop.dataloader)
            loop.dataloader_iterator = _ReplayIterator(loop, runner.iter, state)
        else:
            _warn(f'resume is not exact: {type(loop).__name__} is neither of MMEngine\'s '
                  'train loops, so the RNG states are set before it starts, not at the '
                  'batch where they were saved')
            set_rng_state(state)

    @staticmethod
    def _check_worker_seed(runner, loader) -> None:
        """An iteration-based loop's workers started before the checkpoint's seed was
        known: they match only if the config fixes ``randomness.seed``."""
        init = loader.worker_init_fn
        if loader.num_workers and isinstance(init, partial) and \
                init.keywords.get('seed', runner.seed) != runner.seed:
            _warn(f'resume is not exact: the data-loader workers were seeded with '
                  f'{init.keywords["seed"]}, the interrupted run used {runner.seed}; set '
                  '`randomness = dict(seed=...)` in the config')

    # --- epochs and their workers ----------------------------------------------------
    def before_train_epoch(self, runner) -> None:
        loop = runner.train_loop
        if not isinstance(loop, EpochBasedTrainLoop):
            return
        self._epoch_batches, self._first_epoch_batches = self._first_epoch_batches, 0
        loader = loop.dataloader
        if isinstance(loader, _ReplayLoader):
            loader = loader._loader
        init = loader.worker_init_fn
        if init is None or (isinstance(init, partial) and init.func in
                            (mmengine_worker_init_fn, seed_worker)):
            loader.worker_init_fn = partial(seed_worker, num_workers=loader.num_workers,
                                            rank=get_rank(), seed=runner.seed,
                                            epoch=runner.epoch)
        iterator = getattr(loader, '_iterator', None)
        if loader.persistent_workers and iterator is not None:
            # Their RNG states would run on from the last epoch, and no checkpoint can
            # hold them: start this epoch's workers afresh, seeded for it.
            iterator._shutdown_workers()
            loader._iterator = None

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        self._epoch_batches += 1
        self._position = dict(epoch=runner.epoch, batches=self._epoch_batches)
        super().after_train_iter(runner, batch_idx, data_batch, outputs)
        if self.by_epoch and self.iter_interval and \
                (runner.iter + 1) % self.iter_interval == 0:
            self.save_iteration_checkpoint(runner)

    def save_iteration_checkpoint(self, runner) -> str:
        """Saves ``iter_{N}.pth`` now, after iteration N, resumable at that very batch
        (within an epoch too); every process must call it (the RNG states are gathered).

        Counted among the ``max_keep_iter_ckpts`` iteration checkpoints of an
        epoch-based run. Returns the checkpoint's path; if this iteration was saved
        already, that checkpoint's.
        """
        step = runner.iter + 1
        if self.saved_step == step:
            return self.last_ckpt
        meta = dict(epoch=runner.epoch, iter=step)
        if not self.by_epoch:  # MMEngine's own iteration checkpoints, as its hook names them
            self._save_checkpoint_with_step(runner, step, meta)
        else:
            self._save(runner, step, meta, 'iter_{}.pth', False, self.keep_iter_ckpt_ids,
                       self.max_keep_iter_ckpts, 'keep_iter_ckpt_ids')
        return self.last_ckpt

    def after_train(self, runner) -> None:
        self._training = False
        super().after_train(runner)

    # --- validation draws nothing ------------------------------------------------------
    def before_val(self, runner) -> None:
        if self._training:
            self._before_val = get_rng_state()

    def after_val(self, runner) -> None:
        if self._before_val is not None:
            set_rng_state(self._before_val)
            self._before_val = None

    # --- saving: MMEngine's private methods, overridden ----------------------------------
    # The only overrides of MMEngine internals in this package. No public hook orders a
    # checkpoint's deletion after its successor's write. If MMEngine changes these
    # methods, tests/test_engine/test_hooks/test_mmengine_overrides.py fails: compare
    # them with MMEngine's new ones, then update MMENGINE_CHECKED and the test's digests.
    def _save_checkpoint_with_step(self, runner, step: int, meta: dict) -> None:
        # MMEngine's version, but for three things, so it is not called: it deletes the
        # expired checkpoint before writing the new one, and writes last_checkpoint in
        # place (a kill in between leaves none, or an empty name); and here every process
        # (only rank 0 writes) gathers the RNG states into the meta.
        # (MMEngine makes keep_ckpt_ids only when max_keep_ckpts > 0)
        self._save(runner, step, meta, self.filename_tmpl, self.by_epoch,
                   getattr(self, 'keep_ckpt_ids', deque()), self.max_keep_ckpts, 'keep_ckpt_ids')

    def _save(self, runner, step: int, meta: dict, filename_tmpl: str, by_epoch: bool,
              kept: Deque[int], max_keep: int, kept_key: str) -> None:
        """Saves checkpoint ``step`` of one series (epoch or iteration checkpoints), whose
        kept steps are ``kept`` (at most ``max_keep``, also in the message hub as
        ``kept_key``)."""
        state = self._before_val if self._before_val is not None else get_rng_state()
        meta = dict(meta, rng_states=all_gather_object(state),
                    data_position=dict(self._position))
        expired = None
        if max_keep > 0 and not (kept and kept[-1] == step):
            if len(kept) == max_keep:
                expired = kept.popleft()
            kept.append(step)
            runner.message_hub.update_info(kept_key, list(kept))
        filename = filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        start = time.perf_counter()
        runner.save_checkpoint(
            self.out_dir, filename, self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler, meta=meta,
            by_epoch=by_epoch, backend_args=self.backend_args, **self.args)
        self.saved_step = runner.iter + (0 if by_epoch else 1)
        if not is_main_process():
            return
        print_log(f'saved {filename} in {time.perf_counter() - start:.2f} s',
                  logger='current')
        atomic_write(osp.join(runner.work_dir, 'last_checkpoint'),
                     str(self.last_ckpt).encode())
        # Only now that its successor is complete and named.
        if expired is not None:
            self._remove(self.file_backend.join_path(self.out_dir,
                                                     filename_tmpl.format(expired)))

    def _save_best_checkpoint(self, runner, metrics: dict) -> None:
        # MMEngine deletes the previous best checkpoint before it writes the new one:
        # hold the deletions back until the new one is written.
        held: List[str] = []
        self.file_backend.remove = held.append  # shadows the method on this instance
        try:
            super()._save_best_checkpoint(runner, metrics)
        finally:
            del self.file_backend.remove
        for path in held:
            self._remove(path)

    # --- end of the overrides -----------------------------------------------------------

    def _remove(self, path: str) -> None:
        if self.file_backend.isfile(path):
            self.file_backend.remove(path)
        elif self.file_backend.isdir(path):  # checkpoints saved by DeepSpeed
            self.file_backend.rmtree(path)


def use_exact_resume(cfg: Config) -> None:
    """Puts ``ddetr.ExactResumeHook`` in the place of MMEngine's ``CheckpointHook``.

    Args:
        cfg: A training config; its ``default_hooks.checkpoint`` is changed in place if
            it is MMEngine's hook (any other type is left alone, with a warning).
    """
    hook = cfg.get('default_hooks', {}).get('checkpoint')
    if hook is None:
        return
    kind = hook.get('type')
    name = kind if isinstance(kind, str) else getattr(kind, '__name__', str(kind))
    if kind is ExactResumeHook or name in ('ddetr.ExactResumeHook', 'ddetr.CheckpointHook'):
        return
    if kind is MMEngineCheckpointHook or name.split('.')[-1] == 'CheckpointHook':
        hook.type = 'ddetr.ExactResumeHook'
        print_log('default_hooks.checkpoint: ddetr.ExactResumeHook (exact, crash-safe '
                  'resume) in the place of MMEngine\'s CheckpointHook', logger='current')
    else:
        _warn(f'default_hooks.checkpoint is {name}: --resume may not be exact '
              '(ddetr.ExactResumeHook saves and restores the RNG states)')


# The hook's first name, MMEngine's own: configs that name it keep working.
HOOKS.register_module(name='CheckpointHook', module=ExactResumeHook)
CheckpointHook = ExactResumeHook

__all__ = ['ExactResumeHook', 'CheckpointHook', 'MMENGINE_CHECKED', 'use_exact_resume']
