"""Fine-tuning on another class set: ``load_from`` strictly, but for the class branches.

A detector trained on one class set (COCO's 80, the demo's 5 shapes) starts a training
run on another by loading every tensor of its checkpoint except the classifiers, whose
shapes follow the class count. Add the hook to the config that names the checkpoint:

.. code-block:: python

    load_from = 'work_dirs/demo/epoch_7.pth'
    custom_hooks = [dict(type='ddetr.FineTuneHook')]

Of a checkpoint saved with EMAHook, the EMA weights are loaded (its ``state_dict``);
``dict(type='ddetr.FineTuneHook', weights='raw')`` loads the weights training updated.

:class:`FineTuneHook` adapts the checkpoint as MMEngine loads it (its
``after_load_checkpoint`` event, before the tensors are copied into the model), with
:func:`fit_class_branches`:

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
import logging
import re
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from torch import nn

from .checkpoint.ema import WEIGHTS, pick_weights
from .registry import HOOKS

CLASS_BRANCH = re.compile(r'^bbox_head\.cls_branches\.(\d+)\.(weight|bias)$')
MOST_KEYS = 30  # keys listed in an error; more are counted


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


def proposal_class_branch(model: nn.Module) -> Optional[int]:
    """Index of the two-stage proposal classifier among ``bbox_head.cls_branches``.

    None unless the model is two-stage with a classifier of its own for the proposals
    (with box refinement); without refinement it is the decoder's shared classifier.
    """
    if not getattr(model, 'as_two_stage', False):
        return None
    branches = model.bbox_head.cls_branches
    index = model.decoder.num_layers
    return None if branches[index] is branches[0] else index


def fit_class_branches(model: nn.Module, state_dict: Dict[str, torch.Tensor],
                       allow_other_classes: bool = True) -> List[str]:
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

    Returns:
        One line per adapted tensor: its name, both shapes and what was done.

    Raises:
        CheckpointMismatchError: missing or unexpected keys, or tensors of other shapes
            (outside the class branches, or anywhere when ``allow_other_classes`` is
            False), each listed with both shapes.
    """
    own = model.state_dict()
    names = {key: re.sub(r'^module\.', '', key) for key in state_dict}
    theirs = set(names.values())
    missing = [k for k in own if k not in theirs]
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
        fitted = target.detach().clone()
        if int(m[1]) == proposal_branch:
            rows = min(len(value), len(target))
            fitted[:rows] = value[:rows]
            lines.append(f'{shapes}: the two-stage proposal classifier: rows 0-{rows - 1} '
                         f'loaded (row 0 is the class-agnostic proposal score)' +
                         (f', rows {rows}-{len(target) - 1} initialised'
                          if rows < len(target) else ''))
        else:
            lines.append(f'{shapes}: another class count: not loaded, initialised as '
                         'the model initialises it')
        fitted_values[key] = fitted

    if missing or unexpected or other_shapes:
        problems = []
        if missing:
            problems.append(f'{_count(missing, "key")} of the model missing from the '
                            'checkpoint:' + _listing(missing))
            if all(re.match(r'^neck\.(convs|extra_convs)\.\d+\.conv\.bias$', k)
                   for k in missing):
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
        raise CheckpointMismatchError('the checkpoint does not fit the model:\n' +
                                      '\n'.join(problems))
    state_dict.update(fitted_values)
    return lines


@HOOKS.register_module()
class FineTuneHook(Hook):
    """Loads ``load_from`` for fine-tuning on another class set: see the module doc.

    Strict: a key missing on either side or a tensor of another shape is a
    :class:`CheckpointMismatchError` listing them, except the class branches (and only
    their class dimension), which keep the model's initialisation when training starts
    from a checkpoint of another class count; the log names each, with both shapes.

    Args:
        weights: Of a checkpoint saved with EMAHook, ``'ema'`` (its ``state_dict``, what
            is loaded by default too) or ``'raw'`` (the weights training updated); see
            :func:`.checkpoint.ema.pick_weights`. A checkpoint without EMA weights is
            refused for either (:class:`~.checkpoint.ema.NoEMAWeightsError`).
    """
    priority = 'VERY_HIGH'  # before other hooks read the checkpoint

    def __init__(self, weights: Optional[str] = None) -> None:
        if weights is not None and weights not in WEIGHTS:
            pick_weights({}, weights)  # the error that lists the choices
        self.weights = weights

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not isinstance(checkpoint, dict):
            raise CheckpointMismatchError(f'a checkpoint must be a dict, got '
                                          f'{type(checkpoint).__name__}')
        if 'state_dict' not in checkpoint and isinstance(checkpoint.get('model'), dict):
            raise CheckpointMismatchError(
                'this looks like an official Deformable-DETR checkpoint (a "model" entry): '
                'convert it first with tools/model_converters/official_to_ours.py')
        model = getattr(runner.model, 'module', runner.model)
        # Resuming continues the same run; an uninitialised model (test, val) would keep
        # random class branches: neither may replace any tensor.
        fine_tuning = not getattr(runner, '_resume', False) and getattr(model, 'is_init',
                                                                        False)
        if self.weights is not None and not getattr(runner, '_resume', False):
            source = f'load_from ({getattr(runner, "_load_from", None)})'
            checkpoint['state_dict'] = dict(pick_weights(checkpoint, self.weights, source))
            print_log(f'FineTuneHook: loading the {self.weights} weights of the checkpoint',
                      logger='current')
        state_dict = checkpoint.get('state_dict', checkpoint)
        lines = fit_class_branches(model, state_dict, allow_other_classes=fine_tuning)
        old_classes = _classes((checkpoint.get('meta') or {}).get('dataset_meta'))
        new_classes = _classes(_train_metainfo(runner)) if fine_tuning else None
        if not lines:
            print_log('FineTuneHook: the checkpoint fits the model: every tensor loaded',
                      logger='current')
            if old_classes and new_classes and old_classes != new_classes:
                print_log(f'FineTuneHook: the checkpoint was trained on other classes '
                          f'({", ".join(old_classes)}) than the data set\'s '
                          f'({", ".join(new_classes)}), as many: its class branches are '
                          'loaded as they are (class i of the checkpoint starts class i)',
                          logger='current', level=logging.WARNING)
            return
        change = ' '.join(filter(None, [
            f'from {len(old_classes)} classes ({", ".join(old_classes)})' if old_classes else '',
            f'to {len(new_classes)} ({", ".join(new_classes)})' if new_classes else '']))
        print_log(f'FineTuneHook: {change + ": " if change else ""}{len(lines)} class-branch '
                  'tensors of the checkpoint have another class count; every other tensor '
                  'is loaded:\n  ' + '\n  '.join(lines), logger='current',
                  level=logging.WARNING)


def _classes(metainfo: Optional[dict]) -> Optional[List[str]]:
    """The class names of a data set's metainfo, if it has them."""
    classes = (metainfo or {}).get('classes') if isinstance(metainfo, dict) else None
    return [str(c) for c in classes] if classes else None


def _train_metainfo(runner) -> Optional[dict]:
    """The training set's metainfo, or None. Only called when training: then the
    train loop and its data loader are built before the checkpoint is loaded."""
    try:
        return runner.train_dataloader.dataset.metainfo
    except AttributeError:  # a data set without metainfo: the names are only for the log
        return None
