"""Hungarian assigner: optimal against brute force, costs as mmdet's."""
import itertools
import math

import pytest
import torch
from mmdet.models.task_modules import HungarianAssigner as MMDetHungarianAssigner
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy
from mmengine.structures import InstanceData

from projects.deformable_detr import HungarianAssigner

pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.numerics]


def random_case(nq, ng, num_classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(nq, num_classes, generator=gen)
    centers = torch.rand(nq + ng, 2, generator=gen) * 0.6 + 0.2
    sizes = torch.rand(nq + ng, 2, generator=gen) * 0.3 + 0.05
    boxes = torch.cat([centers, sizes], 1)
    labels = torch.randint(0, num_classes, (ng, ), generator=gen)
    return logits, boxes[:nq], labels, boxes[nq:]


@pytest.mark.parametrize('nq,ng', [(1, 1), (3, 2), (4, 3), (5, 5), (6, 2), (2, 4)])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_brute_force(nq, ng, seed):
    logits, boxes, labels, gt_boxes = random_case(nq, ng, seed=seed)
    assigner = HungarianAssigner()
    cost = assigner.cost_matrix(logits, boxes, labels, gt_boxes)
    rows, cols = assigner.assign(logits, boxes, labels, gt_boxes)
    assert len(rows) == len(cols) == min(nq, ng)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    # Every way of pairing min(nq, ng) queries with as many gts, one to one.
    if nq >= ng:
        best = min(sum(cost[q, g] for g, q in enumerate(perm))
                   for perm in itertools.permutations(range(nq), ng))
    else:
        best = min(sum(cost[q, g] for q, g in enumerate(perm))
                   for perm in itertools.permutations(range(ng), nq))
    # Two float32 sums of the same min(nq, ng) <= 5 costs in other orders: 5 eps32 = 6e-7.
    assert cost[rows, cols].sum().item() == pytest.approx(float(best), rel=1e-6, abs=1e-6)


def test_cost_equals_mmdet_match_costs():
    logits, boxes, labels, gt_boxes = random_case(7, 3, num_classes=4, seed=3)
    h, w = 48, 64
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    theirs = MMDetHungarianAssigner(match_costs=[
        dict(type='FocalLossCost', weight=2.0),
        dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
        dict(type='IoUCost', iou_mode='giou', weight=2.0)])
    costs = [c(InstanceData(scores=logits, bboxes=bbox_cxcywh_to_xyxy(boxes) * scale),
               InstanceData(labels=labels, bboxes=bbox_cxcywh_to_xyxy(gt_boxes) * scale),
               dict(img_shape=(h, w))) for c in theirs.match_costs]
    ours = HungarianAssigner().cost_matrix(logits, boxes, labels, gt_boxes, (h, w))
    # The same three costs in float32 by two codes: focal (a log and a few products), L1
    # (4 terms, mmdet's in pixels then scaled back), GIoU (areas of pixel boxes up to
    # 64 x 48): tens of eps32 relative, 1e-5 = 84 eps32.
    torch.testing.assert_close(ours, sum(costs), rtol=1e-5, atol=1e-5)


def test_weights_scale_their_costs():
    logits, boxes, labels, gt_boxes = random_case(4, 2, seed=4)
    only_l1 = HungarianAssigner(cls_weight=0, l1_weight=1, giou_weight=0)
    # 4-term L1 sums in two orders: default float32 tolerance.
    torch.testing.assert_close(only_l1.cost_matrix(logits, boxes, labels, gt_boxes),
                               torch.cdist(boxes, gt_boxes, p=1))


def test_no_gt_or_no_query():
    logits, boxes, labels, gt_boxes = random_case(4, 0)
    rows, cols = HungarianAssigner().assign(logits, boxes, labels, gt_boxes)
    assert rows.numel() == cols.numel() == 0 and rows.dtype == torch.long
    logits, boxes, labels, gt_boxes = random_case(0, 2)
    rows, cols = HungarianAssigner().assign(logits, boxes, labels, gt_boxes)
    assert rows.numel() == 0


def test_batched_costs_equal_one_by_one():
    """cost_matrices computes problems of one size together, the ground truth padded:
    the same matrices as one by one, and the same matches. Bound: every element goes
    through the same ~16 float32 operations either way; only where a vectorised and a
    scalar transcendental (sigmoid, log, pow) round differently may they differ, by a
    few ulp of the terms: 64 eps of the largest the terms can add up to in magnitude,
    cls_weight * -log(eps) (the focal terms) + l1_weight * 4 (an L1 distance of
    normalised boxes) + giou_weight * 1 (GIoU is in [-1, 1])."""
    cases = [random_case(6, ng, seed=ng) for ng in (3, 0, 5, 1)]  # one group of 4
    cases.append(random_case(9, 2, seed=9))                      # a group of its own
    sizes = [(48, 64), None, (64, 64), (100, 30), (20, 20)]
    problems = [(*case, size) for case, size in zip(cases, sizes)]
    assigner = HungarianAssigner()
    terms = (assigner.cls_weight * -math.log(assigner.eps) + assigner.l1_weight * 4
             + assigner.giou_weight * 1)
    atol = 64 * torch.finfo(torch.float32).eps * terms
    batched = assigner.cost_matrices(problems)
    one_by_one = [assigner.cost_matrix(*problem) for problem in problems]
    for together, alone in zip(batched, one_by_one):
        assert together.shape == alone.shape
        torch.testing.assert_close(together, alone, rtol=0, atol=atol)
    matches = assigner.assign_batch(problems)
    for (rows, cols), problem in zip(matches, problems):
        expected = assigner.assign(*problem)
        assert torch.equal(rows, expected[0]) and torch.equal(cols, expected[1])
