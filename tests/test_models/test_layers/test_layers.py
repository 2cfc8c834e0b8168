"""Shapes and initialisation of every module."""
import math

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

from projects.deformable_detr import (DeformableDecoder, DeformableDETRHead, DeformableEncoder,
                                      MultiScaleDeformableAttention)
from projects.deformable_detr.models.layers.deformable_transformer import flatten_levels

pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.numerics]

SHAPES = torch.tensor([[8, 12], [4, 6], [2, 3]])
STARTS = torch.tensor([0, 96, 120])
NUM_KEYS = 126


def test_attention_shapes_points_and_boxes():
    attn = MultiScaleDeformableAttention(64, num_heads=4, num_levels=3, num_points=2)
    query, value = torch.randn(2, 5, 64), torch.randn(2, NUM_KEYS, 64)
    for ref in (torch.rand(2, 5, 3, 2), torch.rand(2, 5, 3, 4)):
        assert attn(query, value, ref, SHAPES, STARTS).shape == (2, 5, 64)
    with pytest.raises(ValueError, match='end in 2'):
        attn(query, value, torch.rand(2, 5, 3, 3), SHAPES, STARTS)


def test_attention_init():
    attn = MultiScaleDeformableAttention(256, num_heads=8, num_levels=4, num_points=4)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0
    assert attn.attention_weights.bias.abs().sum() == 0
    bias = attn.sampling_offsets.bias.view(8, 4, 4, 2)
    for head in range(8):
        angle = 2 * math.pi * head / 8
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction /= direction.abs().max()  # on the square around the reference
        for point in range(4):  # the same on every level, scaled by point index
            # cos/sin in float32 against torch's float32: default tolerance (1.3e-6 rel).
            torch.testing.assert_close(bias[head, :, point],
                                       (point + 1) * direction.expand(4, 2))


def test_attention_ignores_padded_values():
    attn = MultiScaleDeformableAttention(32, num_heads=2, num_levels=3, num_points=4)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=1.0)
    query, value = torch.randn(1, 7, 32), torch.randn(1, NUM_KEYS, 32)
    mask = torch.rand(1, NUM_KEYS) < 0.5
    ref = torch.rand(1, 7, 3, 2)
    out = attn(query, value, ref, SHAPES, STARTS, mask)
    garbage = value.masked_fill(mask[..., None], 1e3)
    # The same computation with masked values zeroed either way: default tolerance.
    torch.testing.assert_close(attn(query, garbage, ref, SHAPES, STARTS, mask), out)
    assert not torch.allclose(attn(query, garbage, ref, SHAPES, STARTS), out)


def _levels(bs=2, dims=64):
    feats = [torch.randn(bs, dims, int(h), int(w)) for h, w in SHAPES]
    pos = [torch.randn_like(f) for f in feats]
    return flatten_levels(feats, pos, torch.randn(3, dims), None)


def test_encoder_shapes_and_reference_points():
    inputs = _levels()
    enc = DeformableEncoder(num_layers=2, embed_dims=64, num_heads=4, num_levels=3)
    assert enc(**inputs).shape == (2, NUM_KEYS, 64)
    ratios = torch.tensor([[[1.0, 1.0]] * 3, [[0.5, 0.75]] * 3])
    ref = enc.reference_points(SHAPES.tolist(), ratios)
    assert ref.shape == (2, NUM_KEYS, 3, 2)
    assert ref.min() > 0 and ref.max() < 1
    # First pixel of level 0 (8x12), seen on level 0: its centre.
    # One division each in float32: within an eps32, inside the default tolerance.
    torch.testing.assert_close(ref[0, 0, 0], torch.tensor([0.5 / 12, 0.5 / 8]))


@pytest.mark.parametrize('refine', [False, True])
@pytest.mark.parametrize('ref_dim', [2, 4])
def test_decoder_returns_every_layer(refine, ref_dim):
    inputs = _levels()
    dec = DeformableDecoder(num_layers=3, embed_dims=64, num_heads=4, num_levels=3)
    head = DeformableDETRHead(num_classes=5, embed_dims=64, num_pred_layer=3)
    query, query_pos = torch.randn(2, 10, 64), torch.randn(2, 10, 64)
    ref = torch.rand(2, 10, ref_dim)
    hidden, refs = dec(query, query_pos, inputs['feat'], None, ref, inputs['spatial_shapes'],
                       inputs['level_start_index'], inputs['valid_ratios'],
                       reg_branches=head.reg_branches if refine else None)
    assert hidden.shape == (3, 2, 10, 64) and len(refs) == 4 and refs[0] is ref
    for r in refs[1:]:
        assert r.shape == (2, 10, 4 if refine else ref_dim)
        assert not r.requires_grad or not refine  # refined references are detached
    cls, boxes = head(hidden, refs)
    assert cls.shape == (3, 2, 10, 5) and boxes.shape == (3, 2, 10, 4)
    assert boxes.min() >= 0 and boxes.max() <= 1


