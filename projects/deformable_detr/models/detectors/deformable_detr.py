"""The Deformable DETR detector: backbone, neck, deformable transformer, head.

The transformer runs in the four stages MMDetection's DETRs name: ``pre_transformer``
(flatten the levels, masks, positions), ``forward_encoder``, ``pre_decoder`` (the
queries: learnt, or the two-stage encoder proposals) and ``forward_decoder``.
"""
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from mmdet.models.detectors.base import BaseDetector
from mmdet.structures import OptSampleList, SampleList
from torch import Tensor, nn

from ...registry import MODELS
from ..dense_heads.deformable_detr_head import proposal_branch_index
from ..layers.deformable_transformer import (DEFAULT_EMBED_DIMS, DeformableDecoder,
                                             DeformableEncoder, flatten_levels, padding_masks,
                                             pixel_centres)
from ..layers.multi_scale_deformable_attention import MultiScaleDeformableAttention
from ..utils.non_finite import check_losses


def derived(cfg: dict, key: str, value: Any, why: str) -> dict:
    """``cfg`` with ``key`` set to ``value``; a config that sets it otherwise is an error.

    For the dimensions and flags the detector owns: each is set once, in one place.
    """
    if key in cfg and cfg[key] != value:
        raise ValueError(f'{cfg.get("type", "config")}: {key}={cfg[key]!r} contradicts '
                         f'{why} ({value!r}); leave {key} out, the detector sets it')
    return dict(cfg, **{key: value})


