"""``ddetr.FineTuneHook``: ``load_from`` strictly, but for the class branches.

Added to the config that names the checkpoint, it fits the checkpoint to the model as
MMEngine loads it (see :mod:`...checkpoint.class_branches`).

Of a checkpoint saved with EMAHook, the EMA weights are loaded (its ``state_dict``);
``dict(type='ddetr.FineTuneHook', weights='raw')`` loads the weights training updated.
"""
import logging
from typing import List, Optional

from mmengine.hooks import Hook
from mmengine.logging import print_log

from ...checkpoint.class_branches import fit_class_branches, state_dict_of
from ...checkpoint.ema import WEIGHTS, pick_weights
from ...registry import HOOKS


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
            :func:`...checkpoint.ema.pick_weights`. A checkpoint without EMA weights is
            refused for either (:class:`~...checkpoint.ema.NoEMAWeightsError`).
    """
    priority = 'VERY_HIGH'  # before other hooks read the checkpoint

    def __init__(self, weights: Optional[str] = None) -> None:
        if weights is not None and weights not in WEIGHTS:
            pick_weights({}, weights)  # the error that lists the choices
        self.weights = weights

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state_dict_of(checkpoint)  # a checkpoint of ours, or a clear error
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
