"""The Deformable DETR detector: backbone, neck, deformable transformer, head."""
from typing import Dict, Optional, Tuple

import torch
from mmdet.models.detectors.base import BaseDetector
from mmdet.structures import OptSampleList, SampleList
from torch import Tensor, nn

from .multi_scale_deformable_attention import MultiScaleDeformableAttention
from .registry import MODELS
from .transformer import (DeformableDecoder, DeformableEncoder, encoder_output_proposals,
                          flatten_levels, padding_masks, proposal_pos_embed)


@MODELS.register_module()
class DeformableDETR(BaseDetector):
    """Deformable DETR (Zhu et al., ICLR 2021), with its two refinements.

    The state dict matches mmdet 3.3's ``DeformableDETR`` key for key.

    Args:
        backbone: Backbone config (mmdet's ``ResNet``).
        bbox_head: Head config (``ddetr.DeformableDETRHead``); the detector sets
            its ``num_pred_layer``, ``share_pred_layer`` and ``as_two_stage``.
        neck: Neck config mapping the backbone levels to ``num_feature_levels``
            maps of ``embed_dims`` channels (mmdet's ``ChannelMapper``).
        encoder: :class:`DeformableEncoder` arguments: ``num_layers``,
            ``embed_dims``, ``num_heads``, ``num_points``,
            ``feedforward_channels``, ``dropout``.
        decoder: :class:`DeformableDecoder` arguments, the same keys.
        positional_encoding: mmdet ``SinePositionalEncoding`` arguments.
        num_queries: Object queries (top-k proposals when two-stage).
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

        self.backbone = MODELS.build(backbone)
        self.neck = MODELS.build(neck) if neck is not None else None
        self.encoder = DeformableEncoder(num_levels=num_feature_levels, **(encoder or {}))
        self.decoder = DeformableDecoder(num_levels=num_feature_levels, **(decoder or {}))
        dims = self.embed_dims = self.encoder.embed_dims
        self.positional_encoding = MODELS.build({
            'type': 'SinePositionalEncoding', 'num_feats': dims // 2, 'normalize': True,
            'offset': -0.5, **(positional_encoding or {})})
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
        num_layers = self.decoder.num_layers
        self.bbox_head = MODELS.build(dict(
            bbox_head, num_pred_layer=num_layers + int(as_two_stage),
            share_pred_layer=not with_box_refine, as_two_stage=as_two_stage,
            train_cfg=train_cfg, test_cfg=test_cfg))

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

    def forward_transformer(self, feats: Tuple[Tensor, ...],
                            batch_data_samples: OptSampleList = None) -> Dict:
        """Encoder, query selection and decoder.

        Returns:
            dict of the head's inputs: ``hidden_states``, ``references`` and, for
            two-stage, ``enc_outputs_class`` / ``enc_outputs_coord`` (else None).
        """
        masks = None
        if batch_data_samples is not None:
            metas = [s.metainfo for s in batch_data_samples]
            masks = padding_masks([m['img_shape'][:2] for m in metas],
                                  metas[0]['batch_input_shape'],
                                  [f.shape[-2:] for f in feats], feats[0].device)
        if masks is None:
            pos = [self.positional_encoding(None, input=f) for f in feats]
        else:
            pos = [self.positional_encoding(m) for m in masks]
        inputs = flatten_levels(feats, pos, self.level_embed, masks)
        memory = self.encoder(**inputs)
        mask = inputs['mask']

        bs, dims = memory.shape[0], self.embed_dims
        enc_class = enc_coord = None
        if self.as_two_stage:
            # Score every encoder pixel as a proposal with the extra head branch;
            # the top-k boxes become the queries' reference boxes and positions.
            out_memory, proposals = encoder_output_proposals(memory, mask,
                                                             inputs['spatial_shapes'])
            out_memory = self.memory_trans_norm(self.memory_trans_fc(out_memory))
            last = self.decoder.num_layers
            enc_class = self.bbox_head.cls_branches[last](out_memory)
            enc_coord_logit = self.bbox_head.reg_branches[last](out_memory) + proposals
            enc_coord = enc_coord_logit.sigmoid()
            # Class-agnostic: only the first class channel scores proposals.
            topk = enc_class[..., 0].topk(self.num_queries, dim=1)[1]
            topk_logit = enc_coord_logit.gather(1, topk[..., None].expand(-1, -1, 4)).detach()
            reference_points = topk_logit.sigmoid()
            pos_trans = self.pos_trans_fc(proposal_pos_embed(topk_logit, dims // 2))
            query_pos, query = self.pos_trans_norm(pos_trans).split(dims, -1)
        else:
            query_pos, query = self.query_embedding.weight.split(dims, -1)
            query_pos = query_pos[None].expand(bs, -1, -1)
            query = query[None].expand(bs, -1, -1)
            reference_points = self.reference_points_fc(query_pos).sigmoid()

        hidden_states, references = self.decoder(
            query, query_pos, memory, mask, reference_points, inputs['spatial_shapes'],
            inputs['level_start_index'], inputs['valid_ratios'],
            reg_branches=self.bbox_head.reg_branches if self.with_box_refine else None)
        return dict(hidden_states=hidden_states, references=references,
                    enc_outputs_class=enc_class, enc_outputs_coord=enc_coord)

    def loss(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> Dict[str, Tensor]:
        """Losses of a batch (``mode='loss'``)."""
        outs = self.forward_transformer(self.extract_feat(batch_inputs), batch_data_samples)
        return self.bbox_head.loss(**outs, batch_data_samples=batch_data_samples)

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
