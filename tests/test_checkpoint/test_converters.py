"""Checkpoint converters: mmdet -> ours, official Deformable-DETR -> ours."""
import argparse
import copy
import re

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.registry import init_default_scope

from projects.deformable_detr.checkpoint import converters
from projects.deformable_detr.checkpoint.converters import mmdet_to_ours, official_to_ours

pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.numerics]

# The official model's classifier rows are COCO category ids 1..90 (row 0 unused); COCO
# 2017 leaves 10 of them without a category (the test's own list, not the converter's).
UNUSED_COCO_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_IDS = [i for i in range(1, 91) if i not in UNUSED_COCO_IDS]
# Spot checks of the order, by name: (mmdet CocoDataset label, its COCO category id).
COCO_NAMED_IDS = {'person': 1, 'stop sign': 13, 'backpack': 27, 'dining table': 67,
                  'tv': 72, 'toothbrush': 90}


def test_coco_ids_are_cocos_category_ids():
    from mmdet.datasets import CocoDataset
    classes = CocoDataset.METAINFO['classes']
    assert len(COCO_IDS) == len(classes) == 80
    for name, category_id in COCO_NAMED_IDS.items():
        assert COCO_IDS[classes.index(name)] == category_id, name
    assert converters.COCO_IDS == COCO_IDS


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


def test_mmdet_two_stage_checkpoint_picks_the_same_proposals(build_pair, small_model_cfg,
                                                             make_batch):
    """mmdet 3.3 ranks the encoder proposals by channel 0 of its proposal classifier and
    trains it with every object labelled 0, as we do: the converter keeps its rows as
    they are, and both models pick the same top-k proposals, in the same order."""
    # (seed 1: weights with which the padding constant below ranks under the real
    # proposals of both images, so that every pick is a real choice; checked below)
    theirs, _ = build_pair('twostage', seed=1)
    ours = MODELS.build(small_model_cfg('twostage'))
    ours.load_state_dict(mmdet_to_ours(theirs.state_dict()), strict=True)
    inputs, samples = make_batch(img_shapes=((64, 96), (48, 72)), num_gts=(1, 1))
    picked = {}
    for name, model, references in (('mmdet', theirs, lambda out: out[0]['reference_points']),
                                    ('ours', ours, lambda out: out[2])):
        pre_decoder = model.pre_decoder

        def record(*args, name=name, pre_decoder=pre_decoder, references=references,
                   **kwargs):
            out = pre_decoder(*args, **kwargs)
            picked[name] = references(out)
            return out

        model.pre_decoder = record
        model.eval()
        with torch.no_grad():
            model(inputs, copy.deepcopy(samples), mode='predict')
    # The proposals' boxes, in rank order: another proposal would be another pixel's box.
    assert picked['ours'].shape == picked['mmdet'].shape == (2, ours.num_queries, 4)
    # Boxes in [0, 1] from two float32 computations of the same encoder (ours and mmcv's
    # grid_sample path): each a chain of sums of up to a few hundred terms, so a few
    # hundred eps32 (1.2e-7) of the unit scale; 1e-5 = 84 eps32.
    torch.testing.assert_close(picked['ours'], picked['mmdet'], rtol=0, atol=1e-5)
    # Real proposals only. (Padding and border proposals all score one constant, the
    # classifier of a zeroed memory, and come out as boxes of ones: untrained weights
    # may rank that constant above real proposals, which training then pushes down.
    # The official code, mmdet and ours alike.)
    assert ((picked['ours'] > 0) & (picked['ours'] < 1)).all()


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


VARIANTS = {  # the official release's variants, by our config names
    'singlescale': 'deformable-detr-singlescale_r50_16xb2-50e_coco.py',
    'dc5': 'deformable-detr-singlescale-dc5_r50_16xb2-50e_coco.py',
    'plain': 'plain', 'refine': 'refine', 'twostage': 'twostage'}


def variant_cfg(variant, small_model_cfg, num_classes=80):
    """A small model config of an official variant (DC5 needs a Bottleneck ResNet)."""
    cfg = small_model_cfg(VARIANTS[variant])
    if variant == 'dc5':
        cfg.backbone.depth = 50
        cfg.neck.in_channels = [2048]
    cfg.bbox_head.num_classes = num_classes
    return cfg


