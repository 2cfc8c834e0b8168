"""A checkpoint of another class set, fitted to the model: strict but for the class branches.

A detector trained on one class set (COCO's 80, the demo's 5 shapes) starts a training
run on another by loading every tensor of its checkpoint except the classifiers, whose
shapes follow the class count. Add the hook to the config that names the checkpoint:

.. code-block:: python

    load_from = 'work_dirs/demo/epoch_7.pth'
    custom_hooks = [dict(type='ddetr.FineTuneHook')]

``ddetr.FineTuneHook`` (:mod:`..engine.hooks.fine_tune_hook`) adapts the checkpoint as
MMEngine loads it (its ``after_load_checkpoint`` event, before the tensors are copied
into the model), with :func:`fit_class_branches`:

- a class branch (``bbox_head.cls_branches.N.weight`` / ``.bias``) whose class count
  differs from the model's keeps the model's own values, i.e. its initialisation (the
  runner initialises the model before it loads ``load_from``), and the log names it
  with both shapes. The two-stage model's proposal classifier is the exception: its
  row 0 is a class-agnostic objectness score (proposals are ranked by it and every
  object trains it), so it keeps the checkpoint's first rows, row 0 included;
- any other difference is an error that lists the keys: a tensor of another shape, a
  key the model lacks or a key the checkpoint lacks (a checkpoint of another variant).
  MMEngine alone would only warn and train from a half-loaded model.

Resuming (``--resume``) with the hook in the config loads strictly: a resumed run has
the same classes. Testing or validating a checkpoint of other classes is refused: its
class branches would be left untrained.
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models.dense_heads.deformable_detr_head import proposal_branch_index
from .state_dict import strip_ddp_prefix

CLASS_BRANCH = re.compile(r'^bbox_head\.cls_branches\.(\d+)\.(weight|bias)$')
MOST_KEYS = 30  # keys listed in an error; more are counted
# What mmdet's DeformableDETR lacks of ours: its GroupNorm-followed neck convs have no
# bias (ours start theirs at zero, which is what mmdet computes)
MMDET_MISSING = re.compile(r'^neck\.(convs|extra_convs)\.\d+\.conv\.bias$')


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model outside its class branches."""


def _listing(keys: Sequence[str]) -> str:
    shown = '\n  '.join(keys[:MOST_KEYS])
    more = f'\n  ... and {len(keys) - MOST_KEYS} more' if len(keys) > MOST_KEYS else ''
    return f'\n  {shown}{more}'


def _count(items: Sequence, noun: str) -> str:
    return f'{len(items)} {noun}' + ('' if len(items) == 1 else 's')


def _shape(t: torch.Tensor) -> str:
    return '(' + ', '.join(str(s) for s in t.shape) + ')'


