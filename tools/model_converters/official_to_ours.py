"""Convert an official Deformable-DETR release checkpoint to this project's model.

The official files (github.com/fundamentalvision/Deformable-DETR) hold
``{'model': state_dict, ...}`` with ``backbone.0.body.*`` (torchvision ResNet),
``input_proj.*``, ``transformer.*``, ``class_embed.*``, ``bbox_embed.*`` and
``query_embed.weight``. Their classifiers have 91 outputs indexed by COCO category
id; ours have 80, in CocoDataset's order.

    python tools/model_converters/official_to_ours.py r50_deformable_detr.pth ours.pth

Use the config of the same variant (plain / refine / refine-twostage,
single-scale or not) to load the result.
"""
import argparse
import re
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch

# COCO category ids of CocoDataset's 80 classes, in label order.
COCO_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77,
    78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90
]

# (official pattern, ours); \1, \2 are layer indices.
RENAMES = [
    (r'transformer\.level_embed', 'level_embed'),
    (r'query_embed\.weight', 'query_embedding.weight'),
    (r'transformer\.reference_points\.', 'reference_points_fc.'),
    (r'transformer\.enc_output\.', 'memory_trans_fc.'),
    (r'transformer\.enc_output_norm\.', 'memory_trans_norm.'),
    (r'transformer\.pos_trans\.', 'pos_trans_fc.'),
    (r'transformer\.pos_trans_norm\.', 'pos_trans_norm.'),
    # encoder layer: attention -> norm1, FFN -> norm2
    (r'transformer\.encoder\.layers\.(\d+)\.self_attn\.', r'encoder.layers.\1.self_attn.'),
    (r'transformer\.encoder\.layers\.(\d+)\.norm1\.', r'encoder.layers.\1.norms.0.'),
    (r'transformer\.encoder\.layers\.(\d+)\.norm2\.', r'encoder.layers.\1.norms.1.'),
    (r'transformer\.encoder\.layers\.(\d+)\.linear1\.', r'encoder.layers.\1.ffn.layers.0.0.'),
    (r'transformer\.encoder\.layers\.(\d+)\.linear2\.', r'encoder.layers.\1.ffn.layers.1.'),
    # decoder layer: self-attention -> norm2, cross-attention -> norm1, FFN -> norm3
    (r'transformer\.decoder\.layers\.(\d+)\.self_attn\.', r'decoder.layers.\1.self_attn.attn.'),
    (r'transformer\.decoder\.layers\.(\d+)\.cross_attn\.', r'decoder.layers.\1.cross_attn.'),
    (r'transformer\.decoder\.layers\.(\d+)\.norm2\.', r'decoder.layers.\1.norms.0.'),
    (r'transformer\.decoder\.layers\.(\d+)\.norm1\.', r'decoder.layers.\1.norms.1.'),
    (r'transformer\.decoder\.layers\.(\d+)\.norm3\.', r'decoder.layers.\1.norms.2.'),
    (r'transformer\.decoder\.layers\.(\d+)\.linear1\.', r'decoder.layers.\1.ffn.layers.0.0.'),
    (r'transformer\.decoder\.layers\.(\d+)\.linear2\.', r'decoder.layers.\1.ffn.layers.1.'),
    # head: MLP layers 0, 1, 2 sit at 0, 2, 4 of our Sequential (ReLUs between)
    (r'class_embed\.(\d+)\.', r'bbox_head.cls_branches.\1.'),
    (r'bbox_embed\.(\d+)\.layers\.0\.', r'bbox_head.reg_branches.\1.0.'),
    (r'bbox_embed\.(\d+)\.layers\.1\.', r'bbox_head.reg_branches.\1.2.'),
    (r'bbox_embed\.(\d+)\.layers\.2\.', r'bbox_head.reg_branches.\1.4.'),
    # torchvision and mmdet name ResNet the same way
    (r'backbone\.0\.body\.', 'backbone.'),
]
# The official model also registers the head branches inside the decoder (its
# "hack implementation" of refinement and two-stage): the same tensors again.
ALIASES = re.compile(r'^transformer\.decoder\.(bbox_embed|class_embed)\.')
INPUT_PROJ = re.compile(r'^input_proj\.(\d+)\.([01])\.(weight|bias)$')
REQUIRED = ('transformer.level_embed', 'class_embed.0.weight', 'bbox_embed.0.layers.0.weight',
            'input_proj.0.0.weight', 'transformer.encoder.layers.0.self_attn.value_proj.weight')