def perturbed_model(cfg, seed):
    """The model of ``cfg``, initialised, then every parameter and float buffer
    perturbed with normal noise: no zero, one or repeated value hides a mix-up."""
    torch.manual_seed(seed)
    model = MODELS.build(cfg)
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith('running_var'):  # stays positive
                b.mul_(torch.exp(0.2 * torch.randn(b.shape, generator=gen)))
            elif b.is_floating_point():
                b.add_(0.1 * torch.randn(b.shape, generator=gen))
    return model.eval()


def to_official(state, cfg, gen):
    """Writes our state dict the way the official code names it, with 91 classes.

    An 80-class classifier is spread over 91 rows: a decoder layer's rows at their
    COCO ids, the two-stage proposal classifier's rows first (its row 0 is the
    class-agnostic score the official model ranks proposals by); the other rows are
    noise. A 91-class classifier is written as it is.
    """
    num_backbone_levels = len(cfg.neck.in_channels)
    refine, two_stage = cfg.get('with_box_refine', False), cfg.get('as_two_stage', False)
    encoder_branch = cfg.decoder.num_layers if two_stage else None
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
        if m:
            if value.shape[0] != 91:
                full = torch.randn((91, ) + value.shape[1:], generator=gen)
                rows = (list(range(len(value))) if int(m[1]) == encoder_branch else COCO_IDS)
                full[rows] = value
                value = full
            out[f'class_embed.{m[1]}.{m[2]}'] = value
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
    cfg = variant_cfg(variant, small_model_cfg)
    gen = torch.Generator().manual_seed(0)
    source = perturbed_model(cfg, seed=0)
    official = to_official(source.state_dict(), cfg, gen)
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
    if variant == 'twostage':  # --keep-classes: every classifier as it is
        run_tool(['tools/model_converters/official_to_ours.py', str(src), str(dst),
                  '--keep-classes'])
        kept = torch.load(dst, weights_only=True)['state_dict']
        for i in range(cfg.decoder.num_layers + 1):
            assert torch.equal(kept[f'bbox_head.cls_branches.{i}.weight'],
                               official[f'class_embed.{i}.weight'])


def transformer_outputs(model, inputs, samples):
    """Every decoder layer's logits and boxes, the initial references (two-stage: the
    top-k proposals, in rank order) and the encoder's proposal logits."""
    with torch.no_grad():
        outs = model.forward_transformer(model.extract_feat(inputs), copy.deepcopy(samples))
        logits, boxes = model.bbox_head(outs['hidden_states'], outs['references'])
    return dict(logits=logits, boxes=boxes, references=outs['references'][0],
                enc_logits=outs['enc_outputs_class'])


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_official_80_classes_compute_what_91_do(variant, small_model_cfg, make_batch):
    """The official model's weights as they are (``--keep-classes``: 91 outputs, the
    official model's computation) and converted to 80 classes: the same boxes for every
    query, the same top-k proposals, the logits of the 80 classes equal.

    Two images of different sizes (padding masks, valid ratios < 1) and perturbed weights.
    """
    init_default_scope('mmdet')
    cfg91 = variant_cfg(variant, small_model_cfg, num_classes=91)
    official = to_official(perturbed_model(cfg91, seed=1).state_dict(), cfg91,
                           torch.Generator().manual_seed(1))
    model91, model80 = MODELS.build(cfg91), MODELS.build(variant_cfg(variant, small_model_cfg))
    model91.load_state_dict(official_to_ours(official, class_ids=None), strict=True)
    model80.load_state_dict(official_to_ours(official), strict=True)
    inputs, samples = make_batch(img_shapes=((64, 96), (48, 72)), num_gts=(1, 1))
    out91 = transformer_outputs(model91.eval(), inputs, samples)
    out80 = transformer_outputs(model80.eval(), inputs, samples)

    # Same proposals (two-stage), picked in the same order; same queries otherwise.
    assert torch.equal(out80['references'], out91['references'])
    # The same float32 arithmetic in both models but the classifiers' widths (80 or 91
    # rows), which may change a GEMM's blocking and so its summation order: boxes in
    # [0, 1] within a few eps32 (1e-6 = 8 eps32); logits, sums of embed_dims products of
    # magnitude below one, within embed_dims * eps32 of their scale (at most 1e-5).
    torch.testing.assert_close(out80['boxes'], out91['boxes'], rtol=0, atol=1e-6)
    torch.testing.assert_close(out80['logits'], out91['logits'][..., COCO_IDS],
                               rtol=0, atol=1e-5)
    if variant == 'twostage':
        enc80, enc91 = out80['enc_logits'], out91['enc_logits']
        assert enc80.shape[-1] == 80 and enc91.shape[-1] == 91
        torch.testing.assert_close(enc80[..., 0], enc91[..., 0], rtol=0, atol=1e-5)
        torch.testing.assert_close(enc80, enc91[..., :80], rtol=0, atol=1e-5)
        # the proposals are a real choice (fewer than half the pixels, scores that
        # differ), inside each image (none from the padding)
        assert out80['references'].shape[1] == model80.num_queries < enc80.shape[1] // 2
        assert enc80[..., 0].std() > 0.1
        assert ((out80['references'] > 0) & (out80['references'] < 1)).all()
    else:
        assert out80['enc_logits'] is None


