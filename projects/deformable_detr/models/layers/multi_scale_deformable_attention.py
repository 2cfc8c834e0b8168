"""Multi-scale deformable attention layer (Zhu et al., 2021, Sec. 4.1).

Each query attends to ``num_points`` sampled locations per head and per level,
placed around its reference point by learnt offsets, and mixes them with learnt
weights (softmax over levels x points). The sampling itself is ``ops``' kernel.
"""
import math
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ops import multi_scale_deformable_attn
from .reference_points import offset_scale, sampling_locations
from ...registry import MODELS


@MODELS.register_module()
class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention: the attention alone, no residual.

    The parameters carry mmcv's ``MultiScaleDeformableAttention`` names, so that
    mmdet's and the official checkpoints load as they are, but the module does less:
    mmcv's adds the positional embedding, applies dropout and adds the residual
    (``identity``) itself, where this one returns the attention's output only. The
    encoder and decoder layers add the dropout and the residual, as the official code
    does.

    Args:
        embed_dims: Channels of queries and values.
        num_heads: Attention heads; ``embed_dims`` must be divisible by it.
        num_levels: Feature levels sampled.
        num_points: Sampling points per head and level.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4,
                 num_points: int = 4) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by num_heads '
                             f'({num_heads})')
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self._sampling_hooks: 'OrderedDict[int, Callable]' = OrderedDict()
        self.init_weights()

    def register_sampling_hook(self, hook: Callable[..., None]) -> RemovableHandle:
        """Calls ``hook`` with what the op receives, on every forward.

        ``hook(module, reference_points, spatial_shapes, sampling_locations,
        attention_weights)`` sees the layer's reference points (bs, nq, levels, 2|4), the
        levels' (h, w), and the op's locations (bs, nq, heads, levels, points, 2) and
        weights (bs, nq, heads, levels, points); it must not modify them. This is how
        the sampling points are drawn (:mod:`..visualization.attention`).

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._sampling_hooks)
        self._sampling_hooks[handle.id] = hook
        return handle

    def init_weights(self) -> None:
        """The paper's init: every head starts looking in its own direction."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        # Scale so that the larger of |x|, |y| is 1: the first point lands on a
        # neighbouring pixel of the reference, point k at k+1 pixels.
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid[:, None, None, :].repeat(1, self.num_levels, self.num_points, 1)
        grid *= torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, value: Tensor, reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Attends from ``query`` to the multi-scale ``value``.

        Args:
            query: (bs, nq, embed_dims), positional embedding already added.
            value: (bs, num_keys, embed_dims), all levels flattened.
            reference_points: (bs, nq, num_levels, 2) normalised (x, y) points,
                or (bs, nq, num_levels, 4) (cx, cy, w, h) boxes.
            spatial_shapes: (num_levels, 2) int64 (h, w).
            level_start_index: (num_levels,) offsets of the levels in ``value``.
            key_padding_mask: (bs, num_keys), True at padded keys.

        Returns:
            (bs, nq, embed_dims), without residual or dropout.
        """
        bs, nq, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if key_padding_mask is not None:
            # Padded pixels must contribute nothing, whoever samples them.
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, value.shape[1], heads, -1)
        weights = self.attention_weights(query).view(bs, nq, heads, levels * points)
        weights = weights.softmax(-1).view(bs, nq, heads, levels, points)
        # Offsets are scaled per level and coordinate: scaling the projection's
        # weights (C x 2HLP) costs far less than scaling its output (N x 2HLP).
        scale = offset_scale(reference_points, spatial_shapes, points)
        scale = scale[None, :, None, :].expand(heads, levels, points, 2).reshape(-1)
        offsets = F.linear(query, self.sampling_offsets.weight * scale[:, None],
                           self.sampling_offsets.bias * scale)
        offsets = offsets.view(bs, nq, heads, levels, points, 2)
        locations = sampling_locations(reference_points, offsets)
        for hook in self._sampling_hooks.values():
            hook(self, reference_points, spatial_shapes, locations, weights)
        out = multi_scale_deformable_attn(value, spatial_shapes, level_start_index,
                                          locations, weights)
        return self.output_proj(out)