def load_checkpoint_file(path: str) -> dict:
    """torch.load with weights_only, allowing the plain types the official files hold
    (their ``args`` is an argparse.Namespace)."""
    safe = [argparse.Namespace, np.dtype, np.ndarray]
    safe += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith('DType')]
    multiarray = getattr(getattr(np, '_core', None) or getattr(np, 'core'), 'multiarray')
    safe.append(multiarray.scalar)
    with torch.serialization.safe_globals(safe):
        return torch.load(path, map_location='cpu', weights_only=True)


def _neck_key(key: str, num_backbone_levels: int) -> str:
    level, part, kind = INPUT_PROJ.match(key).groups()
    level = int(level)
    name = 'conv' if part == '0' else 'gn'
    if level < num_backbone_levels:
        return f'neck.convs.{level}.{name}.{kind}'
    return f'neck.extra_convs.{level - num_backbone_levels}.{name}.{kind}'


def convert(model: Dict[str, torch.Tensor],
            class_ids: Optional[list] = COCO_IDS) -> 'OrderedDict[str, torch.Tensor]':
    """Returns our state dict for an official Deformable-DETR ``model`` state dict.

    Args:
        model: The ``model`` entry of an official checkpoint.
        class_ids: Category id of each of our labels: classifier rows are picked in
            this order. None keeps the classifier as it is.

    Raises:
        KeyError: keys every official model has are missing.
        ValueError: unknown keys, or aliased head branches that disagree.
    """
    missing = [k for k in REQUIRED if k not in model]
    if missing:
        raise KeyError('not an official Deformable-DETR state dict: missing ' +
                       ', '.join(missing))
    # Backbone levels use 1x1 input projections; extra levels 3x3 stride-2 convs.
    num_backbone_levels = sum(1 for k, v in model.items()
                              if re.match(r'^input_proj\.\d+\.0\.weight$', k) and
                              v.shape[-1] == 1)
    out, unexpected = OrderedDict(), []
    for key, value in model.items():
        if ALIASES.match(key):
            own = key[len('transformer.decoder.'):]
            if own not in model or not torch.equal(model[own], value):
                raise ValueError(f'{key} is not a copy of {own}: not a checkpoint this '
                                 'converter understands')
            continue
        if INPUT_PROJ.match(key):
            out[_neck_key(key, num_backbone_levels)] = value
            continue
        for pattern, repl in RENAMES:
            new, n = re.subn('^' + pattern, repl, key)
            if n:
                break
        else:
            unexpected.append(key)
            continue
        if new.startswith('bbox_head.cls_branches.') and class_ids is not None:
            if value.shape[0] <= max(class_ids):
                raise ValueError(f'{key} has {value.shape[0]} classes; class id '
                                 f'{max(class_ids)} is out of range')
            value = value[class_ids]
        out[new] = value
        # mmdet's BatchNorm counts batches; the official FrozenBatchNorm does not.
        if new.startswith('backbone.') and new.endswith('.running_mean'):
            out[new[:-len('running_mean')] + 'num_batches_tracked'] = torch.tensor(0)
    if unexpected:
        raise ValueError('unexpected keys for an official Deformable-DETR state dict: ' +
                         ', '.join(unexpected[:20]) + (' ...' if len(unexpected) > 20 else ''))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='official checkpoint (.pth, with a "model" entry)')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    parser.add_argument('--keep-classes', action='store_true',
                        help='keep the classifier rows as they are (not COCO-91 indexed)')
    args = parser.parse_args()
    ckpt = load_checkpoint_file(args.src)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        raise SystemExit(f'{args.src}: expected an official checkpoint with a "model" dict')
    try:
        converted = convert(ckpt['model'], None if args.keep_classes else COCO_IDS)
    except (KeyError, ValueError) as err:
        raise SystemExit(f'{args.src}: {err}')
    torch.save(dict(state_dict=converted, meta=dict(converted_from='official')), args.dst)
    print(f'{len(ckpt["model"])} official tensors -> {len(converted)} tensors -> {args.dst}')


if __name__ == '__main__':
    main()
