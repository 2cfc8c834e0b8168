"""Checkpoint converters: mmdet -> ours, official Deformable-DETR -> ours."""
import argparse
import re

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.registry import init_default_scope

from projects.deformable_detr.converters import COCO_IDS, mmdet_to_ours, official_to_ours

pytestmark = pytest.mark.usefixtures('one_thread')


# -- mmdet -> ours ----------------------------------------------------------------


@pytest.mark.parametrize('variant', ['plain', 'twostage'])
def test_mmdet_checkpoint_loads_strictly_after_conversion(variant, tmp_path, build_pair,
                                                          run_tool):
    theirs, ours = build_pair(variant)
    converted = mmdet_to_ours(theirs.state_dict())
    ours.load_state_dict(converted, strict=True)
    assert all(converted[k].abs().sum() == 0 for k in converted if k.startswith('neck.') and
               k.endswith('conv.bias'))
    # The command line, on a file as mmengine saves it.
    src, dst = tmp_path / 'mmdet.pth', tmp_path / 'ours.pth'
    torch.save(dict(state_dict=theirs.state_dict(), meta=dict(epoch=50)), src)
    run_tool(['tools/model_converters/mmdet_to_ours.py', str(src), str(dst)])
    saved = torch.load(dst, weights_only=True)
    ours.load_state_dict(saved['state_dict'], strict=True)
    assert saved['meta']['epoch'] == 50


def test_mmdet_converter_errors(tmp_path, build_pair, run_tool):
    theirs, _ = build_pair('plain')
    state = theirs.state_dict()
    with pytest.raises(KeyError, match='level_embed'):
        mmdet_to_ours({k: v for k, v in state.items() if k != 'level_embed'})
    with pytest.raises(ValueError, match='roi_head.fc.weight'):
        mmdet_to_ours(dict(state, **{'roi_head.fc.weight': torch.zeros(1)}))
    src = tmp_path / 'bad.pth'
    torch.save(dict(state_dict={'foo': torch.zeros(1)}), src)
    result = run_tool(['tools/model_converters/mmdet_to_ours.py', str(src),
                       str(tmp_path / 'out.pth')], check=False)
    assert result.returncode != 0 and 'missing level_embed' in result.stderr


# -- official -> ours -------------------------------------------------------------

ENC = [('norms.0.', 'norm1.'), ('norms.1.', 'norm2.'), ('ffn.layers.0.0.', 'linear1.'),
       ('ffn.layers.1.', 'linear2.'), ('self_attn.', 'self_attn.')]
# The official decoder layer normalises with norm2 after self-attention, norm1 after
# cross-attention, norm3 after the FFN.
DEC = [('norms.0.', 'norm2.'), ('norms.1.', 'norm1.'), ('norms.2.', 'norm3.'),
       ('ffn.layers.0.0.', 'linear1.'), ('ffn.layers.1.', 'linear2.'),
       ('self_attn.attn.', 'self_attn.'), ('cross_attn.', 'cross_attn.')]
TOP = {'level_embed': 'transformer.level_embed', 'query_embedding.': 'query_embed.',
       'reference_points_fc.': 'transformer.reference_points.',
       'memory_trans_fc.': 'transformer.enc_output.',
       'memory_trans_norm.': 'transformer.enc_output_norm.',
       'pos_trans_fc.': 'transformer.pos_trans.', 'pos_trans_norm.': 'transformer.pos_trans_norm.'}


