"""Convert an mmdet 3.x DeformableDETR checkpoint to this project's model.

    python tools/model_converters/mmdet_to_ours.py mmdet_ckpt.pth ours.pth

The layouts are the same key for key, but for the neck conv biases that mmdet drops:
they are added as zeros, so that the result loads strictly. The conversion is
:func:`projects.deformable_detr.checkpoint.converters.mmdet_to_ours`.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402

from projects.deformable_detr.checkpoint.converters import mmdet_to_ours  # noqa: E402
from projects.deformable_detr.checkpoint import (allow_mmengine_checkpoints,  # noqa: E402
                                                 load_local_checkpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='mmdet checkpoint (.pth)')
    parser.add_argument('dst', help='where to write the converted checkpoint')
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
    torch.save(dict(state_dict=converted, meta=meta), args.dst)
    print(f'{len(converted)} tensors ({len(converted) - len(state_dict)} neck biases added) '
          f'-> {args.dst}')


if __name__ == '__main__':
    main()
