"""State-dict converters to this project's model: from mmdet 3.x and the official release.

- :func:`mmdet_to_ours`: mmdet 3.x's DeformableDETR has our layout key for key, but for
  one thing: our neck convs have a bias (as the paper's code, whose checkpoints then
  convert exactly), which mmdet's GroupNorm-followed convs drop. Their missing biases
  are zeros, which is what mmdet computes. (Loading mmdet's file directly with
  ``load_from`` works too: the biases, zero-initialised, are reported missing.)
- :func:`official_to_ours`: the official Deformable-DETR release
  (github.com/fundamentalvision/Deformable-DETR) holds ``backbone.0.body.*``
  (torchvision ResNet), ``input_proj.*``, ``transformer.*``, ``class_embed.*``,
  ``bbox_embed.*`` and ``query_embed.weight``. Its classifiers have 91 outputs indexed
  by COCO category id; ours have 80, in CocoDataset's order (:data:`COCO_IDS`). The
  two-stage model's extra classifier, which scores the encoder proposals, is not indexed
  by category: see :func:`official_to_ours`.

The command lines are ``tools/model_converters/{mmdet,official}_to_ours.py``; they load
their input with :func:`.safe_load.load_local_checkpoint`.
"""
import re
from collections import OrderedDict
from typing import Dict, Optional, Sequence

import torch

from ..models.dense_heads.deformable_detr_head import proposal_branch_index

# COCO category ids of CocoDataset's 80 classes, in label order.
COCO_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77,
    78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90
]

# -- mmdet 3.x -> ours -------------------------------------------------------------

# Top-level names of an mmdet DeformableDETR state dict.
MMDET_PREFIXES = ('backbone.', 'neck.', 'encoder.', 'decoder.', 'bbox_head.', 'level_embed',
                  'query_embedding.', 'reference_points_fc.', 'memory_trans_fc.',
                  'memory_trans_norm.', 'pos_trans_fc.', 'pos_trans_norm.')
MMDET_REQUIRED = ('level_embed', 'encoder.layers.0.self_attn.sampling_offsets.weight',
                  'decoder.layers.0.cross_attn.sampling_offsets.weight',
                  'bbox_head.cls_branches.0.weight', 'bbox_head.reg_branches.0.0.weight')
MMDET_NECK_CONV = re.compile(r'^neck\.(convs|extra_convs)\.(\d+)\.conv\.weight$')


