"""Convert an mmdet 3.x DeformableDETR checkpoint to this project's model.

    python tools/model_converters/mmdet_to_ours.py mmdet_ckpt.pth ours.pth

The layouts are the same key for key, but for the neck conv biases that mmdet drops:
they are added as zeros, so that the result loads strictly. The conversion is
:func:`projects.deformable_detr.checkpoint.converters.mmdet_to_ours`. A checkpoint saved with
MMEngine's EMAHook keeps both of its weight sets (``--weights ema|raw``: one alone).
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402

from projects.deformable_detr.checkpoint.converters import mmdet_to_ours  # noqa: E402
from projects.deformable_detr.checkpoint import (allow_mmengine_checkpoints,  # noqa: E402
                                                 load_local_checkpoint)
from projects.deformable_detr.checkpoint.ema import (WEIGHTS, convert_ema,  # noqa: E402
                                                     has_ema, pick_weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='mmdet checkpoint (.pth)')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    parser.add_argument('--weights', choices=WEIGHTS,
                        help='of a checkpoint saved with EMAHook, write one weight set '
                        'alone: ema (its state_dict) or raw (the weights training updated); '
                        'by default both are carried over, as EMAHook saved them')
    args = parser.parse_args()
    allow_mmengine_checkpoints()  # the input may be an MMEngine checkpoint (torch>=2.6)
    ckpt = load_local_checkpoint(args.src, map_location='cpu')
    state_dict = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state_dict, dict):
        raise SystemExit(f'{args.src}: expected a dict of tensors or a dict with "state_dict"')
    try:
        converted = mmdet_to_ours(state_dict)
    except (KeyError, ValueError) as err:
        raise SystemExit(f'{args.src}: {err}')
    meta = dict(ckpt.get('meta', {}), converted_from='mmdet')
    out = dict(state_dict=converted, meta=meta)
    if args.weights is not None:  # one set, alone
        try:
            picked = pick_weights(ckpt, args.weights, args.src)
        except ValueError as err:
            raise SystemExit(str(err))
        out['state_dict'] = mmdet_to_ours(picked)
    elif has_ema(ckpt):  # both sets, as EMAHook saved them
        out['ema_state_dict'] = convert_ema(ckpt['ema_state_dict'], mmdet_to_ours)
    torch.save(out, args.dst)
    ema = (f'the {args.weights} weights' if args.weights else
           'EMA and raw weights' if 'ema_state_dict' in out else 'no EMA weights')
    print(f'{len(converted)} tensors ({len(converted) - len(state_dict)} neck biases added), '
          f'{ema} -> {args.dst}')


if __name__ == '__main__':
    main()
