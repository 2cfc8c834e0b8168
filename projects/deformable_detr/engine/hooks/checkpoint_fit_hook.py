"""``ddetr.CheckpointFitHook``: a checkpoint to test must fit the model, tensor for tensor.

MMEngine loads ``load_from`` leniently: a tensor of another shape, a key the model lacks
and a key the checkpoint lacks are warnings in the log, and the run goes on with a
half-loaded model. Testing the checkpoint of another config, or of the same config
trained with other ``--cfg-options``, then reports a meaningless mAP (0.182 for the
demo's checkpoint of FFN 256 tested with FFN 512). ``tools/test.py`` adds this hook.
"""
import logging

from mmengine.hooks import Hook
from mmengine.logging import print_log

from ...checkpoint.class_branches import MMDET_MISSING, fit_class_branches, state_dict_of
from ...registry import HOOKS


@HOOKS.register_module()
class CheckpointFitHook(Hook):
    """Refuses a checkpoint that does not fit the model: every difference is a
    :class:`CheckpointMismatchError` that lists the keys, with both shapes.

    One difference is allowed, with a warning: the neck convolution biases that an
    mmdet checkpoint lacks (the model keeps its zeros, which is what mmdet computes).
    """
    priority = 'VERY_LOW'  # after FineTuneHook, which may pick a checkpoint's EMA weights

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = getattr(runner.model, 'module', runner.model)  # DDP, test-time aug.
        kept = fit_class_branches(model, state_dict_of(checkpoint), allow_other_classes=False,
                                  may_miss=MMDET_MISSING)
        if kept:
            print_log('the checkpoint lacks the neck conv biases (an mmdet checkpoint?): '
                      'they stay zero, as mmdet computes them:\n  ' + '\n  '.join(kept),
                      logger='current', level=logging.WARNING)