def mmdet_to_ours(state_dict: Dict[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """Returns our state dict for an mmdet DeformableDETR ``state_dict``.

    Args:
        state_dict: The ``state_dict`` entry of an mmdet 3.x checkpoint.

    Raises:
        KeyError: keys a DeformableDETR needs are missing.
        ValueError: keys no DeformableDETR has are present.
    """
    missing = [k for k in MMDET_REQUIRED if k not in state_dict]
    if missing:
        raise KeyError('not an mmdet DeformableDETR state dict: missing ' + ', '.join(missing))
    unexpected = [k for k in state_dict if not k.startswith(MMDET_PREFIXES)]
    if unexpected:
        raise ValueError('unexpected keys for an mmdet DeformableDETR state dict: ' +
                         _some(unexpected))
    out = OrderedDict()
    for key, value in state_dict.items():
        out[key] = value
        if MMDET_NECK_CONV.match(key):
            bias = key[:-len('weight')] + 'bias'
            if bias not in state_dict:  # GroupNorm follows: mmdet left the bias out
                out[bias] = value.new_zeros(value.shape[0])
    return out


# -- official Deformable-DETR -> ours ----------------------------------------------

# (official pattern, ours); \1, \2 are layer indices.
OFFICIAL_RENAMES = [
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
OFFICIAL_ALIASES = re.compile(r'^transformer\.decoder\.(bbox_embed|class_embed)\.')
OFFICIAL_INPUT_PROJ = re.compile(r'^input_proj\.(\d+)\.([01])\.(weight|bias)$')
OFFICIAL_REQUIRED = ('transformer.level_embed', 'class_embed.0.weight',
                     'bbox_embed.0.layers.0.weight', 'input_proj.0.0.weight',
                     'transformer.encoder.layers.0.self_attn.value_proj.weight')


def _neck_key(key: str, num_backbone_levels: int) -> str:
    """Our neck key for an official ``input_proj.LEVEL.{0: conv, 1: GroupNorm}.*`` key."""
    level, part, kind = OFFICIAL_INPUT_PROJ.match(key).groups()
    level = int(level)
    name = 'conv' if part == '0' else 'gn'
    if level < num_backbone_levels:
        return f'neck.convs.{level}.{name}.{kind}'
    return f'neck.extra_convs.{level - num_backbone_levels}.{name}.{kind}'


def official_to_ours(model: Dict[str, torch.Tensor],
                     class_ids: Optional[Sequence[int]] = COCO_IDS
                     ) -> 'OrderedDict[str, torch.Tensor]':
    """Returns our state dict for an official Deformable-DETR ``model`` state dict.

    The decoder's classifiers (``class_embed.0`` .. ``class_embed.{L-1}``, L decoder
    layers) have one row per COCO category id; our row ``i`` is their row
    ``class_ids[i]``. The two-stage model's extra classifier (``class_embed.L``) scores
    the encoder's proposals: the official code, mmdet's and ours rank proposals by its
    channel 0 and train it with every object labelled 0, so its row 0 is a
    class-agnostic objectness score, not a category. That branch keeps its first
    ``len(class_ids)`` rows as they are: row 0 stays row 0, and the others, which every
    code only ever trains as negatives and never reads, fill the remaining rows.

    Args:
        model: The ``model`` entry of an official checkpoint.
        class_ids: Category id of each of our labels: decoder classifier rows are picked
            in this order. None keeps every classifier as it is (91 outputs).

    Raises:
        KeyError: keys every official model has are missing.
        ValueError: unknown keys, aliased head branches that disagree, a class id out of
            range, or a two-stage model whose encoder and decoder share one classifier
            (no box refinement) converted to fewer classes: no choice of rows keeps
            both the decoder's classes and the proposal score.
    """
    missing = [k for k in OFFICIAL_REQUIRED if k not in model]
    if missing:
        raise KeyError('not an official Deformable-DETR state dict: missing ' +
                       ', '.join(missing))
    # Backbone levels use 1x1 input projections; extra levels 3x3 stride-2 convs.
    num_backbone_levels = sum(1 for k, v in model.items()
                              if re.match(r'^input_proj\.\d+\.0\.weight$', k) and
                              v.shape[-1] == 1)
    encoder_branch = _encoder_class_branch(model)
    if encoder_branch is not None and class_ids is not None and not any(
            k.startswith('transformer.decoder.bbox_embed.') for k in model):
        raise ValueError(
            'a two-stage model without box refinement shares one classifier between the '
            'decoder (rows by COCO id) and the encoder proposals (row 0, class-agnostic): '
            'it cannot be reduced to fewer classes exactly; convert it with all classes '
            '(class_ids=None, --keep-classes)')
    out, unexpected = OrderedDict(), []
    for key, value in model.items():
        if OFFICIAL_ALIASES.match(key):
            _check_alias(model, key, value)
            continue
        new = _our_key(key, num_backbone_levels)
        if new is None:
            unexpected.append(key)
            continue
        if new.startswith('bbox_head.cls_branches.') and class_ids is not None:
            encoder = (encoder_branch is not None and
                       key.startswith(f'class_embed.{encoder_branch}.'))
            value = _class_rows(key, value, class_ids, encoder)
        out[new] = value
        # mmdet's BatchNorm counts batches; the official FrozenBatchNorm does not.
        if new.startswith('backbone.') and new.endswith('.running_mean'):
            out[new[:-len('running_mean')] + 'num_batches_tracked'] = torch.tensor(0)
    if unexpected:
        raise ValueError('unexpected keys for an official Deformable-DETR state dict: ' +
                         _some(unexpected))
    return out


def _check_alias(model: Dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    """Refuses a decoder alias of a head branch that is not a copy of the branch."""
    own = key[len('transformer.decoder.'):]
    if own not in model or not torch.equal(model[own], value):
        raise ValueError(f'{key} is not a copy of {own}: not a checkpoint this '
                         'converter understands')


def _our_key(key: str, num_backbone_levels: int) -> Optional[str]:
    """Our name of the official ``key``, or None if no rule knows it."""
    if OFFICIAL_INPUT_PROJ.match(key):
        return _neck_key(key, num_backbone_levels)
    for pattern, repl in OFFICIAL_RENAMES:
        new, n = re.subn('^' + pattern, repl, key)
        if n:
            return new
    return None


def _encoder_class_branch(model: Dict[str, torch.Tensor]) -> Optional[int]:
    """Index of the two-stage model's proposal classifier in ``class_embed``, else None.

    Only the two-stage model has ``transformer.enc_output``; its ``class_embed`` holds
    one branch per decoder layer, then the proposal classifier.
    """
    if 'transformer.enc_output.weight' not in model:
        return None
    layers = {int(m[1]) for k in model
              if (m := re.match(r'^transformer\.decoder\.layers\.(\d+)\.', k))}
    return proposal_branch_index(len(layers))


def _class_rows(key: str, value: torch.Tensor, class_ids: Sequence[int],
                encoder: bool) -> torch.Tensor:
    """The rows of official classifier tensor ``key`` for our labels (see
    :func:`official_to_ours`): by category id, or the first ones for the encoder's."""
    if encoder:
        if value.shape[0] < len(class_ids):
            raise ValueError(f'{key} has {value.shape[0]} rows, fewer than the '
                             f'{len(class_ids)} classes asked for')
        return value[:len(class_ids)]
    if value.shape[0] <= max(class_ids):
        raise ValueError(f'{key} has {value.shape[0]} classes; class id '
                         f'{max(class_ids)} is out of range')
    return value[list(class_ids)]


def _some(keys: Sequence[str], most: int = 20) -> str:
    """The first ``most`` keys, comma-separated, with ``...`` when there are more."""
    return ', '.join(keys[:most]) + (' ...' if len(keys) > most else '')