def test_official_converter_errors(small_model_cfg):
    init_default_scope('mmdet')
    cfg = small_model_cfg('refine')
    gen = torch.Generator().manual_seed(0)
    official = to_official(MODELS.build(cfg).state_dict(), cfg, gen)
    with pytest.raises(KeyError, match='transformer.level_embed'):
        official_to_ours({k: v for k, v in official.items()
                          if k != 'transformer.level_embed'})
    with pytest.raises(ValueError, match='transformer.foo'):
        official_to_ours(dict(official, **{'transformer.foo': torch.zeros(1)}))
    broken = dict(official)
    broken['transformer.decoder.bbox_embed.0.layers.0.bias'] = torch.zeros(256)
    with pytest.raises(ValueError, match='not a copy'):
        official_to_ours(broken)
    with pytest.raises(ValueError, match='class id 95 is out of range'):
        official_to_ours(official, class_ids=[1, 95])
    # Custom classes: --keep-classes keeps the rows as they are.
    kept = official_to_ours(official, class_ids=None)
    assert kept['bbox_head.cls_branches.0.weight'].shape[0] == 91


def test_official_two_stage_with_a_shared_classifier_keeps_all_classes(small_model_cfg):
    """Two-stage without refinement: one classifier serves the decoder (rows by COCO id)
    and the proposals (row 0); only the 91-class conversion is exact."""
    init_default_scope('mmdet')
    cfg = variant_cfg('twostage', small_model_cfg, num_classes=91)
    cfg.with_box_refine = False
    official = to_official(MODELS.build(cfg).state_dict(), cfg, None)
    assert 'transformer.decoder.class_embed.2.weight' in official  # the proposal branch
    with pytest.raises(ValueError, match='shares one classifier.*--keep-classes'):
        official_to_ours(official)
    MODELS.build(cfg).load_state_dict(official_to_ours(official, class_ids=None), strict=True)


# The official code's layers, written from its definitions (models/deformable_transformer.py
# and models/ops/modules/ms_deform_attn.py of fundamentalvision/Deformable-DETR), on its own
# parameter names: the converter's output must compute what these compute on its input.
# (The round trip above cannot see a mix-up that the converter and to_official share.)

def _official_linear(sd, name, x):
    return torch.nn.functional.linear(x, sd[name + '.weight'], sd[name + '.bias'])


def _official_norm(sd, name, x):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[name + '.weight'],
                                          sd[name + '.bias'])


