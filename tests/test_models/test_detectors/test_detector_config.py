"""Each dimension is set once: the detector derives the rest and refuses contradictions."""
import copy
import os

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

import projects.deformable_detr  # noqa: F401  (registers the ddetr modules)
from projects.deformable_detr import DeformableDETRHead
from projects.deformable_detr.models.layers.reference_points import (is_box, offset_scale, on_levels, refine,
                                                       sampling_locations)

CONFIG = os.path.join(os.path.dirname(__file__), '..', '..', '..', 'configs', 'synthetic',
                      'deformable-detr-refine-twostage_r18_1xb8-synthetic.py')


@pytest.fixture(scope='module')
def model_cfg():
    init_default_scope('mmdet')
    return Config.fromfile(CONFIG).model


def build(model_cfg, **changes):
    cfg = copy.deepcopy(model_cfg)
    for path, value in changes.items():
        *parents, key = path.split('.')
        node = cfg
        for parent in parents:
            node = node[parent]
        node[key] = value
    return MODELS.build(cfg)


def test_dimensions_are_derived(model_cfg):
    model = build(model_cfg)
    assert model.embed_dims == 128
    assert model.neck.convs[0].conv.out_channels == 128
    assert len(model.neck.convs) + len(model.neck.extra_convs) == model.num_feature_levels
    assert model.positional_encoding.num_feats == 64
    assert model.bbox_head.embed_dims == 128
    assert len(model.bbox_head.cls_branches) == model.decoder.num_layers + 1


def test_agreeing_values_are_accepted(model_cfg):
    # mmdet-style configs repeat the dimensions: accepted when they agree.
    build(model_cfg, **{'bbox_head.embed_dims': 128, 'positional_encoding.num_feats': 64,
                        'neck.out_channels': 128, 'neck.num_outs': 4})


@pytest.mark.parametrize('path,value,message', [
    ('bbox_head.embed_dims', 256, r'embed_dims=256 contradicts the transformer.s embed_dims'),
    ('positional_encoding.num_feats', 128, r'num_feats=128 contradicts half'),
    ('neck.out_channels', 64, r'out_channels=64 contradicts'),
    ('neck.num_outs', 3, r'num_outs=3 contradicts num_feature_levels \(4\)'),
    ('bbox_head.num_pred_layer', 6, r'num_pred_layer=6 contradicts the decoder layers'),
    ('bbox_head.share_pred_layer', True, r'share_pred_layer=True contradicts'),
    ('decoder.embed_dims', 64, r'encoder embed_dims \(128\) and decoder embed_dims \(64\)'),
])
def test_contradictions_are_refused(model_cfg, path, value, message):
    with pytest.raises(ValueError, match=message):
        build(model_cfg, **{path: value})


def test_unknown_head_settings_are_refused():
    with pytest.raises(ValueError, match=r"unknown train_cfg/test_cfg keys.*'score_thr'"):
        DeformableDETRHead(num_classes=3, embed_dims=32, test_cfg=dict(score_thr=0.3))


def test_reference_point_helpers():
    points, boxes = torch.rand(2, 5, 2), torch.rand(2, 5, 4)
    assert not is_box(points) and is_box(boxes)
    with pytest.raises(ValueError, match='end in 2'):
        is_box(torch.rand(2, 5, 3))
    delta = torch.randn(2, 5, 4)
    # A zero delta keeps a box; a point keeps its centre and gets sigmoid(0) = 0.5 sizes.
    # sigmoid(logit(b)) in float32: logit clamps at eps=1e-5 (as mmdet's inverse_sigmoid),
    # which moves boxes within 1e-5 of 0 or 1; elsewhere a few eps32. 1e-4 covers both.
    torch.testing.assert_close(refine(boxes, torch.zeros(2, 5, 4)), boxes, atol=1e-4, rtol=0)
    refined = refine(points, delta)
    # The rest: one or two float32 operations each, within torch's default tolerance.
    torch.testing.assert_close(refined[..., 2:], delta[..., 2:].sigmoid())
    ratios = torch.tensor([[[1.0, 1.0], [0.5, 0.25]]]).expand(2, 2, 2)
    on = on_levels(boxes, ratios)
    assert on.shape == (2, 5, 2, 4)
    torch.testing.assert_close(on[:, :, 1], boxes * torch.tensor([0.5, 0.25, 0.5, 0.25]))
    shapes = torch.tensor([[8, 16], [4, 8]])
    torch.testing.assert_close(offset_scale(points, shapes, 4),
                               torch.tensor([[1 / 16, 1 / 8], [1 / 8, 1 / 4]]))
    torch.testing.assert_close(offset_scale(boxes, shapes, 4), torch.full((2, 2), 0.125))
    offsets = torch.randn(2, 5, 3, 2, 4, 2)
    locations = sampling_locations(on, offsets)
    expected = on[:, :, None, :, None, :2] + offsets * on[:, :, None, :, None, 2:]
    torch.testing.assert_close(locations, expected)


