"""Multi-scale deformable attention in plain PyTorch (mmcv's name for it: ``_pytorch``).

What the kernels' tests compare against, and the fallback on devices without a kernel.
One ``grid_sample`` per level does the bilinear sampling (align_corners=False, zero
padding); the weighted sum over levels and points is a single einsum.
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor


def multi_scale_deformable_attn_pytorch(value: Tensor, spatial_shapes: Tensor,
                                        level_start_index: Tensor, sampling_locations: Tensor,
                                        attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention written with ``grid_sample``.

    Shapes as in :func:`ops.multi_scale_deformable_attn`. ``level_start_index``
    is implied by ``spatial_shapes`` and only accepted for the same signature.
    """
    bs, _, heads, dim = value.shape
    _, nq, _, levels, points, _ = sampling_locations.shape
    sizes: List[int] = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    # grid_sample wants (N, C, H, W) inputs and grids in [-1, 1].
    grids = (2 * sampling_locations - 1).permute(0, 2, 1, 3, 4, 5)
    grids = grids.reshape(bs * heads, nq, levels, points, 2)
    samples = []
    for lvl, value_l in enumerate(value.split(sizes, dim=1)):
        h, w = (int(s) for s in spatial_shapes[lvl].tolist())
        value_l = value_l.permute(0, 2, 3, 1).reshape(bs * heads, dim, h, w)
        samples.append(
            F.grid_sample(value_l, grids[:, :, lvl], mode='bilinear',
                          padding_mode='zeros', align_corners=False))
    # (bs*heads, dim, nq, levels, points)
    sampled = torch.stack(samples, dim=3)
    weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(bs * heads, nq, levels, points)
    out = torch.einsum('ncqlp,nqlp->nqc', sampled, weights)
    return out.reshape(bs, heads, nq, dim).permute(0, 2, 1, 3).reshape(bs, nq, heads * dim)