def _official_ms_deform_attn(sd, name, query, reference_points, input_flatten, shapes,
                             start_index, heads, levels, points):
    """MSDeformAttn.forward, 2-d reference points, no padding."""
    from ops import multi_scale_deformable_attn_pytorch
    n, len_q, dims = query.shape
    value = _official_linear(sd, name + '.value_proj', input_flatten)
    value = value.view(n, input_flatten.shape[1], heads, dims // heads)
    offsets = _official_linear(sd, name + '.sampling_offsets', query).view(
        n, len_q, heads, levels, points, 2)
    weights = _official_linear(sd, name + '.attention_weights', query).view(
        n, len_q, heads, levels * points).softmax(-1).view(n, len_q, heads, levels, points)
    normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
    locations = reference_points[:, :, None, :, None, :] \
        + offsets / normalizer[None, None, None, :, None, :]
    out = multi_scale_deformable_attn_pytorch(value, shapes, start_index, locations, weights)
    return _official_linear(sd, name + '.output_proj', out)


def _official_ffn(sd, prefix, x, norm):
    hidden = torch.relu(_official_linear(sd, prefix + 'linear1', x))
    return _official_norm(sd, prefix + norm, x + _official_linear(sd, prefix + 'linear2', hidden))


def test_official_layers_compute_what_the_converted_ones_do(small_model_cfg):
    init_default_scope('mmdet')
    cfg = variant_cfg('refine', small_model_cfg)
    official = to_official(perturbed_model(cfg, seed=2).state_dict(), cfg,
                           torch.Generator().manual_seed(2))
    model = MODELS.build(cfg)
    model.load_state_dict(official_to_ours(official), strict=True)
    model.eval()
    layer = model.encoder.layers[0]
    heads, levels, points = (layer.self_attn.num_heads, layer.self_attn.num_levels,
                             layer.self_attn.num_points)
    dims = model.embed_dims
    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[6, 5], [3, 3], [2, 2], [1, 1]][:levels])
    start_index = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    keys = int(shapes.prod(1).sum())
    src, pos = torch.randn(2, keys, dims, generator=gen), torch.randn(2, keys, dims, generator=gen)
    refs = torch.rand(2, keys, levels, 2, generator=gen)
    tgt, query_pos = (torch.randn(2, 7, dims, generator=gen) for _ in range(2))
    query_refs = torch.rand(2, 7, levels, 2, generator=gen)
    attn = dict(heads=heads, levels=levels, points=points)
    with torch.no_grad():
        # DeformableTransformerEncoderLayer.forward
        e = 'transformer.encoder.layers.0.'
        x = _official_ms_deform_attn(official, e + 'self_attn', src + pos, refs, src, shapes,
                                     start_index, **attn)
        x = _official_norm(official, e + 'norm1', src + x)
        expected_enc = _official_ffn(official, e, x, 'norm2')
        ours_enc = layer(src, pos, refs, shapes, start_index, None)

        # DeformableTransformerDecoderLayer.forward
        d = 'transformer.decoder.layers.0.'
        q = tgt + query_pos
        x = torch.nn.functional.multi_head_attention_forward(
            q.transpose(0, 1), q.transpose(0, 1), tgt.transpose(0, 1), dims, heads,
            official[d + 'self_attn.in_proj_weight'], official[d + 'self_attn.in_proj_bias'],
            None, None, False, 0.0, official[d + 'self_attn.out_proj.weight'],
            official[d + 'self_attn.out_proj.bias'], training=False,
            need_weights=False)[0].transpose(0, 1)
        x = _official_norm(official, d + 'norm2', tgt + x)
        y = _official_ms_deform_attn(official, d + 'cross_attn', x + query_pos, query_refs,
                                     src, shapes, start_index, **attn)
        x = _official_norm(official, d + 'norm1', x + y)
        expected_dec = _official_ffn(official, d, x, 'norm3')
        ours_dec = model.decoder.layers[0](tgt, query_pos, src, None, query_refs, shapes,
                                           start_index)
    # float32, the same operations in the same order but for the attention's
    # implementation (our kernel against the grid_sample path): a few float32 roundings
    # of sums over dims (<= 256) terms, each of magnitude ~1 after the LayerNorm
    tol = 256 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(ours_enc, expected_enc, rtol=0, atol=tol)
    torch.testing.assert_close(ours_dec, expected_dec, rtol=0, atol=tol)