def state_dict_of(checkpoint: dict) -> Dict[str, torch.Tensor]:
    """The state dict of a loaded checkpoint (MMEngine's, or a bare state dict).

    Raises:
        CheckpointMismatchError: not a dict, or an official Deformable-DETR checkpoint
            (a ``model`` entry), which must be converted first.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(f'a checkpoint must be a dict, got '
                                      f'{type(checkpoint).__name__}')
    if 'state_dict' not in checkpoint and isinstance(checkpoint.get('model'), dict):
        raise CheckpointMismatchError(
            'this looks like an official Deformable-DETR checkpoint (a "model" entry): '
            'convert it first with tools/model_converters/official_to_ours.py')
    return checkpoint.get('state_dict', checkpoint)


def proposal_class_branch(model: nn.Module) -> Optional[int]:
    """Index of the two-stage proposal classifier among ``bbox_head.cls_branches``.

    None unless the model is two-stage with a classifier of its own for the proposals
    (with box refinement); without refinement it is the decoder's shared classifier.
    """
    if not getattr(model, 'as_two_stage', False):
        return None
    branches = model.bbox_head.cls_branches
    index = proposal_branch_index(model.decoder.num_layers)
    return None if branches[index] is branches[0] else index


def fit_class_branches(model: nn.Module, state_dict: Dict[str, torch.Tensor],
                       allow_other_classes: bool = True,
                       may_miss: Optional[re.Pattern] = None) -> List[str]:
    """Makes ``state_dict`` load strictly into ``model``, for another class set.

    Class branches of another class count are replaced, in ``state_dict``, by the
    model's current values (its initialisation, before a checkpoint is loaded); the
    two-stage proposal classifier keeps the checkpoint's first rows (row 0 is the
    class-agnostic proposal score; the other rows are only ever trained as negatives,
    so any of them starts any other). Everything else must match exactly.

    Args:
        model: The detector about to load ``state_dict``, already initialised.
        state_dict: The checkpoint's state dict (keys with or without DDP's
            ``module.`` prefix); changed in place.
        allow_other_classes: False refuses class branches of other shapes too.
        may_miss: The model's keys that the checkpoint may lack (they keep the model's
            values); any other missing key is an error.

    Returns:
        One line per adapted tensor: its name, both shapes and what was done; and one
        per key of ``may_miss`` that the checkpoint lacks.

    Raises:
        CheckpointMismatchError: missing or unexpected keys, or tensors of other shapes
            (outside the class branches, or anywhere when ``allow_other_classes`` is
            False), each listed with both shapes.
    """
    own = model.state_dict()
    names = {key: strip_ddp_prefix(key) for key in state_dict}
    theirs = set(names.values())
    missing = [k for k in own if k not in theirs]
    kept = [k for k in missing if may_miss is not None and may_miss.match(k)]
    missing = [k for k in missing if k not in kept]
    unexpected = [names[k] for k in state_dict if names[k] not in own]
    proposal_branch = proposal_class_branch(model)
    lines, other_shapes, fitted_values = [], [], {}
    for key, value in state_dict.items():
        name = names[key]
        if name not in own or value.shape == own[name].shape:
            continue
        target = own[name]
        shapes = f'{name}: checkpoint {_shape(value)}, model {_shape(target)}'
        m = CLASS_BRANCH.match(name)
        if not (allow_other_classes and m and value.shape[1:] == target.shape[1:]):
            other_shapes.append(shapes)
            continue
        fitted_values[key], line = _fit_class_branch(value, target,
                                                     int(m[1]) == proposal_branch)
        lines.append(f'{shapes}: {line}')
    if missing or unexpected or other_shapes:
        raise CheckpointMismatchError(_mismatch_report(missing, unexpected, other_shapes,
                                                       allow_other_classes))
    state_dict.update(fitted_values)
    return lines + [f'{k}: not in the checkpoint, keeps the model\'s value' for k in kept]


def _fit_class_branch(value: torch.Tensor, target: torch.Tensor,
                      proposal: bool) -> Tuple[torch.Tensor, str]:
    """The model's class-branch tensor ``target`` with what it keeps of the checkpoint's
    ``value``, and a line saying what was done."""
    fitted = target.detach().clone()
    if not proposal:
        return fitted, 'another class count: not loaded, initialised as the model ' \
            'initialises it'
    rows = min(len(value), len(target))
    fitted[:rows] = value[:rows]
    line = (f'the two-stage proposal classifier: rows 0-{rows - 1} loaded (row 0 is the '
            'class-agnostic proposal score)' +
            (f', rows {rows}-{len(target) - 1} initialised' if rows < len(target) else ''))
    return fitted, line


def _mismatch_report(missing: Sequence[str], unexpected: Sequence[str],
                     other_shapes: Sequence[str], allow_other_classes: bool) -> str:
    """The message of a :class:`CheckpointMismatchError`: every problem, listed."""
    problems = []
    if missing:
        problems.append(f'{_count(missing, "key")} of the model missing from the '
                        'checkpoint:' + _listing(missing))
        if all(MMDET_MISSING.match(k) for k in missing):
            problems.append('(the neck conv biases only: an mmdet checkpoint? Convert '
                            'it with tools/model_converters/mmdet_to_ours.py)')
    if unexpected:
        problems.append(f'{_count(unexpected, "key")} of the checkpoint the model does '
                        'not have:' + _listing(unexpected))
    if other_shapes:
        why = ('' if allow_other_classes else
               ' (class branches of another class count are refused too: resuming, '
               'or a model not initialised for training)')
        problems.append(f'{_count(other_shapes, "tensor")} of the checkpoint with other '
                        f'shapes than the model\'s{why}:' + _listing(other_shapes))
    return 'the checkpoint does not fit the model:\n' + '\n'.join(problems)
