"""Reference points: the one place that knows points from boxes.

A decoder query's reference is either a point (cx, cy) or, with box refinement or
two-stage, a box (cx, cy, w, h), normalised to [0, 1]. Everything that treats the two
differently calls these helpers: the attention layer (where to sample), the decoder (each
level's frame, iterative refinement) and the head (the boxes it predicts).
"""
import torch
from mmdet.models.layers.transformer import inverse_sigmoid
from torch import Tensor


def is_box(reference: Tensor) -> bool:
    """True for (..., 4) boxes, False for (..., 2) points; anything else is an error."""
    if reference.shape[-1] not in (2, 4):
        raise ValueError('reference points must end in 2 (cx, cy) or 4 (cx, cy, w, h), got '
                         f'shape {tuple(reference.shape)}')
    return reference.shape[-1] == 4


def refine(reference: Tensor, delta: Tensor) -> Tensor:
    """The box that ``delta`` (..., 4), in inverse-sigmoid space, makes of ``reference``.

    A box reference moves all four coordinates; a point reference moves the centre,
    and the delta's last two entries are the box size's logits on their own.

    Returns:
        (..., 4) normalised (cx, cy, w, h).
    """
    if is_box(reference):
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]],
                     -1).sigmoid()


def on_levels(reference: Tensor, valid_ratios: Tensor) -> Tensor:
    """(bs, nq, 2|4) references, relative to the valid image, seen on every level.

    Levels are padded differently: each one's (w, h) valid ratio maps the reference into
    that level's frame. Returns (bs, nq, levels, 2|4).
    """
    scale = torch.cat([valid_ratios, valid_ratios], -1) if is_box(reference) else valid_ratios
    return reference[:, :, None] * scale[:, None]


def offset_scale(reference: Tensor, spatial_shapes: Tensor, num_points: int) -> Tensor:
    """(levels, 2) factors that turn the attention's raw offsets into normalised ones.

    Around a point, offsets count in pixels of each level: divided by the level's
    (w, h). Around a box, they count in half box sizes spread over the points:
    0.5 / num_points, multiplied by the box's (w, h) in :func:`sampling_locations`.
    """
    if is_box(reference):
        return spatial_shapes.new_full(spatial_shapes.shape, 0.5 / num_points,
                                       dtype=reference.dtype)
    return 1 / spatial_shapes.flip(-1).to(reference.dtype)


def sampling_locations(reference: Tensor, offsets: Tensor) -> Tensor:
    """Where to sample: the offsets (scaled by :func:`offset_scale`) placed on the reference.

    Args:
        reference: (bs, nq, levels, 2|4) references on every level.
        offsets: (bs, nq, heads, levels, points, 2).

    Returns:
        (bs, nq, heads, levels, points, 2) normalised (x, y).
    """
    reference = reference[:, :, None, :, None, :]
    if is_box(reference):
        return torch.addcmul(reference[..., :2], offsets, reference[..., 2:])
    return offsets + reference
