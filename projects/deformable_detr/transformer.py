"""Deformable transformer: encoder, decoder and the helpers around them.

Reads top to bottom as the model runs: flattening the feature levels, the encoder
(deformable self-attention over all levels), two-stage proposals from the encoder
output, then the decoder (self-attention among queries, deformable cross-attention
to the encoder output, optional iterative box refinement).

Module and parameter names follow mmdet 3.3 (``self_attn``, ``cross_attn``,
``ffn.layers``, ``norms``), so its checkpoints load as they are.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmdet.models.layers.transformer import inverse_sigmoid
from torch import Tensor, nn

from .multi_scale_deformable_attention import MultiScaleDeformableAttention

# ----------------------------------------------------------------------------------
# Inputs: masks, valid ratios, flattened levels
# ----------------------------------------------------------------------------------


def padding_masks(img_shapes: Sequence[Tuple[int, int]], batch_shape: Tuple[int, int],
                  feat_shapes: Sequence[Tuple[int, int]], device: torch.device
                  ) -> Optional[List[Tensor]]:
    """Per-level padding masks (True = padded), or None when nothing is padded.

    Returning None when all images fill the batch lets every layer skip masking
    (mmdet does the same, and the outputs are identical).
    """
    if all(tuple(s) == tuple(batch_shape) for s in img_shapes):
        return None
    mask = torch.ones((len(img_shapes), *batch_shape), device=device)
    for i, (h, w) in enumerate(img_shapes):
        mask[i, :h, :w] = 0
    return [F.interpolate(mask[None], size=s)[0].bool() for s in feat_shapes]


def valid_ratio(mask: Tensor) -> Tensor:
    """(bs, 2) fraction (w, h) of a (bs, H, W) level that is not padding."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


def flatten_levels(feats: Sequence[Tensor], pos_embeds: Sequence[Tensor],
                   level_embed: Tensor, masks: Optional[Sequence[Tensor]]) -> dict:
    """Flattens the levels into one sequence, as both encoder and decoder see it.

    Returns:
        dict of ``feat`` (bs, N, C), ``feat_pos`` (position + level embedding),
        ``mask`` (bs, N) or None, ``spatial_shapes`` (L, 2), ``level_start_index``
        (L,) and ``valid_ratios`` (bs, L, 2).
    """
    bs = feats[0].shape[0]
    spatial_shapes = torch.tensor([f.shape[-2:] for f in feats], dtype=torch.long,
                                  device=feats[0].device)
    level_start_index = torch.cat([spatial_shapes.new_zeros(1),
                                   spatial_shapes.prod(1).cumsum(0)[:-1]])
    feat = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
    feat_pos = torch.cat([p.flatten(2).transpose(1, 2) + level_embed[lvl]
                          for lvl, p in enumerate(pos_embeds)], 1)
    if masks is None:
        mask, valid_ratios = None, feat.new_ones(bs, len(feats), 2)
    else:
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
    return dict(feat=feat, feat_pos=feat_pos, mask=mask, spatial_shapes=spatial_shapes,
                level_start_index=level_start_index, valid_ratios=valid_ratios)


# ----------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------


class FFN(nn.Module):
    """Linear-ReLU-Linear with residual; ``layers`` laid out as mmcv's FFN."""

    def __init__(self, embed_dims: int, feedforward_channels: int, dropout: float) -> None:
        super().__init__()
        # Not ReLU(inplace=True): the linear's 3-D output is a view of a 2-D matmul,
        # and autograd would copy the whole gradient back through that view.
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.ReLU(),
                          nn.Dropout(dropout)),
            nn.Linear(feedforward_channels, embed_dims), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)


class SelfAttention(nn.Module):
    """Query self-attention of the decoder; ``attn`` keeps mmcv's parameter names."""

    def __init__(self, embed_dims: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=dropout,
                                          batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: Tensor, query_pos: Tensor) -> Tensor:
        q = k = query + query_pos  # positions steer where to attend, not what is mixed
        out = self.attn(q, k, query, need_weights=False)[0]
        return query + self.dropout(out)


# ----------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then FFN (post-norm)."""

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4,
                 num_points: int = 4, feedforward_channels: int = 1024,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dims, num_heads, num_levels,
                                                       num_points)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(embed_dims, feedforward_channels, dropout)
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(2)])

    def forward(self, query: Tensor, query_pos: Tensor, reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor,
                key_padding_mask: Optional[Tensor]) -> Tensor:
        attn = self.self_attn(query + query_pos, query, reference_points, spatial_shapes,
                              level_start_index, key_padding_mask)
        query = self.norms[0](query + self.dropout(attn))
        return self.norms[1](self.ffn(query))


class DeformableEncoder(nn.Module):
    """Stack of encoder layers; every pixel of every level is a query.

    Args:
        num_layers: Encoder layers.
        **layer_kwargs: Arguments of :class:`DeformableEncoderLayer`.
    """

    def __init__(self, num_layers: int = 6, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.embed_dims = self.layers[0].self_attn.embed_dims

    @staticmethod
    def reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
        """(bs, N, L, 2) pixel centres of every level, seen on every level.

        Centres are normalised by the valid (unpadded) size of their own level,
        then scaled by each level's valid ratio, so that padding is never sampled
        more than it must be.
        """
        refs = []
        for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, device=valid_ratios.device),
                torch.linspace(0.5, w - 0.5, w, device=valid_ratios.device), indexing='ij')
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, feat: Tensor, feat_pos: Tensor, mask: Optional[Tensor],
                spatial_shapes: Tensor, level_start_index: Tensor,
                valid_ratios: Tensor) -> Tensor:
        """Returns the memory, (bs, N, C)."""
        reference_points = self.reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            feat = layer(feat, feat_pos, reference_points, spatial_shapes, level_start_index,
                         mask)
        return feat