def to_official(state, num_backbone_levels, refine, two_stage, gen):
    """Writes our state dict the way the official code names it (91 classes)."""
    out = {}
    for key, value in state.items():
        if key.startswith('backbone.'):
            if not key.endswith('num_batches_tracked'):  # FrozenBatchNorm2d has none
                out['backbone.0.body.' + key[len('backbone.'):]] = value
            continue
        m = re.match(r'neck\.(convs|extra_convs)\.(\d+)\.(conv|gn)\.(weight|bias)$', key)
        if m:
            level = int(m[2]) + (num_backbone_levels if m[1] == 'extra_convs' else 0)
            out[f'input_proj.{level}.{0 if m[3] == "conv" else 1}.{m[4]}'] = value
            continue
        m = re.match(r'(encoder|decoder)\.layers\.(\d+)\.(.*)$', key)
        if m:
            for ours, theirs in ENC if m[1] == 'encoder' else DEC:
                if m[3].startswith(ours):
                    out[f'transformer.{m[1]}.layers.{m[2]}.{theirs}{m[3][len(ours):]}'] = value
                    break
            else:
                raise AssertionError(key)
            continue
        m = re.match(r'bbox_head\.cls_branches\.(\d+)\.(weight|bias)$', key)
        if m:  # 91 rows indexed by category id; the rows of unused ids are noise
            full = torch.randn((91, ) + value.shape[1:], generator=gen)
            full[COCO_IDS] = value
            out[f'class_embed.{m[1]}.{m[2]}'] = full
            continue
        m = re.match(r'bbox_head\.reg_branches\.(\d+)\.(\d)\.(.*)$', key)
        if m:
            out[f'bbox_embed.{m[1]}.layers.{int(m[2]) // 2}.{m[3]}'] = value
            continue
        prefix = next(p for p in TOP if key.startswith(p))
        out[TOP[prefix] + key[len(prefix):]] = value
    # The official model registers its head branches in the decoder as well.
    for key, value in list(out.items()):
        if (refine and key.startswith('bbox_embed.')) or (two_stage and
                                                          key.startswith('class_embed.')):
            out['transformer.decoder.' + key] = value.clone()
    return out


@pytest.mark.parametrize('variant', ['plain', 'refine', 'twostage', 'singlescale'])
def test_official_checkpoint_round_trip(variant, tmp_path, small_model_cfg, run_tool):
    init_default_scope('mmdet')
    name = ('deformable-detr-singlescale_r50_16xb2-50e_coco.py'
            if variant == 'singlescale' else variant)
    cfg = small_model_cfg(name)
    gen = torch.Generator().manual_seed(0)
    source = MODELS.build(cfg)
    with torch.no_grad():
        for p in source.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    levels = len(cfg.neck.in_channels)
    official = to_official(source.state_dict(), levels, cfg.get('with_box_refine', False),
                           cfg.get('as_two_stage', False), gen)
    # Spot-check names of the official code.
    assert 'transformer.decoder.layers.0.self_attn.in_proj_weight' in official
    assert 'backbone.0.body.layer4.1.bn2.running_var' in official
    assert ('input_proj.3.0.weight' in official) == (variant != 'singlescale')
    converted = official_to_ours(official)
    target = MODELS.build(cfg)
    target.load_state_dict(converted, strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key

    # The command line, on a file shaped like the releases (args is a Namespace).
    src, dst = tmp_path / 'official.pth', tmp_path / 'ours.pth'
    torch.save(dict(model=official, args=argparse.Namespace(two_stage=False)), src)
    run_tool(['tools/model_converters/official_to_ours.py', str(src), str(dst)])
    target.load_state_dict(torch.load(dst, weights_only=True)['state_dict'], strict=True)


def test_official_converter_errors(small_model_cfg):
    init_default_scope('mmdet')
    cfg = small_model_cfg('refine')
    gen = torch.Generator().manual_seed(0)
    official = to_official(MODELS.build(cfg).state_dict(), 3, True, False, gen)
    with pytest.raises(KeyError, match='transformer.level_embed'):
        official_to_ours({k: v for k, v in official.items()
                                  if k != 'transformer.level_embed'})
    with pytest.raises(ValueError, match='transformer.foo'):
        official_to_ours(dict(official, **{'transformer.foo': torch.zeros(1)}))
    broken = dict(official)
    broken['transformer.decoder.bbox_embed.0.layers.0.bias'] = torch.zeros(256)
    with pytest.raises(ValueError, match='not a copy'):
        official_to_ours(broken)
    # Custom classes: --keep-classes keeps the rows as they are.
    kept = official_to_ours(official, class_ids=None)
    assert kept['bbox_head.cls_branches.0.weight'].shape[0] == 91
