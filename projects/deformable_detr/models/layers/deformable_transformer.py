"""Deformable transformer: encoder, decoder and the helpers around them.

Reads top to bottom as the model runs: flattening the feature levels, the encoder
(deformable self-attention over all levels), then the decoder (self-attention among
queries, deformable cross-attention to the encoder output, optional iterative box
refinement). The query selection between them (learnt queries, or the two-stage
proposals) is the detector's ``pre_decoder``.

Module and parameter names follow mmdet 3.3 (``self_attn``, ``cross_attn``,
``ffn.layers``, ``norms``), so its checkpoints load as they are.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from .multi_scale_deformable_attention import MultiScaleDeformableAttention
from .reference_points import on_levels, refine

DEFAULT_EMBED_DIMS = 256  # the paper's d

# ----------------------------------------------------------------------------------
# Inputs: masks, valid ratios, flattened levels
# ----------------------------------------------------------------------------------


def padding_masks(img_shapes: Tensor, batch_shape: Sequence[int],
                  feat_shapes: Sequence[Sequence[int]]) -> List[Tensor]:
    """Per-level padding masks (True = padded) of the images of a batch.

    The batch's mask is resized to every level with the index rule of
    ``F.interpolate(mode='nearest')`` (source index ``floor(i * float(in / out))``, in
    float32), written out: the sizes may be an input of an exported graph, and ONNX's
    ``Resize`` would divide by ``out / in`` instead and may round the other way at a
    boundary. The detector skips masking where no image is padded (as mmdet does; the
    outputs are identical).

    Args:
        img_shapes: (bs, 2) int (h, w) of every image, top-left in the batch.
        batch_shape: (H, W) of the padded batch.
        feat_shapes: (h, w) of every feature level.

    Returns:
        One (bs, h, w) bool mask per level.
    """
    height, width = batch_shape
    rows = torch.arange(height, device=img_shapes.device)
    cols = torch.arange(width, device=img_shapes.device)
    mask = ((rows[None, :, None] >= img_shapes[:, 0, None, None]) |
            (cols[None, None, :] >= img_shapes[:, 1, None, None]))
    masks = []
    for h, w in feat_shapes:
        mask_l = mask.index_select(1, _nearest_index(h, height, img_shapes.device))
        masks.append(mask_l.index_select(2, _nearest_index(w, width, img_shapes.device)))
    return masks


def _nearest_index(out_size: int, in_size: int, device: torch.device) -> Tensor:
    """Source indices of ``F.interpolate(mode='nearest')`` from ``in_size`` to ``out_size``."""
    scale = (torch.full((), in_size, dtype=torch.float32, device=device) /
             torch.full((), out_size, dtype=torch.float32, device=device))
    index = torch.arange(out_size, dtype=torch.float32, device=device) * scale
    return index.floor().long().clamp(max=in_size - 1)


def pixel_centres(h: int, w: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """The (y, x) coordinates, in pixels, of the centres of an (h, w) level: (h, w) each.

    arange + 0.5, not linspace: the same values, and torch.export keeps the sizes
    symbolic (linspace fixes them).
    """
    return torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                          torch.arange(w, dtype=torch.float32, device=device) + 0.5,
                          indexing='ij')


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
        (L,), ``valid_ratios`` (bs, L, 2) and ``level_shapes``: the (h, w) of
        ``spatial_shapes`` as Python sizes, for the code that builds grids from them
        (reading the tensor back would sync a GPU, and torch.export could not see
        through it).
    """
    bs = feats[0].shape[0]
    level_shapes = [tuple(f.shape[-2:]) for f in feats]
    spatial_shapes = torch.tensor(level_shapes, dtype=torch.long, device=feats[0].device)
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
                level_start_index=level_start_index, valid_ratios=valid_ratios,
                level_shapes=level_shapes)


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


