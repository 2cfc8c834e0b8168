"""The two weight sets of a checkpoint saved with MMEngine's ``EMAHook``.

``EMAHook`` saves the EMA weights as the checkpoint's ``state_dict``, so that testing,
inference, export and fine-tuning use them as they are, and the training ("raw")
weights in ``ema_state_dict``, under ``module.`` keys, beside the averaging's ``steps``
(the EMA model's own state). Resuming with the hook swaps them back.

:func:`pick_weights` gives either set by name, for the fine-tuning hook's and the
converter's ``weights`` option; :func:`convert_ema` carries an ``ema_state_dict`` through
a key conversion.
"""
from typing import Callable, Dict, Optional

import torch

_PREFIX = 'module.'  # MMEngine's averaged model keeps the model as its ``module``

WEIGHTS = ('ema', 'raw')  # the EMA weights, or the weights training updated


class NoEMAWeightsError(ValueError):
    """An EMA weight set was asked for from a checkpoint that holds none."""


def has_ema(checkpoint: object) -> bool:
    """Whether ``checkpoint`` was saved with ``EMAHook`` (holds ``ema_state_dict``)."""
    return isinstance(checkpoint, dict) and isinstance(checkpoint.get('ema_state_dict'), dict)


def pick_weights(checkpoint: dict, weights: str, source: str = 'the checkpoint'
                 ) -> Dict[str, torch.Tensor]:
    """One weight set of an EMA checkpoint, as a state dict of the model.

    Args:
        checkpoint: A checkpoint saved with ``EMAHook``.
        weights: ``'ema'`` (its ``state_dict``) or ``'raw'`` (the training weights of its
            ``ema_state_dict``).
        source: What the checkpoint is, for the errors (its file name, say).

    Raises:
        ValueError: ``weights`` is neither.
        NoEMAWeightsError: the checkpoint holds no EMA weights.
    """
    if weights not in WEIGHTS:
        raise ValueError(f'weights={weights!r}: one of {", ".join(map(repr, WEIGHTS))} '
                         '(the EMA weights, or the weights training updated)')
    if not has_ema(checkpoint):
        raise NoEMAWeightsError(
            f'weights={weights!r}: {source} holds no EMA weights (no "ema_state_dict"; it '
            'was saved without EMAHook), so there is no EMA or raw set to choose; leave '
            '`weights` unset to load its state_dict')
    if weights == 'ema':
        return checkpoint['state_dict']
    return {k[len(_PREFIX):]: v for k, v in checkpoint['ema_state_dict'].items()
            if k.startswith(_PREFIX)}


def convert_ema(ema_state_dict: Dict[str, torch.Tensor],
                convert: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]
                ) -> Optional[Dict[str, torch.Tensor]]:
    """``ema_state_dict`` with its model weights (``module.*``) passed through ``convert``
    (a state-dict converter) and its other entries (``steps``) kept."""
    model = {k[len(_PREFIX):]: v for k, v in ema_state_dict.items() if k.startswith(_PREFIX)}
    rest = {k: v for k, v in ema_state_dict.items() if not k.startswith(_PREFIX)}
    return dict(rest, **{_PREFIX + k: v for k, v in convert(model).items()})
