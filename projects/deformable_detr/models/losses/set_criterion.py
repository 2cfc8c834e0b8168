"""Set criterion: Hungarian matching, then focal + L1 + GIoU on the matches."""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_xyxy_to_cxcywh
from mmengine.dist import all_reduce
from mmengine.structures import InstanceData
from torch import Tensor, nn

from ...registry import MODELS, TASK_UTILS


class Target(NamedTuple):
    """One image's ground truth as the matching and the losses use it."""
    labels: Tensor  # (num_gts,)
    bboxes: Tensor  # (num_gts, 4) normalised (cx, cy, w, h)
    factors: Tensor  # (4,) the image's (w, h, w, h): normalised to pixels
    size: Tuple[int, int]  # (h, w)


@MODELS.register_module()
class SetCriterion(nn.Module):
    """DETR's set loss with auxiliary (every decoder layer) and encoder losses.

    Every loss is normalised by the number of ground-truth boxes, averaged over
    all processes under DDP, so that each box weighs the same whatever the
    distribution of boxes across GPUs (the classification loss by this process's
    own count when ``sync_cls_avg_factor`` is False, as in mmdet).

    Args:
        num_classes: Object classes (no background class: sigmoid focal).
        assigner: Config of the matcher (:class:`HungarianAssigner`).
        loss_cls: Config of the classification loss (mmdet's ``FocalLoss``).
        loss_bbox: Config of the box regression loss (mmdet's ``L1Loss``).
        loss_iou: Config of the IoU loss (mmdet's ``GIoULoss``).
        sync_cls_avg_factor: Average the classification loss's normaliser over
            processes too.
    """

    def __init__(self, num_classes: int, assigner: dict = dict(type='HungarianAssigner'),
                 loss_cls: dict = dict(type='FocalLoss', use_sigmoid=True, gamma=2.0,
                                       alpha=0.25, loss_weight=2.0),
                 loss_bbox: dict = dict(type='L1Loss', loss_weight=5.0),
                 loss_iou: dict = dict(type='GIoULoss', loss_weight=2.0),
                 sync_cls_avg_factor: bool = True) -> None:
        super().__init__()
        if not loss_cls.get('use_sigmoid', True):
            raise ValueError('Deformable DETR classifies with a sigmoid (focal loss); '
                             'loss_cls.use_sigmoid=False is not supported')
        self.num_classes = num_classes
        self.sync_cls_avg_factor = sync_cls_avg_factor
        self.assigner = TASK_UTILS.build(assigner)
        self.loss_cls = MODELS.build(loss_cls)
        self.loss_bbox = MODELS.build(loss_bbox)
        self.loss_iou = MODELS.build(loss_iou)

    @staticmethod
    def num_boxes(batch_gt_instances: Sequence[InstanceData], device: torch.device,
                  average: bool = True) -> Tensor:
        """Ground-truth boxes of this process (averaged over processes), at least 1.

        A tensor, not a number: reading it would synchronise the host with the device.
        """
        num = torch.tensor(float(sum(len(gt) for gt in batch_gt_instances)), device=device)
        if average:
            all_reduce(num, op='mean')  # a no-op outside distributed training
        return num.clamp(min=1.0)

    @staticmethod
    def matched_targets(labels: Tensor, targets: Sequence['Target'],
                        matches: Sequence[Optional[Tuple[Tensor, Tensor]]]
                        ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """What the matching assigns to the queries of a batch.

        Args:
            labels: (bs, nq) every query's label, "no object" to start with; the
                matched queries get their objects' labels, in place.
            targets, matches: as :meth:`loss_single` takes them.

        Returns:
            For the matched queries: their flat indices into (bs * nq), their target
            boxes (normalised (cx, cy, w, h)) and their images' pixel factors; None
            when nothing is matched.
        """
        nq = labels.shape[1]
        pred_idx: List[Tensor] = []
        matched: List[Tensor] = []
        factors: List[Tensor] = []
        for i, (target, match) in enumerate(zip(targets, matches)):
            if match is None:
                continue
            query_idx, gt_idx = match
            labels[i, query_idx] = target.labels[gt_idx]
            pred_idx.append(query_idx + i * nq)
            matched.append(target.bboxes[gt_idx])
            factors.append(target.factors.expand(len(gt_idx), 4))
        if not pred_idx:
            return None, None, None
        return torch.cat(pred_idx), torch.cat(matched), torch.cat(factors)

    def loss_single(self, cls_logits: Tensor, boxes: Tensor, targets: Sequence['Target'],
                    matches: Sequence[Optional[Tuple[Tensor, Tensor]]], num_boxes: Tensor,
                    cls_avg_factor: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Losses of one set of predictions, given its matching.

        Args:
            cls_logits: (bs, nq, num_classes) logits.
            boxes: (bs, nq, 4) normalised (cx, cy, w, h).
            targets: per image, the ground truth as :class:`Target`.
            matches: per image (query indices, gt indices), or None where the matching
                costs were not finite.
            num_boxes: normaliser of the box losses.
            cls_avg_factor: normaliser of the classification loss.

        Returns:
            Classification, L1 and IoU losses; NaN where an image could not be
            matched, so that the model's finiteness check reports it.
        """
        bs, nq, _ = cls_logits.shape
        labels = cls_logits.new_full((bs, nq), self.num_classes, dtype=torch.long)
        pred_idx, target, factor = self.matched_targets(labels, targets, matches)
        # Unmatched queries are trained towards "no object" (label num_classes).
        loss_cls = self.loss_cls(cls_logits.reshape(bs * nq, -1), labels.flatten(),
                                 avg_factor=cls_avg_factor)
        pred = boxes.reshape(bs * nq, 4)[pred_idx] if pred_idx is not None else boxes[:0, 0]
        if target is None:
            target, factor = pred.detach(), pred.new_ones(0, 4)
        loss_bbox = self.loss_bbox(pred, target, avg_factor=num_boxes)
        # IoU in pixels, as mmdet computes it (GIoU is scale-free up to its eps).
        loss_iou = self.loss_iou(bbox_cxcywh_to_xyxy(pred) * factor,
                                 bbox_cxcywh_to_xyxy(target) * factor, avg_factor=num_boxes)
        losses = (loss_cls, loss_bbox, loss_iou)
        if any(match is None for match in matches):
            losses = tuple(loss + float('nan') for loss in losses)
        return losses

    def forward(self, all_cls_logits: Tensor, all_boxes: Tensor,
                batch_gt_instances: Sequence[InstanceData], batch_img_metas: Sequence[dict],
                enc_cls_logits: Optional[Tensor] = None,
                enc_boxes: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """All losses, named as mmdet names them.

        Every prediction set (each decoder layer, and the encoder proposals) is matched
        in one call of the assigner, which copies all cost matrices to the host at once.

        Args:
            all_cls_logits: (num_layers, bs, nq, num_classes) of every decoder layer.
            all_boxes: (num_layers, bs, nq, 4) normalised (cx, cy, w, h).
            batch_gt_instances: per image ``labels`` and ``bboxes`` (pixel xyxy).
            batch_img_metas: per image meta, with ``img_shape``.
            enc_cls_logits, enc_boxes: two-stage encoder proposals (bs, N, ...).

        Returns:
            ``loss_cls/loss_bbox/loss_iou`` of the last layer, ``d{i}.loss_*`` of
            the others, and ``enc_loss_*`` for the encoder proposals.
        """
        device = all_cls_logits.device
        targets = self.targets(batch_gt_instances, batch_img_metas, all_boxes)
        sets = list(zip(all_cls_logits, all_boxes, [targets] * len(all_cls_logits)))
        if enc_cls_logits is not None:
            # Encoder proposals are class-agnostic: every object is class 0.
            agnostic = [t._replace(labels=torch.zeros_like(t.labels)) for t in targets]
            sets.append((enc_cls_logits, enc_boxes, agnostic))
        problems = [(cls[i].detach(), boxes[i].detach(), t.labels, t.bboxes, t.size)
                    for cls, boxes, set_targets in sets for i, t in enumerate(set_targets)]
        matches = self.assigner.assign_batch(problems)
        bs = len(targets)
        per_set = [matches[k * bs:(k + 1) * bs] for k in range(len(sets))]

        num_boxes = self.num_boxes(batch_gt_instances, device)
        cls_avg_factor = num_boxes if self.sync_cls_avg_factor else self.num_boxes(
            batch_gt_instances, device, average=False)
        per_set_losses = [self.loss_single(cls, boxes, set_targets, set_matches, num_boxes,
                                           cls_avg_factor)
                          for (cls, boxes, set_targets), set_matches in zip(sets, per_set)]
        return self.named(per_set_losses, with_encoder=enc_cls_logits is not None)

    @staticmethod
    def targets(batch_gt_instances: Sequence[InstanceData], batch_img_metas: Sequence[dict],
                like: Tensor) -> List[Target]:
        """Every image's ground truth as :class:`Target`, in the dtype and on the device
        of ``like``."""
        targets = []
        for gt, meta in zip(batch_gt_instances, batch_img_metas):
            h, w = meta['img_shape'][:2]
            factors = like.new_tensor([w, h, w, h])
            targets.append(Target(gt.labels, bbox_xyxy_to_cxcywh(gt.bboxes / factors),
                                  factors, (h, w)))
        return targets

    @staticmethod
    def named(per_set_losses: Sequence[Tuple[Tensor, Tensor, Tensor]],
              with_encoder: bool) -> Dict[str, Tensor]:
        """The losses of every prediction set (decoder layers, then the encoder
        proposals when ``with_encoder``), named as mmdet names them."""
        per_layer = list(per_set_losses)
        if with_encoder:
            *per_layer, enc = per_layer
        # mmdet's order (last layer first): summed totals then add up in the same order.
        *aux, last = per_layer
        losses = dict(zip(('loss_cls', 'loss_bbox', 'loss_iou'), last))
        for i, layer_losses in enumerate(aux):
            losses.update(zip((f'd{i}.loss_cls', f'd{i}.loss_bbox', f'd{i}.loss_iou'),
                              layer_losses))
        if with_encoder:
            losses.update(zip(('enc_loss_cls', 'enc_loss_bbox', 'enc_loss_iou'), enc))
        return losses
