"""State dicts as DDP saves them, and the strict load of a detector's weights."""
import re
from typing import Dict, List

import torch
from mmengine.runner import load_checkpoint
from torch import nn

DDP_PREFIX = r'^module\.'  # what a model wrapped in DistributedDataParallel saves before keys


def strip_ddp_prefix(key: str) -> str:
    """``key`` without the ``module.`` prefix of a DDP-wrapped model's state dict."""
    return re.sub(DDP_PREFIX, '', key)


def load_weights(model: nn.Module, checkpoint: str) -> None:
    """Loads a checkpoint strictly: every key, every shape, and shared weights equal.

    Raises:
        RuntimeError: MMEngine's strict-load error, which lists the missing and
            unexpected keys and the shape mismatches (a checkpoint of another variant
            or size).
        ValueError: the checkpoint holds different weights for parameters that this
            model shares (e.g. the head branches of a with_box_refine checkpoint loaded
            into a model without box refinement, whose keys are the same): a strict
            load alone would keep the last of them silently.
    """
    ckpt = load_checkpoint(model, checkpoint, map_location='cpu', strict=True,
                           revise_keys=[(DDP_PREFIX, '')])
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else ckpt
    state = {strip_ddp_prefix(k): v for k, v in state.items()}
    shared: Dict[int, List[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        shared.setdefault(id(tensor), []).append(name)
    for names in shared.values():
        different = [n for n in names[1:] if not torch.equal(state[n], state[names[0]])]
        if different:
            raise ValueError(
                f'{checkpoint} holds different weights for {names[0]} and {different}, '
                'which this model shares (one module repeated): it is a checkpoint of '
                'another variant (with_box_refine gives every decoder layer its own head '
                'branches)')
