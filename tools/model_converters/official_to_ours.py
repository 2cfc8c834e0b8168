"""Convert an official Deformable-DETR release checkpoint to this project's model.

    python tools/model_converters/official_to_ours.py r50_deformable_detr.pth ours.pth

The official classifiers have 91 outputs indexed by COCO category id; ours have 80, in
CocoDataset's order (``--keep-classes`` keeps all 91). The two-stage model's proposal
classifier is class-agnostic (its channel 0 ranks the encoder proposals): it keeps its
first 80 rows, channel 0 included. Use the config of the same variant (plain / refine /
refine-twostage, single-scale or not) to load the result; with ``--keep-classes``, set
``model.bbox_head.num_classes=91``.
The renaming is :func:`projects.deformable_detr.checkpoint.converters.official_to_ours`.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402

from projects.deformable_detr.checkpoint.converters import COCO_IDS, official_to_ours  # noqa: E402
from projects.deformable_detr.checkpoint import (allow_mmengine_checkpoints,  # noqa: E402
                                                 load_local_checkpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='official checkpoint (.pth, with a "model" entry)')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    parser.add_argument('--keep-classes', action='store_true',
                        help='keep all 91 classifier rows as they are (for a model with '
                        'num_classes=91)')
    args = parser.parse_args()
    allow_mmengine_checkpoints()  # the input may be an MMEngine checkpoint (torch>=2.6)
    ckpt = load_local_checkpoint(args.src, map_location='cpu')
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        raise SystemExit(f'{args.src}: expected an official checkpoint with a "model" dict')
    try:
        converted = official_to_ours(ckpt['model'], None if args.keep_classes else COCO_IDS)
    except (KeyError, ValueError) as err:
        raise SystemExit(f'{args.src}: {err}')
    torch.save(dict(state_dict=converted, meta=dict(converted_from='official')), args.dst)
    print(f'{len(ckpt["model"])} official tensors -> {len(converted)} tensors -> {args.dst}')


if __name__ == '__main__':
    main()