@pytest.mark.parametrize('two_stage', [False, True])
def test_transformer_stages(model_cfg, two_stage):
    """Each of the four stages MMDetection names does its own part, checked against what it
    must compute (not against the same calls): the levels flattened in order with their
    own positions and level embeddings; an encoder that mixes the levels; queries and
    references from the learnt embeddings or the encoder's best proposals; a decoder
    that starts from those references and reads the memory. Then they compose
    forward_transformer."""
    torch.manual_seed(0)
    model = build(model_cfg, as_two_stage=two_stage)
    model.eval()
    feats = model.extract_feat(torch.randn(2, 3, 64, 64))
    bs, dims = 2, 128
    with torch.no_grad():
        levels = model.pre_transformer(feats)
        shapes = [(8, 8), (4, 4), (2, 2), (1, 1)]
        assert [tuple(f.shape[-2:]) for f in feats] == shapes
        assert levels['spatial_shapes'].tolist() == [list(shape) for shape in shapes]
        assert levels['level_start_index'].tolist() == [0, 64, 80, 84]
        assert levels['feat'].shape == levels['feat_pos'].shape == (bs, 85, dims)
        assert levels['mask'] is None
        torch.testing.assert_close(levels['valid_ratios'], torch.ones(bs, 4, 2))
        for lvl, ((h, w), start) in enumerate(zip(shapes, [0, 64, 80, 84])):
            # pixel (y, x) of level lvl sits at start + y * w + x, channels last
            torch.testing.assert_close(
                levels['feat'][:, start:start + h * w].reshape(bs, h, w, dims),
                feats[lvl].permute(0, 2, 3, 1), rtol=0, atol=0)
            pos = model.positional_encoding(None, input=feats[lvl]).permute(0, 2, 3, 1)
            # a sum of two float32 numbers: exact up to one rounding
            torch.testing.assert_close(
                levels['feat_pos'][:, start:start + h * w].reshape(bs, h, w, dims),
                pos + model.level_embed[lvl])

        memory = model.forward_encoder(levels)
        assert memory.shape == (bs, 85, dims)
        # multi-scale: changing the coarsest level (its one pixel) changes the memory of
        # the finest level's pixels
        changed = dict(levels, feat=levels['feat'].clone())
        changed['feat'][:, 84] += 1
        assert (model.forward_encoder(changed)[:, :64] - memory[:, :64]).abs().amax() > 1e-3

        query, query_pos, refs, enc_outputs = model.pre_decoder(memory, levels)
        assert query.shape == query_pos.shape == (bs, 50, dims)
        if two_stage:
            # the references are the boxes of the 50 proposals that score highest on the
            # first class channel, best first; the queries are made from those boxes.
            # Each reference is found among the proposals by its box (not by position in
            # a sort, which near-tied scores could order either way).
            scores = enc_outputs['enc_outputs_class'][..., 0]
            proposals = enc_outputs['enc_outputs_coord']
            assert scores.shape == (bs, 85) and refs.shape == (bs, 50, 4)
            for b in range(bs):
                same = (refs[b, :, None] == proposals[b, None]).all(-1)  # (50, 85)
                assert same.any(1).all(), 'a reference is no proposal box'
                chosen = same.float().argmax(1)
                assert len(set(chosen.tolist())) == 50
                left = torch.ones(85, dtype=torch.bool)
                left[chosen] = False
                assert scores[b, chosen].min() >= scores[b, left].max()
                assert (scores[b, chosen][:-1] >= scores[b, chosen][1:]).all()
            assert (query_pos[:, 1:] - query_pos[:, :1]).abs().amax() > 1e-3
        else:
            assert enc_outputs['enc_outputs_class'] is None
            learnt_pos, learnt = model.query_embedding.weight.split(dims, -1)
            torch.testing.assert_close(query, learnt.expand(bs, -1, -1), rtol=0, atol=0)
            torch.testing.assert_close(query_pos, learnt_pos.expand(bs, -1, -1), rtol=0,
                                       atol=0)
            torch.testing.assert_close(refs, model.reference_points_fc(learnt_pos).sigmoid()
                                       .expand(bs, -1, -1))

        hidden, references = model.forward_decoder(query, query_pos, refs, memory, levels)
        assert hidden.shape == (3, bs, 50, dims) and len(references) == 4
        torch.testing.assert_close(references[0], refs, rtol=0, atol=0)
        for before, after in zip(references[:-1], references[1:]):  # box refinement
            assert after.shape == (bs, 50, 4)
            assert (after[..., :2] - before[..., :2]).abs().amax() > 1e-4
        # the decoder reads the memory
        other, _ = model.forward_decoder(query, query_pos, refs, memory.flip(1), levels)
        assert (other - hidden).abs().amax() > 1e-3

        outs = model.forward_transformer(feats)
    torch.testing.assert_close(outs['hidden_states'], hidden, rtol=0, atol=0)
    for got, expected in zip(outs['references'], references):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
