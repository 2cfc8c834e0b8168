"""Deformable DETR head: per-decoder-layer class and box branches."""
import copy
from typing import Dict, List, Optional, Tuple

import torch
from mmdet.structures import SampleList
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy
from mmengine.model import bias_init_with_prob
from mmengine.structures import InstanceData
from torch import Tensor, nn

from ...registry import MODELS
from ..layers.reference_points import refine


def proposal_branch_index(num_decoder_layers: int) -> int:
    """Index of the two-stage proposal branches among the head's class and box branches.

    The head has one branch per decoder layer, then, when two-stage, the one that scores
    the encoder's proposals (the official code's layout, which checkpoints keep).
    """
    return num_decoder_layers


def select_top_k(cls_logits: Tensor, boxes: Tensor, max_per_img: int
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """The prediction rule: the top ``max_per_img`` (query, class) pairs of every image.

    A query may appear with several classes: scores are independent sigmoids. Fewer are
    kept where there are fewer pairs.

    Args:
        cls_logits: (bs, nq, num_classes) logits.
        boxes: (bs, nq, 4) boxes of the queries.

    Returns:
        scores (bs, k) in descending order, labels (bs, k) int64 and their queries'
        boxes (bs, k, 4).
    """
    num_classes = cls_logits.shape[-1]
    k = min(max_per_img, cls_logits.shape[1] * num_classes)
    scores, index = cls_logits.sigmoid().flatten(1).topk(k, dim=1)
    boxes = boxes.gather(1, (index // num_classes)[..., None].expand(-1, -1, 4))
    return scores, index % num_classes, boxes


@MODELS.register_module()
class DeformableDETRHead(nn.Module):
    """Class logits (sigmoid focal, no background class) and boxes per layer.

    Boxes are predicted as offsets, in inverse-sigmoid space, from each layer's
    reference (point or box). Parameter names follow mmdet's head.

    Args:
        num_classes: Object classes.
        embed_dims: Channels of the decoder output.
        num_reg_fcs: Hidden layers of the box branch.
        num_pred_layer: Branches: decoder layers (+1 for two-stage proposals).
        share_pred_layer: One branch for all layers (no box refinement).
        as_two_stage: The detector is two-stage (affects the box-branch init).
        criterion: Config of the set loss (``ddetr.SetCriterion``, whose defaults are
            the paper's losses); ``num_classes`` and ``train_cfg.assigner`` are handed
            to it.
        sync_cls_avg_factor, loss_cls, loss_bbox, loss_iou: Arguments of the
            criterion, accepted here too as mmdet's head takes them (configs name
            them in one place or the other, not both).
        train_cfg: Dict with ``assigner``, the matcher's config.
        test_cfg: Dict with ``max_per_img``, detections kept per image.
    """

    def __init__(self, num_classes: int, embed_dims: int = 256, num_reg_fcs: int = 2,
                 num_pred_layer: int = 6, share_pred_layer: bool = False,
                 as_two_stage: bool = False, criterion: Optional[dict] = None,
                 sync_cls_avg_factor: Optional[bool] = None, loss_cls: Optional[dict] = None,
                 loss_bbox: Optional[dict] = None, loss_iou: Optional[dict] = None,
                 train_cfg: Optional[dict] = None,
                 test_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.num_classes, self.embed_dims = num_classes, embed_dims
        self.as_two_stage = as_two_stage
        unknown = set(test_cfg or {}) - {'max_per_img'}
        unknown |= set(train_cfg or {}) - {'assigner'}
        if unknown:  # refused rather than ignored
            raise ValueError(f'unknown train_cfg/test_cfg keys of DeformableDETRHead: '
                             f'{sorted(unknown)} (it knows assigner and max_per_img)')
        self.test_cfg = {'max_per_img': 100, **(test_cfg or {})}
        criterion = {'type': 'SetCriterion', **(criterion or {})}
        given = dict(sync_cls_avg_factor=sync_cls_avg_factor, loss_cls=loss_cls,
                     loss_bbox=loss_bbox, loss_iou=loss_iou,
                     assigner=(train_cfg or {}).get('assigner'))
        for key, value in given.items():
            if value is None:
                continue
            if key in criterion:
                raise ValueError(f'{key} is set twice: in the head (or train_cfg) and in '
                                 'its criterion; set it in one place')
            criterion[key] = value
        self.criterion = MODELS.build(dict(criterion, num_classes=num_classes))

        fc_cls = nn.Linear(embed_dims, num_classes)
        reg = []
        for _ in range(num_reg_fcs):
            reg += [nn.Linear(embed_dims, embed_dims), nn.ReLU()]
        reg_branch = nn.Sequential(*reg, nn.Linear(embed_dims, 4))
        # Shared: the same module repeated (its keys appear once per layer in
        # the state dict, as in mmdet and the official code).
        make = (lambda m: m) if share_pred_layer else copy.deepcopy
        self.cls_branches = nn.ModuleList([make(fc_cls) for _ in range(num_pred_layer)])
        self.reg_branches = nn.ModuleList([make(reg_branch) for _ in range(num_pred_layer)])

    def init_weights(self) -> None:
        """Prior 0.01 on every class; boxes start at their references."""
        for m in self.cls_branches:
            nn.init.constant_(m.bias, bias_init_with_prob(0.01))
        for m in self.reg_branches:
            nn.init.zeros_(m[-1].weight)
            nn.init.zeros_(m[-1].bias)
        # Points as references: the first layer starts with small boxes
        # (sigmoid(-2) ~ 0.12); box references already carry a size.
        if not self.as_two_stage:
            nn.init.constant_(self.reg_branches[0][-1].bias[2:], -2.0)

    def forward(self, hidden_states: Tensor, references: List[Tensor]
                ) -> Tuple[Tensor, Tensor]:
        """Class logits and boxes of every layer.

        Args:
            hidden_states: (num_layers, bs, nq, C).
            references: per layer (bs, nq, 2) points or (bs, nq, 4) boxes in
                [0, 1] (the decoder's list; extra entries are ignored).

        Returns:
            logits (num_layers, bs, nq, num_classes) and boxes
            (num_layers, bs, nq, 4), normalised (cx, cy, w, h).
        """
        outs = [self.forward_layer(i, hidden, references[i])
                for i, hidden in enumerate(hidden_states)]
        return torch.stack([c for c, _ in outs]), torch.stack([b for _, b in outs])

    def forward_layer(self, i: int, hidden: Tensor, reference: Tensor
                      ) -> Tuple[Tensor, Tensor]:
        """Logits and normalised (cx, cy, w, h) boxes of decoder layer ``i``."""
        return self.cls_branches[i](hidden), refine(reference, self.reg_branches[i](hidden))

    def loss(self, hidden_states: Tensor, references: List[Tensor],
             enc_outputs_class: Optional[Tensor], enc_outputs_coord: Optional[Tensor],
             batch_data_samples: SampleList) -> Dict[str, Tensor]:
        """Set losses of every layer (and of the encoder proposals)."""
        all_cls, all_boxes = self(hidden_states, references)
        return self.criterion(all_cls, all_boxes,
                              [s.gt_instances for s in batch_data_samples],
                              [s.metainfo for s in batch_data_samples],
                              enc_outputs_class, enc_outputs_coord)

    def predict(self, hidden_states: Tensor, references: List[Tensor],
                batch_data_samples: SampleList, rescale: bool = True) -> List[InstanceData]:
        """Detections of the last layer: top-k over (query, class) pairs."""
        last = len(hidden_states) - 1  # only the last layer's output is needed
        cls, boxes = self.forward_layer(last, hidden_states[last], references[last])
        return [self.predict_single(c, b, s.metainfo, rescale)
                for c, b, s in zip(cls, boxes, batch_data_samples)]

    def predict_single(self, cls_logits: Tensor, boxes: Tensor, img_meta: dict,
                       rescale: bool = True) -> InstanceData:
        """Top ``max_per_img`` scores of one image (:func:`select_top_k`), boxes in
        pixels (x1, y1, x2, y2)."""
        scores, labels, boxes = (out[0] for out in select_top_k(
            cls_logits[None], boxes[None], self.test_cfg['max_per_img']))
        bboxes = bbox_cxcywh_to_xyxy(boxes)
        h, w = img_meta['img_shape'][:2]
        bboxes[:, 0::2] = (bboxes[:, 0::2] * w).clamp(min=0, max=w)
        bboxes[:, 1::2] = (bboxes[:, 1::2] * h).clamp(min=0, max=h)
        if rescale:  # back to the original image
            bboxes /= bboxes.new_tensor(img_meta['scale_factor']).repeat(2)
        return InstanceData(bboxes=bboxes, scores=scores, labels=labels)
