"""Set criterion on a case small enough to compute by hand."""
import math

import pytest
import torch
from mmengine.structures import InstanceData

import projects.deformable_detr.models.losses.set_criterion as criterion_module
from projects.deformable_detr import SetCriterion

pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.numerics]


def hand_case():
    """One 100x100 image, one object (pixels (10, 10, 50, 50), class 1), two
    queries of two layers: query 0 sits on the object with half its height, query 1
    far away. All logits 0 (p = 0.5)."""
    boxes = torch.tensor([[0.3, 0.3, 0.4, 0.2], [0.8, 0.8, 0.1, 0.1]])
    all_boxes = boxes.expand(2, 1, 2, 4).clone().requires_grad_()
    all_logits = torch.zeros(2, 1, 2, 2, requires_grad=True)
    gt = InstanceData(bboxes=torch.tensor([[10., 10., 50., 50.]]), labels=torch.tensor([1]))
    return all_logits, all_boxes, [gt], [dict(img_shape=(100, 100))]


# Focal loss at p = 0.5: BCE = log 2, (1 - p_t)^2 = 1/4; alpha 0.25 on the single
# positive (query 0, class 1), 0.75 on the three negatives; weight 2, one box.
FOCAL = 2.0 * math.log(2) * (0.25 * 0.25 + 3 * 0.75 * 0.25)
# L1 between (0.3, 0.3, 0.4, 0.2) and (0.3, 0.3, 0.4, 0.4) is 0.2; weight 5.
L1 = 5.0 * 0.2
# Pred (10, 20, 50, 40) inside gt (10, 10, 50, 50): IoU 800/1600, enclosing box = gt,
# so GIoU = 0.5; loss weight 2 * (1 - GIoU).
GIOU = 2.0 * (1 - 0.5)


def test_hand_computed_losses():
    logits, boxes, gts, metas = hand_case()
    losses = SetCriterion(num_classes=2)(logits, boxes, gts, metas)
    expected = dict(loss_cls=FOCAL, loss_bbox=L1, loss_iou=GIOU)
    expected.update({f'd0.{k}': v for k, v in expected.items()})
    assert list(losses) == list(expected)
    for key, value in expected.items():
        # Hand-computed in float64; the criterion sums at most 8 float32 terms after a
        # log or a sigmoid each: within 10 eps32 = 1.2e-6, inside rel=1e-5.
        assert losses[key].item() == pytest.approx(value, rel=1e-5), key
    sum(losses.values()).backward()
    # Only the matched query's box gets a box gradient.
    assert boxes.grad[:, 0, 1].abs().sum() == 0 and boxes.grad[:, 0, 0].abs().sum() > 0


def test_encoder_loss_is_class_agnostic():
    logits, boxes, gts, metas = hand_case()
    enc_logits = torch.zeros(1, 2, 2)
    losses = SetCriterion(num_classes=2)(logits, boxes, gts, metas, enc_logits,
                                         boxes[0].detach())
    # The object counts as class 0 for the proposals: same focal sum as above.
    assert losses['enc_loss_cls'].item() == pytest.approx(FOCAL, rel=1e-5)
    assert losses['enc_loss_bbox'].item() == pytest.approx(L1, rel=1e-5)
    assert losses['enc_loss_iou'].item() == pytest.approx(GIOU, rel=1e-5)


def test_num_boxes_is_averaged_across_processes(monkeypatch):
    """Under DDP the normaliser is the mean box count over processes."""
    def fake_all_reduce(tensor, op='sum'):
        assert op == 'mean'
        tensor.copy_((tensor + 3.0) / 2)  # another process has 3 boxes
    monkeypatch.setattr(criterion_module, 'all_reduce', fake_all_reduce)
    logits, boxes, gts, metas = hand_case()
    losses = SetCriterion(num_classes=2)(logits, boxes, gts, metas)
    assert losses['loss_bbox'].item() == pytest.approx(L1 / 2.0, rel=1e-5)
    assert losses['loss_cls'].item() == pytest.approx(FOCAL / 2.0, rel=1e-5)


def test_cls_normaliser_is_local_without_sync_cls_avg_factor(monkeypatch):
    """sync_cls_avg_factor=False: as in mmdet, only the box losses' count is averaged."""
    def fake_all_reduce(tensor, op='sum'):
        tensor.copy_((tensor + 3.0) / 2)  # another process has 3 boxes
    monkeypatch.setattr(criterion_module, 'all_reduce', fake_all_reduce)
    logits, boxes, gts, metas = hand_case()
    losses = SetCriterion(num_classes=2, sync_cls_avg_factor=False)(logits, boxes, gts, metas)
    assert losses['loss_bbox'].item() == pytest.approx(L1 / 2.0, rel=1e-5)
    assert losses['loss_cls'].item() == pytest.approx(FOCAL, rel=1e-5)


def test_image_without_objects():
    logits, boxes, _, metas = hand_case()
    empty = InstanceData(bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
    losses = SetCriterion(num_classes=2)(logits, boxes, [empty], metas)
    assert losses['loss_bbox'].item() == 0 and losses['loss_iou'].item() == 0
    # Every query learns "no object": 4 negatives at p = 0.5, normalised by 1 (clamped).
    assert losses['loss_cls'].item() == pytest.approx(2.0 * math.log(2) * 4 * 0.75 * 0.25,
                                                      rel=1e-5)
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all()
