"""Non-finite values in training: found, named, and either stopped (default) or skipped.

The detector checks its losses every training step (:func:`check_losses`, one host
synchronisation, agreed on by every process) and raises :class:`NonFiniteError` with
the iteration, the loss terms that are not finite and the first non-finite tensor
(:func:`first_non_finite`: inputs, ground truth, parameters, then every module's output
in the order the forward pass runs). The Hungarian matcher never hands such values to
scipy: an unmatchable image makes its losses NaN, which this check then reports.

:class:`SkipNonFiniteHook`, added to a config's ``custom_hooks``, turns the error into a
skipped step (no backward, no optimizer update) and counts the skips in the log.
"""
import logging
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.dist import all_reduce
from mmengine.hooks import Hook
from mmengine.logging import MessageHub, print_log
from torch import Tensor, nn

from .registry import HOOKS


class NonFiniteError(FloatingPointError):
    """A training step met NaN or infinity."""


def _where(tensor: Tensor) -> str:
    kinds = [name for name, bad in (('NaN', torch.isnan(tensor).any()),
                                     ('Inf', torch.isinf(tensor).any())) if bad]
    return f'{" and ".join(kinds)} in {int((~torch.isfinite(tensor)).sum())} of ' \
           f'{tensor.numel()} values'


@torch.no_grad()
def first_non_finite(model: nn.Module, batch_inputs: Tensor,
                     batch_data_samples: Sequence) -> str:
    """Names the first non-finite tensor of a detector's forward pass on a batch.

    Looks at the inputs, the ground-truth boxes and the parameters, then runs the
    backbone, neck, transformer and head once more with a hook on every module and
    reports the first output that is not finite.
    """
    if not torch.isfinite(batch_inputs).all():
        images = [i for i in range(len(batch_inputs))
                  if not torch.isfinite(batch_inputs[i]).all()]
        paths = [batch_data_samples[i].metainfo.get('img_path', '?') for i in images]
        return f'the input images: {_where(batch_inputs)}, in images {images} ({paths})'
    for i, sample in enumerate(batch_data_samples):
        gt = getattr(sample, 'gt_instances', None)
        if gt is not None and 'bboxes' in gt and not torch.isfinite(gt.bboxes).all():
            return (f'the ground-truth boxes of image {i} '
                    f'({sample.metainfo.get("img_path", "?")}): {_where(gt.bboxes)}')
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            return f'the parameter {name}: {_where(param)}'
    found: List[str] = []

    def check(name: str):

        def hook(module, args, output):
            outputs = output if isinstance(output, (tuple, list)) else [output]
            for out in outputs:
                if not found and isinstance(out, Tensor) and out.is_floating_point() \
                        and not torch.isfinite(out).all():
                    found.append(f'the output of {name} ({type(module).__name__}): '
                                 f'{_where(out)}')
        return hook

    handles = [module.register_forward_hook(check(name))
               for name, module in model.named_modules() if name]
    try:
        outs = model.forward_transformer(model.extract_feat(batch_inputs), batch_data_samples)
        model.bbox_head(outs['hidden_states'], outs['references'])
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else 'none: every input and module output is finite, so ' \
        'the loss computation itself made it'


def check_losses(losses: Dict[str, Tensor], model: nn.Module, batch_inputs: Tensor,
                 batch_data_samples: Sequence) -> None:
    """Raises :class:`NonFiniteError` if any loss term of any process is not finite.

    Every process learns whether any of them failed (an all-reduce of one flag), so
    that all of them stop, or all skip the step, together.
    """
    terms = [name for name, value in losses.items() if not torch.isfinite(value).all()]
    failed = torch.tensor(float(bool(terms)), device=batch_inputs.device)
    all_reduce(failed, op='max')  # a no-op outside distributed training
    if not failed.item():
        return
    hub = MessageHub.get_current_instance()
    step = hub.get_info('iter')
    where = f'iteration {step + 1}' if step is not None else 'a training step'
    if hub.get_info('epoch') is not None:
        where += f' (epoch {hub.get_info("epoch") + 1})'
    if not terms:
        raise NonFiniteError(f'{where}: another process met non-finite losses')
    values = ', '.join(f'{name}={losses[name].item():g}' for name in terms)
    first = first_non_finite(model, batch_inputs, batch_data_samples)
    raise NonFiniteError(f'{where}: non-finite loss terms {values}; the first non-finite '
                         f'tensor: {first}')


@HOOKS.register_module()
class SkipNonFiniteHook(Hook):
    """Skips training steps with non-finite losses instead of stopping the run.

    The step does no backward pass and no optimizer update (AMP's loss scaler is left
    alone too); its error is logged as a warning with the count of skipped steps, and
    the count again at the end of every epoch.

    Args:
        max_skips: Stop anyway after this many skipped steps (None: never).
    """
    priority = 'VERY_HIGH'

    def __init__(self, max_skips: Optional[int] = None) -> None:
        self.max_skips = max_skips
        self.skipped = 0

    def before_train(self, runner) -> None:
        train_step = runner.model.train_step

        def guarded(data, optim_wrapper):
            try:
                return train_step(data, optim_wrapper=optim_wrapper)
            except NonFiniteError as err:
                self.skipped += 1
                if self.max_skips is not None and self.skipped > self.max_skips:
                    raise NonFiniteError(f'{err} (and {self.max_skips} steps were skipped '
                                         'before: max_skips)') from err
                optim_wrapper.zero_grad()
                print_log(f'skipped training step ({self.skipped} so far): {err}',
                          logger='current', level=logging.WARNING)
                return {}

        runner.model.train_step = guarded

    def after_train_epoch(self, runner) -> None:
        if self.skipped:
            print_log(f'{self.skipped} training steps skipped so far (non-finite losses)',
                      logger='current', level=logging.WARNING)
