"""One-to-one matching of queries to ground truth (DETR's Hungarian matcher)."""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_overlaps
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from ....registry import TASK_UTILS


def _scale(like: Tensor, img_size: Optional[Tuple[int, int]]) -> Tensor:
    """(w, h, w, h) of an image, or ones: the factor to pixels of its GIoU cost."""
    values = [img_size[1], img_size[0]] * 2 if img_size else [1.0] * 4
    return like.new_tensor(values)


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
        scale = _scale(pred_boxes, img_size)
        return self._costs(cls_logits[None], pred_boxes[None], gt_labels[None],
                           gt_boxes[None], scale[None])[0]

    def _costs(self, cls_logits: Tensor, pred_boxes: Tensor, gt_labels: Tensor,
               gt_boxes: Tensor, scale: Tensor) -> Tensor:
        """(p, num_queries, num_gts) costs of p problems of the same sizes: logits (p, nq,
        num_classes), boxes (p, nq, 4) and (p, ng, 4), labels (p, ng), each problem's
        pixel scale (p, 4)."""
        prob = cls_logits.sigmoid().gather(
            2, gt_labels[:, None, :].expand(-1, cls_logits.shape[1], -1))
        # Focal loss of calling the query positive minus that of calling it negative.
        pos = -(prob + self.eps).log() * self.alpha * (1 - prob).pow(self.gamma)
        neg = -(1 - prob + self.eps).log() * (1 - self.alpha) * prob.pow(self.gamma)
        l1 = torch.cdist(pred_boxes, gt_boxes, p=1)
        # GIoU is scale-free; taking it in pixels only mirrors mmdet's numerics.
        giou = bbox_overlaps(bbox_cxcywh_to_xyxy(pred_boxes) * scale[:, None],
                             bbox_cxcywh_to_xyxy(gt_boxes) * scale[:, None], mode='giou')
        return self.cls_weight * (pos - neg) + self.l1_weight * l1 - self.giou_weight * giou

    def cost_matrices(self, problems: Sequence[Tuple[Tensor, Tensor, Tensor, Tensor,
                                                     Optional[Tuple[int, int]]]]
                      ) -> List[Tensor]:
        """The cost matrix of every problem (arguments as :meth:`assign_batch`'s).

        Problems with the same number of queries and classes are computed in one pass,
        their ground truth padded to the largest count: one set of small operations
        for all the images of all the decoder layers, not one per image and layer.
        """
        costs: List[Optional[Tensor]] = [None] * len(problems)
        groups: Dict[Tuple, List[int]] = {}
        for k, (cls_logits, *_) in enumerate(problems):
            groups.setdefault((tuple(cls_logits.shape), cls_logits.dtype,
                               cls_logits.device), []).append(k)
        for members in groups.values():
            counts = [len(problems[k][2]) for k in members]
            if len(members) == 1 or not max(counts) or not len(problems[members[0]][0]):
                for k in members:
                    costs[k] = self.cost_matrix(*problems[k])
                continue
            cls_logits = torch.stack([problems[k][0] for k in members])
            pred_boxes = torch.stack([problems[k][1] for k in members])
            # Padding: label 0 and the box (0.5, 0.5, 0.5, 0.5), finite costs in columns
            # that are dropped.
            gt_labels = pad_sequence([problems[k][2] for k in members], batch_first=True)
            gt_boxes = pad_sequence([problems[k][3] for k in members], batch_first=True,
                                    padding_value=0.5)
            scale = torch.stack([_scale(pred_boxes, problems[k][4]) for k in members])
            batched = self._costs(cls_logits, pred_boxes, gt_labels, gt_boxes, scale)
            for i, (k, count) in enumerate(zip(members, counts)):
                costs[k] = batched[i, :, :count]
        return costs

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

        Raises:
            ValueError: the cost matrix holds NaN or infinity.
        """
        match, = self.assign_batch([(cls_logits, pred_boxes, gt_labels, gt_boxes, img_size)])
        if match is None:
            raise ValueError('the matching costs are not finite: the predictions or the '
                             'ground-truth boxes hold NaN or infinity')
        return match

    @torch.no_grad()
    def assign_batch(self, problems: Sequence[Tuple[Tensor, Tensor, Tensor, Tensor,
                                                     Optional[Tuple[int, int]]]]
                     ) -> List[Optional[Tuple[Tensor, Tensor]]]:
        """Matches many prediction sets (every image of every decoder layer) at once.

        The cost matrices are computed on the predictions' device and copied to the
        host together: one synchronisation for all of them, not one per matrix.

        Args:
            problems: (cls_logits, pred_boxes, gt_labels, gt_boxes, img_size) tuples,
                as the arguments of :meth:`assign`.

        Returns:
            Per problem, the (query indices, gt indices) of :meth:`assign`, or None when
            its cost matrix is not finite (nothing is matched: scipy refuses such
            matrices, and the caller decides what a non-finite prediction means).
        """
        costs = self.cost_matrices(problems)
        if not costs:
            return []
        device = costs[0].device
        flat = torch.cat([c.float().flatten() for c in costs]).cpu().numpy()  # the one sync
        pairs, sizes = [], []
        start = 0
        for cost in costs:
            matrix = flat[start:start + cost.numel()].reshape(cost.shape)
            start += cost.numel()
            if not np.isfinite(matrix).all():
                sizes.append(None)
                continue
            rows, cols = linear_sum_assignment(matrix) if matrix.size else ([], [])
            pairs += [np.asarray(rows, np.int64), np.asarray(cols, np.int64)]
            sizes.append(len(rows))
        # All indices go back in one copy, queued on the stream (pinned: no host sync).
        indices = torch.from_numpy(np.concatenate(pairs)) if pairs else torch.zeros(
            0, dtype=torch.long)
        if device.type == 'cuda':
            indices = indices.pin_memory()
        indices = indices.to(device, non_blocking=True)
        matches: List[Optional[Tuple[Tensor, Tensor]]] = []
        start = 0
        for size in sizes:
            if size is None:
                matches.append(None)
                continue
            matches.append((indices[start:start + size], indices[start + size:start + 2 * size]))
            start += 2 * size
        return matches
