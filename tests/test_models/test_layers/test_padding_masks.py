"""The padding masks: the rule of F.interpolate(mode='nearest'), computed from sizes."""
import itertools

import torch
import torch.nn.functional as F

from projects.deformable_detr.models.layers import padding_masks


def _interpolated(img_shapes, batch_shape, feat_shapes):
    """The reference: the batch's mask resized with F.interpolate (nearest)."""
    mask = torch.ones((len(img_shapes), *batch_shape))
    for i, (h, w) in enumerate(img_shapes):
        mask[i, :h, :w] = 0
    return [F.interpolate(mask[None], size=s)[0].bool() for s in feat_shapes]


def test_padding_masks_are_those_of_nearest_interpolation():
    # Sizes whose ratios are not powers of two, where a rounding rule could differ.
    for batch_shape in itertools.product((37, 64, 101, 800), (45, 96, 1333)):
        height, width = batch_shape
        img_shapes = [(height, width), (height * 2 // 3 + 1, width // 3 + 1),
                      (max(1, height - 7), max(1, width - 5))]
        feat_shapes = [(-(-height // s), -(-width // s)) for s in (8, 16, 32, 64)]
        feat_shapes += [(height // 3 + 1, width // 7 + 1)]
        ours = padding_masks(torch.tensor(img_shapes), batch_shape, feat_shapes)
        expected = _interpolated(img_shapes, batch_shape, feat_shapes)
        for level, (a, b) in enumerate(zip(ours, expected)):
            assert torch.equal(a, b), (batch_shape, img_shapes, feat_shapes[level])