def test_head_init_and_predict(make_batch):
    head = DeformableDETRHead(num_classes=5, embed_dims=32, num_pred_layer=2,
                              share_pred_layer=True, test_cfg=dict(max_per_img=7))
    head.init_weights()
    assert head.cls_branches[0] is head.cls_branches[1]
    # -log(99) rounded once to float32 (default tolerance); the zero-init bias is exact.
    torch.testing.assert_close(head.cls_branches[0].bias,
                               torch.full((5, ), -math.log(99)))
    assert head.reg_branches[0][-1].weight.abs().sum() == 0
    torch.testing.assert_close(head.reg_branches[0][-1].bias, torch.tensor([0., 0, -2, -2]))
    _, samples = make_batch(img_shapes=[(40, 60)], num_gts=[1])
    hidden = torch.randn(2, 1, 4, 32)
    refs = [torch.rand(1, 4, 2)] * 3
    result, = head.predict(hidden, refs, samples, rescale=True)
    assert result.bboxes.shape == (7, 4) and result.scores.shape == result.labels.shape == (7, )
    assert (result.scores[:-1] >= result.scores[1:]).all()  # sorted
    # rescaled: the boxes in the resized image (40x60) divided by its scale factor (0.8)
    plain, = head.predict(hidden, refs, samples, rescale=False)
    torch.testing.assert_close(result.scores, plain.scores, rtol=0, atol=0)
    assert samples[0].scale_factor == (0.8, 0.8)
    # the same numbers, each divided once: float32 rounding of one division
    torch.testing.assert_close(result.bboxes, plain.bboxes / 0.8,
                               rtol=2 * torch.finfo(torch.float32).eps, atol=0)
    h, w = samples[0].ori_shape
    assert (result.bboxes[:, 0::2] <= w + 1e-3).all() and (result.bboxes[:, 1::2] <= h).all()
    assert result.labels.max() < 5


@pytest.mark.parametrize('name,params', [
    ('deformable-detr-singlescale_r50_16xb2-50e_coco.py', 34.1),
    ('deformable-detr-singlescale-dc5_r50_16xb2-50e_coco.py', 34.1),
    ('deformable-detr_r50_16xb2-50e_coco.py', 40.1),
    ('deformable-detr-refine_r50_16xb2-50e_coco.py', 40.9),
    ('deformable-detr-refine-twostage_r50_16xb2-50e_coco.py', 41.2),
])
def test_paper_variants(name, params, config_path, small_model_cfg, make_batch):
    """Every config builds, has the paper's size (34/34/40/41/41 M) and runs."""
    init_default_scope('mmdet')
    cfg = Config.fromfile(config_path(name))
    cfg.model.backbone.init_cfg = None
    with torch.device('meta'):  # sizes only: no memory, no init cost
        model = MODELS.build(cfg.model)
    # An integer count against the paper's figure, given to 0.1 M: within 0.05 M.
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, abs=0.05)
    # Run the tiny version (same neck / levels / flags) on two small images.
    small_cfg = small_model_cfg(name)
    if 'dc5' in name:  # dilation needs Bottleneck blocks, as in torchvision
        small_cfg.backbone.depth, small_cfg.neck.in_channels = 50, [2048]
    small = MODELS.build(small_cfg)
    small.init_weights()
    inputs, samples = make_batch()
    cls, boxes = small(inputs, samples, mode='tensor')
    levels = cfg.model.num_feature_levels
    assert small.level_embed.shape == (levels, 256)
    assert cls.shape == (2, 2, 30, 80) and boxes.shape == (2, 2, 30, 4)


def test_dc5_backbone_dilates_as_torchvision(config_path):
    init_default_scope('mmdet')
    cfg = Config.fromfile(config_path('deformable-detr-singlescale-dc5_r50_16xb2-50e_coco.py'))
    cfg.model.backbone.init_cfg = None
    backbone = MODELS.build(cfg.model.backbone)
    assert backbone.layer4[0].conv2.dilation == (1, 1)
    assert all(block.conv2.dilation == (2, 2) for block in list(backbone.layer4)[1:])
    out, = backbone(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 2048, 4, 4)  # stride 16
