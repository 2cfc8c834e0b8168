"""``ddetr.SkipNonFiniteHook``: a training step with non-finite losses is skipped, not fatal.

The detector's check (:mod:`...models.utils.non_finite`) raises
:class:`~...models.utils.non_finite.NonFiniteError`; this hook turns it into a skipped
step and counts the skips in the log.
"""
import logging
from typing import Optional

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log

from ...models.utils.non_finite import NonFiniteError
from ...registry import HOOKS

SKIPS_KEY = 'train/non_finite_skips'  # the message hub's count of skipped steps


@HOOKS.register_module()
class SkipNonFiniteHook(Hook):
    """Skips training steps with non-finite losses instead of stopping the run.

    The step does no backward pass and no optimizer update (AMP's loss scaler is left
    alone too, and gradients accumulated by earlier steps are kept), and the buffers
    that its forward pass changed (BatchNorm's running statistics, which a NaN image
    poisons) get their values back. Its error is logged as a warning with the count of
    skipped steps; the count is also the ``non_finite_skips`` value of the log lines
    from the first skip on, and is carried over by ``--resume``.

    All processes skip the same steps: :func:`check_losses` raises on all of them.

    Args:
        max_skips: Skip at most this many steps; the next non-finite one stops the
            run (None: no limit).
    """
    priority = 'VERY_HIGH'

    def __init__(self, max_skips: Optional[int] = None) -> None:
        self.max_skips = max_skips
        self.skipped = 0

    def before_train(self, runner) -> None:
        hub = runner.message_hub
        if SKIPS_KEY in hub.log_scalars:  # resumed: the checkpoint's count
            self.skipped = int(hub.log_scalars[SKIPS_KEY].current())
        model = runner.model
        train_step = model.train_step
        buffers = list(model.buffers())
        saved = [torch.empty_like(b) for b in buffers]

        def guarded(data, optim_wrapper):
            if buffers:
                torch._foreach_copy_(saved, buffers)  # one fused copy, no host sync
            try:
                return train_step(data, optim_wrapper=optim_wrapper)
            except NonFiniteError as err:
                if buffers:
                    with torch.no_grad():
                        torch._foreach_copy_(buffers, saved)
                self.skipped += 1
                hub.update_scalar(SKIPS_KEY, self.skipped)
                if self.max_skips is not None and self.skipped > self.max_skips:
                    raise NonFiniteError(f'{err} (and {self.max_skips} steps were skipped '
                                         'before: max_skips)') from err
                print_log(f'skipped training step ({self.skipped} so far): {err}',
                          logger='current', level=logging.WARNING)
                return {}

        model.train_step = guarded

    def after_train_epoch(self, runner) -> None:
        if self.skipped:
            print_log(f'{self.skipped} training steps skipped so far (non-finite losses)',
                      logger='current', level=logging.WARNING)
