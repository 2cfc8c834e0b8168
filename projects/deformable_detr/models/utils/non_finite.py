"""Non-finite values in training: found, named, and either stopped (default) or skipped.

The detector checks its losses every training step, before any backward pass or
optimizer update (:func:`check_losses`: one host synchronisation for all loss terms,
agreed on by every process), and raises :class:`NonFiniteError` with the iteration, the
loss terms that are not finite and the first non-finite tensor (:func:`first_non_finite`:
inputs, ground truth, parameters, then every module's output in the order
the forward pass runs). The Hungarian matcher never hands such values to scipy: an
unmatchable image makes its losses NaN, which this check then reports.

``ddetr.SkipNonFiniteHook`` (:mod:`...engine.hooks.skip_non_finite_hook`), added to a
config's ``custom_hooks``, turns the error into a skipped step (no backward, no optimizer update, the BatchNorm statistics of the failed
forward pass undone) and counts the skips in the log.

Mixed precision: the check looks at the losses, before they are scaled; AMP's loss
scaler looks at the gradients. An fp16 gradient overflow (finite losses) is therefore
still skipped by the scaler, and a non-finite loss is never the scaler's business.
"""
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
from mmengine.dist import all_gather_object, all_reduce
from mmengine.logging import MessageHub
from torch import Tensor, nn

LossValue = Union[Tensor, Sequence[Tensor]]


class NonFiniteError(FloatingPointError):
    """A training step met NaN or infinity."""


def _where(tensor: Tensor) -> str:
    kinds = [name for name, bad in (('NaN', torch.isnan(tensor).any()),
                                     ('Inf', torch.isinf(tensor).any())) if bad]
    return f'{" and ".join(kinds)} in {int((~torch.isfinite(tensor)).sum())} of ' \
           f'{tensor.numel()} values'


@contextmanager
def _state_kept(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Undoes what a forward pass changes besides its outputs: the buffers (BatchNorm's
    running statistics) and the random number generators (dropout)."""
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)


def _first_outside(model: nn.Module, batch_inputs: Tensor,
                   batch_data_samples: Sequence) -> Optional[str]:
    """The first non-finite of the inputs, the ground-truth boxes and the parameters."""
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
    return None


@torch.no_grad()
def first_non_finite(model: nn.Module, batch_inputs: Tensor,
                     batch_data_samples: Sequence) -> str:
    """Names the first non-finite tensor of a detector's forward pass on a batch.

    Looks at the inputs, the ground-truth boxes and the parameters, then at every
    module's output, in the order the forward pass makes them (a non-finite buffer,
    such as a BatchNorm statistic, shows as the output of the module that uses it).

    The forward pass (backbone, neck, transformer, head) runs whatever the first checks
    found, so that every process that calls this runs the same collectives in it
    (SyncBatchNorm's), and leaves the model's buffers and the random number generators
    as it found them.
    """
    found: List[str] = []
    outside = _first_outside(model, batch_inputs, batch_data_samples)
    if outside:
        found.append(outside)

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
        with _state_kept(model, batch_inputs.device):
            model(batch_inputs, batch_data_samples, mode='tensor')  # the detector's stages
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else 'none: every input and module output is finite, so ' \
        'the loss computation itself made it'


def _mean(value: LossValue) -> Tensor:
    """A loss term as MMEngine's ``parse_losses`` adds it to the total."""
    if isinstance(value, Tensor):
        return value.detach().float().mean()
    return sum(v.detach().float().mean() for v in value)


def check_losses(losses: Dict[str, LossValue], model: nn.Module, batch_inputs: Tensor,
                 batch_data_samples: Sequence) -> None:
    """Raises :class:`NonFiniteError` if a loss of any process is not finite.

    Checked: every term, and their sum (finite terms can still overflow it). All flags
    reach the host in one copy, the step's one synchronisation besides the matcher's;
    before that, one all-reduce tells every process whether any of them failed, so that
    all of them stop, or all skip the step, together.

    Raises:
        NonFiniteError: naming the iteration (and epoch), the non-finite terms with
            their values and the first non-finite tensor of the forward pass; in
            distributed training, of every process that failed, by rank, on every
            process (one ``all_gather_object``, on this failure path only).
    """
    if not losses:
        return
    means = torch.stack([_mean(value) for value in losses.values()])
    bad = torch.cat([~torch.isfinite(means), ~torch.isfinite(means.sum())[None]]).float()
    anywhere = bad[-1:].clone()  # the sum is non-finite if any term is
    all_reduce(anywhere, op='max')  # a no-op outside distributed training
    *bad_terms, bad_total, failed = torch.cat([bad, anywhere]).tolist()  # the one sync
    if not failed:
        return
    hub = MessageHub.get_current_instance()
    step = hub.get_info('iter')
    where = f'iteration {step + 1}' if step is not None else 'a training step'
    if hub.get_info('epoch') is not None:
        where += f' (epoch {hub.get_info("epoch") + 1})'
    if bad_total:
        terms = [name for name, flag in zip(losses, bad_terms) if flag]
        if terms:
            what = 'non-finite loss terms ' + ', '.join(
                f'{name}={value:g}' for name, value in zip(losses, means.tolist())
                if name in terms)
        else:
            what = f'the sum of the finite loss terms overflows to {means.sum().item():g}'
        first = first_non_finite(model, batch_inputs, batch_data_samples)
        cause: Optional[str] = f'{what}; the first non-finite tensor: {first}'
    else:
        # The failing processes run a forward pass to name the tensor: so does this one,
        # or their collectives in it (SyncBatchNorm's) would wait for it forever.
        first_non_finite(model, batch_inputs, batch_data_samples)
        cause = None
    # Every process raises every cause: the launcher stops the others as soon as one
    # has exited, and the one that names the cause may not have printed it yet.
    causes = all_gather_object(cause)  # [cause] outside distributed training
    if len(causes) == 1 and cause is not None:
        raise NonFiniteError(f'{where}: {cause}')
    named = ' | '.join(f'rank {rank}: {text}' for rank, text in enumerate(causes)
                       if text is not None)
    if cause is None:
        named = 'another process met non-finite losses | ' + named
    raise NonFiniteError(f'{where}: {named}')
