"""One-to-one matching of queries to ground truth (DETR's Hungarian matcher)."""
from typing import Optional, Tuple

import torch
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_overlaps
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .registry import TASK_UTILS


@TASK_UTILS.register_module()
class HungarianAssigner:
    """Minimum-cost matching over a weighted focal + L1 + GIoU cost.

    Args:
        cls_weight: Weight of the focal classification cost.
        l1_weight: Weight of the L1 cost between normalised (cx, cy, w, h) boxes.
        giou_weight: Weight of the (negative) GIoU cost.
        alpha: Focal alpha.
        gamma: Focal gamma.
        eps: Keeps the logs finite.
    """

    def __init__(self, cls_weight: float = 2.0, l1_weight: float = 5.0,
                 giou_weight: float = 2.0, alpha: float = 0.25, gamma: float = 2.0,
                 eps: float = 1e-12) -> None:
        self.cls_weight, self.l1_weight, self.giou_weight = cls_weight, l1_weight, giou_weight
        self.alpha, self.gamma, self.eps = alpha, gamma, eps

    def cost_matrix(self, cls_logits: Tensor, pred_boxes: Tensor, gt_labels: Tensor,
                    gt_boxes: Tensor, img_size: Optional[Tuple[int, int]] = None) -> Tensor:
        """(num_queries, num_gts) matching cost; arguments as in :meth:`assign`."""
        prob = cls_logits.sigmoid()[:, gt_labels]
        # Focal loss of calling the query positive minus that of calling it negative.
        pos = -(prob + self.eps).log() * self.alpha * (1 - prob).pow(self.gamma)
        neg = -(1 - prob + self.eps).log() * (1 - self.alpha) * prob.pow(self.gamma)
        l1 = torch.cdist(pred_boxes, gt_boxes, p=1)
        # GIoU is scale-free; taking it in pixels only mirrors mmdet's numerics.
        scale = pred_boxes.new_tensor([img_size[1], img_size[0]] * 2) if img_size else 1.0
        giou = bbox_overlaps(bbox_cxcywh_to_xyxy(pred_boxes) * scale,
                             bbox_cxcywh_to_xyxy(gt_boxes) * scale, mode='giou')
        return self.cls_weight * (pos - neg) + self.l1_weight * l1 - self.giou_weight * giou

    @torch.no_grad()
    def assign(self, cls_logits: Tensor, pred_boxes: Tensor, gt_labels: Tensor,
               gt_boxes: Tensor, img_size: Optional[Tuple[int, int]] = None
               ) -> Tuple[Tensor, Tensor]:
        """Matches queries to ground-truth objects.

        Args:
            cls_logits: (num_queries, num_classes) classification logits.
            pred_boxes: (num_queries, 4) normalised (cx, cy, w, h).
            gt_labels: (num_gts,) labels.
            gt_boxes: (num_gts, 4) normalised (cx, cy, w, h).
            img_size: (h, w) of the image, for the GIoU numerics only.

        Returns:
            Matched query indices and, aligned with them, gt indices (int64, on
            the device of ``cls_logits``); min(num_queries, num_gts) pairs.
        """
        if len(gt_labels) == 0 or len(cls_logits) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=cls_logits.device)
            return empty, empty.clone()
        cost = self.cost_matrix(cls_logits, pred_boxes, gt_labels, gt_boxes, img_size)
        rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
        return (torch.as_tensor(rows, dtype=torch.long, device=cls_logits.device),
                torch.as_tensor(cols, dtype=torch.long, device=cls_logits.device))
