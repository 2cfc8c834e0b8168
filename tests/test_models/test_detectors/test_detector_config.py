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
    torch.testing.assert_close(refine(boxes, torch.zeros(2, 5, 4)), boxes, atol=1e-4, rtol=0)
    refined = refine(points, delta)
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
    """The four stages MMDetection names, run one by one, compose forward_transformer."""
    model = build(model_cfg, as_two_stage=two_stage)
    model.eval()
    feats = model.extract_feat(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        levels = model.pre_transformer(feats)
        assert levels['feat'].shape == (2, 8 * 8 + 4 * 4 + 2 * 2 + 1, 128)
        memory = model.forward_encoder(levels)
        query, query_pos, refs, enc_outputs = model.pre_decoder(memory, levels)
        assert query.shape == query_pos.shape == (2, 50, 128)
        assert refs.shape == (2, 50, 4 if two_stage else 2)
        assert (enc_outputs['enc_outputs_class'] is not None) == two_stage
        hidden, references = model.forward_decoder(query, query_pos, refs, memory, levels)
        assert hidden.shape == (3, 2, 50, 128) and len(references) == 4
        outs = model.forward_transformer(feats)
    torch.testing.assert_close(outs['hidden_states'], hidden)
