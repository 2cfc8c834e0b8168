"""Preemption: on a signal, every process saves a resumable checkpoint and the run exits.

A Slurm cluster that preempts a job, or ends it at its time limit, sends it SIGTERM
(then, ``KillWait`` seconds later, SIGKILL); ``sbatch --signal=USR1@120`` asks for
another signal 120 s ahead. :class:`PreemptionHook` catches the signals it is given. The
handler only notes the signal; at the end of the iteration that is running, the
processes agree (an all-reduce of "did any of us get one?") and so all stop after the
same iteration, save ``iter_{N}.pth`` through ``ddetr.ExactResumeHook`` (RNG states and
data position included: the resumed run is exact, within an epoch too), and the run
ends with :data:`PREEMPTED_EXIT_CODE`.

A second signal while the checkpoint is saved only notes it again: the save goes on;
once it is saved, the signals are ignored until the process has exited. The file is
written atomically besides, so no signal (SIGKILL included) leaves a
partial checkpoint named in ``last_checkpoint``.
"""
import os
import signal
from typing import Dict, Optional, Sequence, Union

import torch
from mmengine.dist import all_reduce, get_rank, is_distributed
from mmengine.hooks import Hook
from mmengine.logging import print_log

from ...registry import HOOKS
from .exact_resume_hook import ExactResumeHook

# EX_TEMPFAIL of sysexits.h: a temporary failure; running the command again continues.
PREEMPTED_EXIT_CODE = 75
# The signals a job is asked to stop with: Slurm's SIGTERM, and those users name in
# sbatch --signal (USR1, USR2, HUP, INT). SIGKILL and SIGSTOP can not be caught.
STOP_SIGNALS = ('SIGTERM', 'SIGUSR1', 'SIGUSR2', 'SIGHUP', 'SIGINT')
# Set by tools/dist_train.sh and tools/slurm_train.sh: a file that rank 0 creates when the
# run was preempted, so that the launcher script can exit with PREEMPTED_EXIT_CODE too.
MARK_ENV = 'DDETR_PREEMPTED_MARK'


class Preempted(Exception):
    """The run stopped on a signal after saving a resumable checkpoint.

    ``tools/train.py`` exits with :data:`PREEMPTED_EXIT_CODE` on it.
    """

    def __init__(self, signal_name: str, iteration: int, checkpoint: str) -> None:
        super().__init__(f'preempted by {signal_name}: stopped after iteration {iteration} '
                         f'and saved {checkpoint}; the same command with --resume continues '
                         'from it (automatic after a Slurm requeue or a torchrun restart)')
        self.signal_name, self.iteration, self.checkpoint = signal_name, iteration, checkpoint


def parse_signal(name: Union[str, int, signal.Signals]) -> signal.Signals:
    """The signal of a name such as ``'SIGUSR1'`` or ``'USR1'``, one of :data:`STOP_SIGNALS`.

    Raises:
        ValueError: not a signal name, or one that a job is not stopped with.
    """
    if isinstance(name, signal.Signals):
        name = name.name
    if not isinstance(name, str):
        raise ValueError(f'signal {name!r}: give a signal name, one of '
                         f'{", ".join(STOP_SIGNALS)}')
    full = name.strip().upper()
    full = full if full.startswith('SIG') else 'SIG' + full
    if full not in STOP_SIGNALS:
        why = ('it can not be caught' if full in ('SIGKILL', 'SIGSTOP') else
               'Slurm does not stop jobs with it' if hasattr(signal, full) else
               'no such signal')
        raise ValueError(f'signal {name!r}: {why}; a preemption signal is one of '
                         f'{", ".join(STOP_SIGNALS)} (Slurm sends SIGTERM, and what '
                         'sbatch --signal names)')
    return signal.Signals[full]


@HOOKS.register_module()
class PreemptionHook(Hook):
    """Saves a resumable checkpoint and stops the run on a preemption signal.

    Needs ``ddetr.ExactResumeHook`` (``tools/train.py`` puts it in place of MMEngine's).
    See the module's docstring.

    Args:
        signals: The signals to catch, by name (:data:`STOP_SIGNALS`).
    """
    # After the other hooks' after_train_iter: the checkpoint hook counts the batch, the
    # EMA is updated and the iteration logged before the save.
    priority = 'LOWEST'

    def __init__(self, signals: Sequence[str] = ('SIGTERM', 'SIGUSR1')) -> None:
        if isinstance(signals, (str, int, signal.Signals)):
            signals = [signals]
        self.signals = [parse_signal(s) for s in signals]
        if not self.signals:
            raise ValueError('PreemptionHook: signals is empty; name at least one of '
                             f'{", ".join(STOP_SIGNALS)}')
        self.received: Optional[str] = None  # the first signal's name
        self._previous: Dict[signal.Signals, object] = {}
        self._checkpoint_hook: Optional[ExactResumeHook] = None

    def _note(self, signum: int, frame) -> None:
        # Signal handlers run between bytecodes of the main thread: note, nothing more.
        if self.received is None:
            self.received = signal.Signals(signum).name

    def before_train(self, runner) -> None:
        hooks = [h for h in runner.hooks if isinstance(h, ExactResumeHook)]
        if not hooks:
            raise RuntimeError('PreemptionHook saves through ddetr.ExactResumeHook, and the '
                               'run has none: set default_hooks.checkpoint.type = '
                               "'ddetr.ExactResumeHook' (tools/train.py does)")
        self._checkpoint_hook = hooks[0]
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._note)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        stop = torch.tensor([0 if self.received is None else 1])
        if is_distributed():  # one process's signal stops all, after the same iteration
            all_reduce(stop, op='max')
        if not stop.item():
            return
        iteration, name = runner.iter + 1, self.received or "another process's signal"
        print_log(f'{name}: saving a checkpoint after iteration {iteration} and stopping',
                  logger='current')
        path = self._checkpoint_hook.save_iteration_checkpoint(runner)
        mark = os.environ.get(MARK_ENV)
        if mark and get_rank() == 0:
            with open(mark, 'w') as f:
                f.write(f'{path}\n')
        # Saved: from now until the exit, these signals are ignored (a handler would be
        # reset to the default, fatal one while the interpreter shuts down, and the
        # exit status would then be the signal's, not "preempted").
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()
        raise Preempted(name, iteration, path)

    def after_train(self, runner) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
