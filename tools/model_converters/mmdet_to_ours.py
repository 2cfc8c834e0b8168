"""Convert an mmdet 3.x DeformableDETR checkpoint to this project's model.

The layouts are the same key for key, but for one thing: our neck convs have a
bias (as the paper's code, whose checkpoints then convert exactly), which mmdet's
GroupNorm-followed convs drop. Their missing biases are zeros, which is what
mmdet computes. (Loading mmdet's file directly with ``load_from`` works too:
the biases, zero-initialised, are reported missing.)

    python tools/model_converters/mmdet_to_ours.py mmdet_ckpt.pth ours.pth
"""
import argparse
import re
from collections import OrderedDict
from typing import Dict

import numpy as np
import torch

# Top-level names of an mmdet DeformableDETR state dict.
KNOWN_PREFIXES = ('backbone.', 'neck.', 'encoder.', 'decoder.', 'bbox_head.', 'level_embed',
                  'query_embedding.', 'reference_points_fc.', 'memory_trans_fc.',
                  'memory_trans_norm.', 'pos_trans_fc.', 'pos_trans_norm.')
REQUIRED = ('level_embed', 'encoder.layers.0.self_attn.sampling_offsets.weight',
            'decoder.layers.0.cross_attn.sampling_offsets.weight',
            'bbox_head.cls_branches.0.weight', 'bbox_head.reg_branches.0.0.weight')
NECK_CONV = re.compile(r'^neck\.(convs|extra_convs)\.(\d+)\.conv\.weight$')


def load_checkpoint_file(path: str) -> dict:
    """torch.load with weights_only, allowing the few plain types checkpoints hold."""
    safe = [argparse.Namespace, np.dtype, np.ndarray]
    safe += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith('DType')]
    multiarray = getattr(getattr(np, '_core', None) or getattr(np, 'core'), 'multiarray')
    safe.append(multiarray.scalar)
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
        safe.append(HistoryBuffer)
    except ImportError:
        pass
    with torch.serialization.safe_globals(safe):
        return torch.load(path, map_location='cpu', weights_only=True)


def convert(state_dict: Dict[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """Returns our state dict for an mmdet DeformableDETR ``state_dict``.

    Raises:
        KeyError: keys a DeformableDETR needs are missing.
        ValueError: keys no DeformableDETR has are present.
    """
    missing = [k for k in REQUIRED if k not in state_dict]
    if missing:
        raise KeyError('not an mmdet DeformableDETR state dict: missing ' + ', '.join(missing))
    unexpected = [k for k in state_dict if not k.startswith(KNOWN_PREFIXES)]
    if unexpected:
        raise ValueError('unexpected keys for an mmdet DeformableDETR state dict: ' +
                         ', '.join(unexpected[:20]) + (' ...' if len(unexpected) > 20 else ''))
    out = OrderedDict()
    for key, value in state_dict.items():
        out[key] = value
        if NECK_CONV.match(key):
            bias = key[:-len('weight')] + 'bias'
            if bias not in state_dict:  # GroupNorm follows: mmdet left the bias out
                out[bias] = value.new_zeros(value.shape[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='mmdet checkpoint (.pth)')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    args = parser.parse_args()
    ckpt = load_checkpoint_file(args.src)
    state_dict = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state_dict, dict):
        raise SystemExit(f'{args.src}: expected a dict of tensors or a dict with "state_dict"')
    try:
        converted = convert(state_dict)
    except (KeyError, ValueError) as err:
        raise SystemExit(f'{args.src}: {err}')
    meta = dict(ckpt.get('meta', {}), converted_from='mmdet')
    torch.save(dict(state_dict=converted, meta=meta), args.dst)
    print(f'{len(converted)} tensors ({len(converted) - len(state_dict)} neck biases added) '
          f'-> {args.dst}')


if __name__ == '__main__':
    main()