# ----------------------------------------------------------------------------------
# Two-stage: proposals from the encoder output
# ----------------------------------------------------------------------------------


def encoder_output_proposals(memory: Tensor, mask: Optional[Tensor], spatial_shapes: Tensor
                             ) -> Tuple[Tensor, Tensor]:
    """One proposal per pixel: its centre, a size of 0.05 * 2**level.

    Returns:
        memory with padded / border pixels zeroed, (bs, N, C), and the proposals
        in inverse-sigmoid space (bs, N, 4), +inf where a proposal is invalid
        (padding, or too close to the border) so that it can never be chosen.
    """
    bs = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        if mask is not None:
            level_mask = mask[:, start:start + h * w].view(bs, h, w)
            size = torch.stack([(~level_mask[:, 0, :]).sum(1), (~level_mask[:, :, 0]).sum(1)],
                               -1).view(bs, 1, 1, 2)
        else:
            size = memory.new_tensor([w, h]).view(1, 1, 1, 2)
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(0, h - 1, h, device=memory.device),
            torch.linspace(0, w - 1, w, device=memory.device), indexing='ij')
        grid = torch.stack([grid_x, grid_y], -1)
        grid = (grid[None].expand(bs, -1, -1, -1) + 0.5) / size
        wh = torch.full_like(grid, 0.05 * 2.0**lvl)
        proposals.append(torch.cat((grid, wh), -1).view(bs, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = ~valid if mask is None else (~valid | mask[..., None])
    proposals = proposals.masked_fill(invalid, float('inf'))
    memory = memory.masked_fill(invalid, 0.0)
    return memory, proposals


def proposal_pos_embed(proposals: Tensor, num_feats: int = 128,
                       temperature: int = 10000) -> Tensor:
    """Sine embedding of (cx, cy, w, h) boxes given as logits: (bs, nq, 4 * num_feats)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature**(2 * (dim_t // 2) / num_feats)
    pos = proposals.sigmoid()[..., None] * (2 * math.pi) / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), -1).flatten(2)


# ----------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------


class DeformableDecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention to the memory, FFN."""

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4,
                 num_points: int = 4, feedforward_channels: int = 1024,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = SelfAttention(embed_dims, num_heads, dropout)
        self.cross_attn = MultiScaleDeformableAttention(embed_dims, num_heads, num_levels,
                                                        num_points)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(embed_dims, feedforward_channels, dropout)
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])

    def forward(self, query: Tensor, query_pos: Tensor, memory: Tensor,
                memory_mask: Optional[Tensor], reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor) -> Tensor:
        query = self.norms[0](self.self_attn(query, query_pos))
        attn = self.cross_attn(query + query_pos, memory, reference_points, spatial_shapes,
                               level_start_index, memory_mask)
        query = self.norms[1](query + self.dropout(attn))
        return self.norms[2](self.ffn(query))


class DeformableDecoder(nn.Module):
    """Stack of decoder layers returning every layer's output and reference.

    Args:
        num_layers: Decoder layers.
        **layer_kwargs: Arguments of :class:`DeformableDecoderLayer`.
    """

    def __init__(self, num_layers: int = 6, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [DeformableDecoderLayer(**layer_kwargs) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.embed_dims = self.layers[0].cross_attn.embed_dims

    def forward(self, query: Tensor, query_pos: Tensor, memory: Tensor,
                memory_mask: Optional[Tensor], reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                reg_branches: Optional[nn.ModuleList] = None
                ) -> Tuple[Tensor, List[Tensor]]:
        """Runs the decoder.

        Args:
            query, query_pos: (bs, nq, C) content and positional queries.
            memory, memory_mask: encoder output (bs, N, C) and its padding mask.
            reference_points: (bs, nq, 2) points or (bs, nq, 4) boxes, normalised.
            spatial_shapes, level_start_index, valid_ratios: from
                :func:`flatten_levels`.
            reg_branches: box branches of the head, given for iterative box
                refinement: layer i then refines the reference of layer i - 1.

        Returns:
            hidden states of every layer, (num_layers, bs, nq, C), and the
            references: the initial one followed by every layer's.
        """
        references = [reference_points]
        hidden_states = []
        for i, layer in enumerate(self.layers):
            # References are relative to the valid image: map them onto each
            # level, whose padding differs.
            scale = valid_ratios if reference_points.shape[-1] == 2 else torch.cat(
                [valid_ratios, valid_ratios], -1)
            query = layer(query, query_pos, memory, memory_mask,
                          reference_points[:, :, None] * scale[:, None], spatial_shapes,
                          level_start_index)
            if reg_branches is not None:
                delta = reg_branches[i](query)
                if reference_points.shape[-1] == 4:
                    new_reference = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:  # points become boxes: the branch also predicts w, h
                    new_reference = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]],
                        -1).sigmoid()
                # Gradients do not flow through the references (as in the paper).
                reference_points = new_reference.detach()
            hidden_states.append(query)
            references.append(reference_points)
        return torch.stack(hidden_states), references