def checkpointed_layers(num_cp: int, num_layers: int, stack: str) -> int:
    """How many of a stack's first layers recompute their activations in backward.

    ``num_cp`` as mmdet's: 0 (or -1) for none, ``1 .. num_layers`` for the first ones.

    Raises:
        ValueError: ``num_cp`` is not an int in ``-1 .. num_layers``.
    """
    if isinstance(num_cp, bool) or not isinstance(num_cp, int) or \
            not -1 <= num_cp <= num_layers:
        raise ValueError(f'{stack} num_cp={num_cp!r}: the number of layers to checkpoint '
                         f'must be an int from 0 (none; -1 too, as in mmdet) to '
                         f'num_layers={num_layers} (all)')
    return max(num_cp, 0)


def run_layer(layer: nn.Module, checkpointed: bool, *args) -> Tensor:
    """``layer(*args)``; with ``checkpointed``, while training with gradients, its
    activations are not kept but recomputed in backward.

    Non-reentrant checkpointing (``use_reentrant=False``): the graph is the one the
    layer builds without it, and gradients reach parameters whatever the inputs'
    ``requires_grad``. The RNG states are saved and restored for the recomputation
    (``preserve_rng_state``), so dropout draws the same masks twice.
    """
    if checkpointed and layer.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False,
                                                 preserve_rng_state=True)
    return layer(*args)


# ----------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then FFN (post-norm)."""

    def __init__(self, embed_dims: int = DEFAULT_EMBED_DIMS, num_heads: int = 8,
                 num_levels: int = 4, num_points: int = 4, feedforward_channels: int = 1024,
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
        num_cp: Activation checkpointing of the first ``num_cp`` layers (0: none):
            see :func:`run_layer`.
        **layer_kwargs: Arguments of :class:`DeformableEncoderLayer`.
    """

    def __init__(self, num_layers: int = 6, num_cp: int = 0, **layer_kwargs) -> None:
        super().__init__()
        self.num_cp = checkpointed_layers(num_cp, num_layers, 'encoder')
        self.layers = nn.ModuleList(
            [DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.embed_dims = self.layers[0].self_attn.embed_dims

    @staticmethod
    def reference_points(level_shapes: Sequence[Tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """(bs, N, L, 2) pixel centres of every level, seen on every level.

        Centres are normalised by the valid (unpadded) size of their own level,
        then scaled by each level's valid ratio, so that padding is never sampled
        more than it must be.

        Args:
            level_shapes: (h, w) of every level, as Python sizes.
            valid_ratios: (bs, L, 2).
        """
        refs = []
        for lvl, (h, w) in enumerate(level_shapes):
            ref_y, ref_x = pixel_centres(h, w, valid_ratios.device)
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, feat: Tensor, feat_pos: Tensor, mask: Optional[Tensor],
                spatial_shapes: Tensor, level_start_index: Tensor,
                valid_ratios: Tensor, level_shapes: Sequence[Tuple[int, int]]) -> Tensor:
        """Returns the memory, (bs, N, C). Arguments as :func:`flatten_levels` returns them."""
        reference_points = self.reference_points(level_shapes, valid_ratios)
        for i, layer in enumerate(self.layers):
            feat = run_layer(layer, i < self.num_cp, feat, feat_pos, reference_points,
                             spatial_shapes, level_start_index, mask)
        return feat


# ----------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------


class DeformableDecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention to the memory, FFN."""

    def __init__(self, embed_dims: int = DEFAULT_EMBED_DIMS, num_heads: int = 8,
                 num_levels: int = 4, num_points: int = 4, feedforward_channels: int = 1024,
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
        num_cp: Activation checkpointing of the first ``num_cp`` layers (0: none):
            see :func:`run_layer`.
        **layer_kwargs: Arguments of :class:`DeformableDecoderLayer`.
    """

    def __init__(self, num_layers: int = 6, num_cp: int = 0, **layer_kwargs) -> None:
        super().__init__()
        self.num_cp = checkpointed_layers(num_cp, num_layers, 'decoder')
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
            query = run_layer(layer, i < self.num_cp, query, query_pos, memory,
                              memory_mask, on_levels(reference_points, valid_ratios),
                              spatial_shapes, level_start_index)
            if reg_branches is not None:
                # Gradients do not flow through the references (as in the paper).
                reference_points = refine(reference_points, reg_branches[i](query)).detach()
            hidden_states.append(query)
            references.append(reference_points)
        return torch.stack(hidden_states), references