@MODELS.register_module()
class DeformableDETR(BaseDetector):
    """Deformable DETR (Zhu et al., ICLR 2021), with its two refinements.

    The state dict matches mmdet 3.3's ``DeformableDETR`` key for key.

    The transformer's width (``embed_dims`` of the encoder and decoder) is set once: the
    neck's ``out_channels``, the positional encoding's ``num_feats`` and the head's
    ``embed_dims`` are derived from it, as are the neck's ``num_outs`` (from
    ``num_feature_levels``) and the head's branch layout. A config that contradicts
    them is refused.

    Args:
        backbone: Backbone config (mmdet's ``ResNet``).
        bbox_head: Head config (``ddetr.DeformableDETRHead``).
        neck: Neck config mapping the backbone levels to ``num_feature_levels``
            maps (mmdet's ``ChannelMapper``); None if the backbone does it.
        encoder: :class:`DeformableEncoder` arguments: ``num_layers``,
            ``embed_dims``, ``num_heads``, ``num_points``,
            ``feedforward_channels``, ``dropout``.
        decoder: :class:`DeformableDecoder` arguments, the same keys.
        positional_encoding: mmdet ``SinePositionalEncoding`` arguments.
        num_queries: Object queries (top-k proposals when two-stage; an image
            with fewer encoder pixels than that gets one query per pixel).
        num_feature_levels: Feature levels (1 for the single-scale variants).
        with_box_refine: Each decoder layer refines the previous layer's boxes.
        as_two_stage: Initial reference boxes are the top-k encoder proposals.
        train_cfg: Dict with the ``assigner`` config, handed to the head.
        test_cfg: Dict with ``max_per_img``, handed to the head.
        data_preprocessor: mmdet ``DetDataPreprocessor`` config.
        init_cfg: Initialisation config.
    """

    def __init__(self, backbone: dict, bbox_head: dict, neck: Optional[dict] = None,
                 encoder: Optional[dict] = None, decoder: Optional[dict] = None,
                 positional_encoding: Optional[dict] = None, num_queries: int = 300,
                 num_feature_levels: int = 4, with_box_refine: bool = False,
                 as_two_stage: bool = False, train_cfg: Optional[dict] = None,
                 test_cfg: Optional[dict] = None, data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        if isinstance(data_preprocessor, dict):  # through our registry, not MMEngine's
            data_preprocessor = MODELS.build(data_preprocessor)
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.num_queries, self.num_feature_levels = num_queries, num_feature_levels
        self.with_box_refine, self.as_two_stage = with_box_refine, as_two_stage
        self.train_cfg, self.test_cfg = train_cfg, test_cfg

        encoder, decoder = dict(encoder or {}), dict(decoder or {})
        # The width everything else is derived from; read before anything is built, so
        # that modules are built (and draw their initial weights) in a fixed order.
        dims = self.embed_dims = encoder.get('embed_dims', DEFAULT_EMBED_DIMS)
        if decoder.get('embed_dims', DEFAULT_EMBED_DIMS) != dims:
            raise ValueError(f"encoder embed_dims ({dims}) and decoder embed_dims "
                             f"({decoder.get('embed_dims', DEFAULT_EMBED_DIMS)}) must be equal")
        self.backbone = MODELS.build(backbone)
        self.neck = None
        if neck is not None:
            neck = derived(neck, 'out_channels', dims, "the transformer's embed_dims")
            if 'num_outs' in neck or neck['type'] in ('ChannelMapper', 'mmdet.ChannelMapper'):
                neck = derived(neck, 'num_outs', num_feature_levels, 'num_feature_levels')
            self.neck = MODELS.build(neck)
        self.encoder = DeformableEncoder(num_levels=num_feature_levels, **encoder)
        self.decoder = DeformableDecoder(num_levels=num_feature_levels, **decoder)
        self.positional_encoding = MODELS.build(derived(
            {'type': 'SinePositionalEncoding', 'normalize': True, 'offset': -0.5,
             **(positional_encoding or {})},
            'num_feats', dims // 2, 'half the transformer\'s embed_dims'))
        self.level_embed = nn.Parameter(torch.randn(num_feature_levels, dims))
        if as_two_stage:
            self.memory_trans_fc = nn.Linear(dims, dims)
            self.memory_trans_norm = nn.LayerNorm(dims)
            self.pos_trans_fc = nn.Linear(dims * 2, dims * 2)
            self.pos_trans_norm = nn.LayerNorm(dims * 2)
        else:
            # Learnt queries: positional half and content half.
            self.query_embedding = nn.Embedding(num_queries, dims * 2)
            self.reference_points_fc = nn.Linear(dims, 2)
        # One branch per decoder layer (+1 scoring the encoder proposals when
        # two-stage); all layers share one branch unless boxes are refined.
        head = derived(bbox_head, 'embed_dims', dims, 'the transformer\'s embed_dims')
        head = derived(head, 'num_pred_layer', self.decoder.num_layers + int(as_two_stage),
                       'the decoder layers (+1 when two-stage)')
        head = derived(head, 'share_pred_layer', not with_box_refine, 'not with_box_refine')
        head = derived(head, 'as_two_stage', as_two_stage, 'as_two_stage')
        self.bbox_head = MODELS.build(dict(head, train_cfg=train_cfg, test_cfg=test_cfg))

    def init_weights(self) -> None:
        """The paper's init; backbone, neck and head through their own."""
        super().init_weights()
        for p in [*self.encoder.parameters(), *self.decoder.parameters()]:
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.init_weights()
        if self.as_two_stage:
            nn.init.xavier_uniform_(self.memory_trans_fc.weight)
            nn.init.xavier_uniform_(self.pos_trans_fc.weight)
        else:
            nn.init.xavier_uniform_(self.reference_points_fc.weight)
            nn.init.zeros_(self.reference_points_fc.bias)
        nn.init.normal_(self.level_embed)

    def extract_feat(self, batch_inputs: Tensor) -> Tuple[Tensor, ...]:
        """Backbone and neck: ``num_feature_levels`` maps of ``embed_dims``."""
        feats = self.backbone(batch_inputs)
        return self.neck(feats) if self.neck is not None else feats

    # ------------------------------------------------------------------------------
    # The transformer, stage by stage
    # ------------------------------------------------------------------------------

    def forward_transformer(self, feats: Tuple[Tensor, ...],
                            batch_data_samples: OptSampleList = None) -> Dict:
        """Encoder, query selection and decoder.

        Returns:
            dict of the head's inputs: ``hidden_states``, ``references`` and, for
            two-stage, ``enc_outputs_class`` / ``enc_outputs_coord`` (else None).
        """
        return self.encode_decode(self.pre_transformer(feats, batch_data_samples))

    def encode_decode(self, levels: Dict[str, Tensor]) -> Dict:
        """The transformer from the flattened levels on: encoder, queries, decoder.

        The one sequence of the stages, which deployment and the non-finite diagnosis
        run too.

        Returns:
            dict as :meth:`forward_transformer` returns it.
        """
        memory = self.forward_encoder(levels)
        query, query_pos, reference_points, enc_outputs = self.pre_decoder(memory, levels)
        hidden_states, references = self.forward_decoder(query, query_pos, reference_points,
                                                         memory, levels)
        return dict(hidden_states=hidden_states, references=references, **enc_outputs)

    def pre_transformer(self, feats: Tuple[Tensor, ...],
                        batch_data_samples: OptSampleList = None) -> Dict[str, Tensor]:
        """The levels as one sequence, with positions, padding masks and valid ratios.

        Returns:
            dict of ``feat`` (bs, N, C), ``feat_pos`` (position + level embedding),
            ``mask`` (bs, N) or None, ``spatial_shapes`` (L, 2), ``level_start_index``
            (L,) and ``valid_ratios`` (bs, L, 2).
        """
        masks = None
        if batch_data_samples is not None:
            metas = [s.metainfo for s in batch_data_samples]
            img_shapes = [tuple(m['img_shape'][:2]) for m in metas]
            batch_shape = tuple(metas[0]['batch_input_shape'])
            # Nothing padded: every layer skips masking (mmdet does the same, and the
            # outputs are identical).
            if any(shape != batch_shape for shape in img_shapes):
                masks = padding_masks(torch.tensor(img_shapes, device=feats[0].device),
                                      batch_shape, [f.shape[-2:] for f in feats])
        return self.embed_levels(feats, masks)

    def embed_levels(self, feats: Tuple[Tensor, ...],
                     masks: Optional[Sequence[Tensor]]) -> Dict[str, Tensor]:
        """The levels as one sequence (:func:`flatten_levels`), with their positions.

        Args:
            feats: The neck's maps.
            masks: Per level (bs, h, w), True at padding; None where nothing is padded.
        """
        if masks is None:
            pos = [self.positional_encoding(None, input=f) for f in feats]
        else:
            pos = [self.positional_encoding(m) for m in masks]
        return flatten_levels(feats, pos, self.level_embed, masks)

    def forward_encoder(self, levels: Dict[str, Tensor]) -> Tensor:
        """The encoder's output, the memory: (bs, N, C)."""
        return self.encoder(**levels)

    def pre_decoder(self, memory: Tensor, levels: Dict[str, Tensor]
                    ) -> Tuple[Tensor, Tensor, Tensor, Dict[str, Optional[Tensor]]]:
        """The decoder's queries and their initial references.

        Learnt queries start from points predicted from their positional half. Two-stage
        scores every encoder pixel as a proposal with the head's extra branch; the top
        ``num_queries`` boxes become the references, and their sine embeddings the
        queries.

        Returns:
            query and query_pos (bs, nq, C), reference points (bs, nq, 2) or boxes
            (bs, nq, 4), and the encoder's proposal logits and boxes for the loss
            (``enc_outputs_class``, ``enc_outputs_coord``; None unless two-stage).
        """
        bs, dims = memory.shape[0], self.embed_dims
        if not self.as_two_stage:
            query_pos, query = self.query_embedding.weight.split(dims, -1)
            query_pos = query_pos[None].expand(bs, -1, -1)
            query = query[None].expand(bs, -1, -1)
            reference_points = self.reference_points_fc(query_pos).sigmoid()
            return query, query_pos, reference_points, dict(enc_outputs_class=None,
                                                            enc_outputs_coord=None)
        out_memory, proposals = encoder_proposals(memory, levels['mask'],
                                                  levels['level_shapes'])
        out_memory = self.memory_trans_norm(self.memory_trans_fc(out_memory))
        last = proposal_branch_index(self.decoder.num_layers)
        enc_class = self.bbox_head.cls_branches[last](out_memory)
        enc_coord_logit = self.bbox_head.reg_branches[last](out_memory) + proposals
        # Class-agnostic: only the first class channel scores proposals. A small image
        # may have fewer pixels than queries: then every proposal is taken.
        num_queries = min(self.num_queries, enc_class.shape[1])
        topk = enc_class[..., 0].topk(num_queries, dim=1)[1]
        topk_logit = enc_coord_logit.gather(1, topk[..., None].expand(-1, -1, 4)).detach()
        pos_trans = self.pos_trans_fc(proposal_pos_embed(topk_logit, dims // 2))
        query_pos, query = self.pos_trans_norm(pos_trans).split(dims, -1)
        return query, query_pos, topk_logit.sigmoid(), dict(
            enc_outputs_class=enc_class, enc_outputs_coord=enc_coord_logit.sigmoid())

    def forward_decoder(self, query: Tensor, query_pos: Tensor, reference_points: Tensor,
                        memory: Tensor, levels: Dict[str, Tensor]):
        """Every decoder layer's output (num_layers, bs, nq, C) and the references
        (the initial one, then each layer's)."""
        return self.decoder(
            query, query_pos, memory, levels['mask'], reference_points,
            levels['spatial_shapes'], levels['level_start_index'], levels['valid_ratios'],
            reg_branches=self.bbox_head.reg_branches if self.with_box_refine else None)

    # ------------------------------------------------------------------------------
    # MMDetection's three modes
    # ------------------------------------------------------------------------------

    def loss(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> Dict[str, Tensor]:
        """Losses of a batch (``mode='loss'``).

        Raises:
            ValueError: a batch whose size the model cannot train on (named, with the
                limit).
            NonFiniteError: a loss term is NaN or infinite, here or in another process
                (the iteration, the terms and the first non-finite tensor named).
        """
        self.check_batch_size(batch_inputs)
        outs = self.forward_transformer(self.extract_feat(batch_inputs), batch_data_samples)
        losses = self.bbox_head.loss(**outs, batch_data_samples=batch_data_samples)
        check_losses(losses, self, batch_inputs, batch_data_samples)
        return losses

    def check_batch_size(self, batch_inputs: Tensor) -> None:
        """Refuses, before anything runs, the one size training cannot handle.

        Any image size works (two-stage selects at most as many proposals as the
        encoder has pixels), except that BatchNorm layers that train need more than one
        value per channel: one image whose last backbone map is 1x1 has only one.
        """
        if not self.training or batch_inputs.shape[0] > 1:
            return
        stride = backbone_stride(self.backbone)
        training_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                          for m in self.backbone.modules())
        h, w = batch_inputs.shape[-2:]
        if stride and training_bn and math.ceil(h / stride) * math.ceil(w / stride) == 1:
            raise ValueError(
                f'a batch of one {h}x{w} image is too small to train this backbone: its '
                f'stride-{stride} map is 1x1, and its BatchNorm layers, training, need more '
                f'than one value per channel. Use images over {stride} px on one side, '
                'batches of 2 or more, or frozen BatchNorm (norm_eval=True)')

    def predict(self, batch_inputs: Tensor, batch_data_samples: SampleList,
                rescale: bool = True) -> SampleList:
        """Detections as ``pred_instances`` of the data samples (``mode='predict'``)."""
        outs = self.forward_transformer(self.extract_feat(batch_inputs), batch_data_samples)
        results = self.bbox_head.predict(outs['hidden_states'], outs['references'],
                                         batch_data_samples, rescale=rescale)
        return self.add_pred_to_datasample(batch_data_samples, results)

    def _forward(self, batch_inputs: Tensor,
                 batch_data_samples: OptSampleList = None) -> Tuple[Tensor, Tensor]:
        """Raw logits and boxes of every decoder layer (``mode='tensor'``)."""
        outs = self.forward_transformer(self.extract_feat(batch_inputs), batch_data_samples)
        return self.bbox_head(outs['hidden_states'], outs['references'])


def backbone_stride(backbone: nn.Module) -> Optional[int]:
    """The output stride of an mmdet ResNet-style backbone's last stage, else None."""
    strides = getattr(backbone, 'strides', None)
    if not isinstance(strides, (tuple, list)):
        return None
    return 4 * math.prod(strides[:getattr(backbone, 'num_stages', len(strides))])


# ----------------------------------------------------------------------------------
# Two-stage: proposals from the encoder output
# ----------------------------------------------------------------------------------


def encoder_proposals(memory: Tensor, mask: Optional[Tensor],
                      level_shapes: Sequence[Tuple[int, int]]) -> Tuple[Tensor, Tensor]:
    """One proposal per pixel: its centre, a size of 0.05 * 2**level.

    ``level_shapes`` holds the (h, w) of every level as Python sizes
    (:func:`~..layers.deformable_transformer.flatten_levels`).

    Returns:
        memory with padded / border pixels zeroed, (bs, N, C), and the proposals
        in inverse-sigmoid space (bs, N, 4), +inf where a proposal is invalid
        (padding, or too close to the border) so that it can never be chosen.
    """
    bs = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(level_shapes):
        grid_y, grid_x = pixel_centres(h, w, memory.device)
        if mask is not None:  # normalised by each image's valid size
            level_mask = mask[:, start:start + h * w].view(bs, h, w)
            size = torch.stack([(~level_mask[:, 0, :]).sum(1), (~level_mask[:, :, 0]).sum(1)],
                               -1).view(bs, 1, 1, 2)
            grid = torch.stack([grid_x, grid_y], -1)[None] / size
        else:  # divided by the sizes themselves: a tensor of them would fix them in torch.export
            grid = torch.stack([grid_x / w, grid_y / h], -1)[None].expand(bs, -1, -1, -1)
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
