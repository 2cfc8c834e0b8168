"""Degenerate sizes and boxes, and non-finite values: finite losses or a clear error."""
import copy

import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData

import projects.deformable_detr.models.task_modules.assigners.hungarian_assigner as assigner_module
from projects.deformable_detr import HungarianAssigner, SetCriterion
from projects.deformable_detr.models.utils.non_finite import NonFiniteError

pytestmark = pytest.mark.usefixtures('one_thread')



@pytest.fixture(scope='module')
def model(build_demo_model):
    return build_demo_model()


def batch(sizes, boxes=None, labels=None):
    """A padded batch of random images of ``sizes`` (h, w) with the given boxes."""
    gen = torch.Generator().manual_seed(0)
    pad_h, pad_w = max(h for h, _ in sizes), max(w for _, w in sizes)
    inputs = torch.zeros(len(sizes), 3, pad_h, pad_w)
    samples = []
    for i, (h, w) in enumerate(sizes):
        inputs[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                             scale_factor=(1.0, 1.0),
                                             batch_input_shape=(pad_h, pad_w)))
        b = torch.tensor(boxes[i] if boxes else [[0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h]],
                         dtype=torch.float32).reshape(-1, 4)
        lab = torch.tensor(labels[i] if labels else [1] * len(b), dtype=torch.long)
        sample.gt_instances = InstanceData(bboxes=b, labels=lab)
        samples.append(sample)
    return inputs, samples


def train_step(model, inputs, samples):
    model.train()
    model.zero_grad()
    losses = model.loss(inputs, copy.deepcopy(samples))
    total = sum(losses.values())
    total.backward()
    return losses, [p.grad for p in model.parameters() if p.grad is not None]


def assert_finite(losses, grads):
    for name, value in losses.items():
        assert torch.isfinite(value).all(), name
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize('sizes', [
    [(32, 32), (24, 40)],  # fewer encoder pixels (22) than the 50 queries; 1x1 levels
    [(16, 16), (200, 256)],  # heavy padding: the small image is one pixel at stride 16
    [(8, 8), (8, 8)],  # every level 1x1
])
def test_small_and_padded_images_train_and_predict(model, sizes):
    inputs, samples = batch(sizes, boxes=[[[0, 0, s[1] * 0.8, s[0] * 0.7]] for s in sizes])
    assert_finite(*train_step(model, inputs, samples))
    model.eval()
    with torch.no_grad():
        results = model.predict(inputs, copy.deepcopy(samples))
    for result in results:
        assert len(result.pred_instances) > 0
        assert torch.isfinite(result.pred_instances.bboxes).all()


@pytest.mark.parametrize('case,boxes,labels', [
    ('no objects in one image', [[[4, 4, 40, 40]], []], [[0], []]),
    ('no objects at all', [[], []], [[], []]),
    ('zero-area boxes', [[[10, 10, 10, 30], [5, 5, 5, 5]], [[20, 20, 20, 20]]], [[0, 1], [2]]),
    ('boxes partly outside', [[[-20, -10, 30, 30]], [[50, 50, 90, 120]]], [[3], [4]]),
])
def test_degenerate_boxes_give_finite_losses(model, case, boxes, labels):
    inputs, samples = batch([(64, 64), (64, 48)], boxes=boxes, labels=labels)
    assert_finite(*train_step(model, inputs, samples))


def test_one_tiny_image_with_training_batchnorm_is_refused(model):
    inputs, samples = batch([(24, 24)])
    model.train()
    with pytest.raises(ValueError, match=r'one 24x24 image.*stride-32 map is 1x1.*over 32 px'):
        model.loss(inputs, samples)
    model.loss(*batch([(40, 24)]))  # 2x1 at stride 32: fine


def test_nan_in_the_image_is_named(model):
    inputs, samples = batch([(64, 64), (64, 64)])
    inputs[1, 0, 5, 5] = float('nan')
    bad = copy.deepcopy(model)  # the failed forward pass leaves NaN BatchNorm statistics
    with pytest.raises(NonFiniteError, match=r'non-finite loss terms .*loss_cls=nan.*the '
                       r'first non-finite tensor: the input images: NaN in 1 of .* in images '
                       r'\[1\]'):
        bad.train().loss(inputs, samples)


def test_nan_in_a_parameter_is_named(model):
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.encoder.layers[1].ffn.layers[1].weight[0, 0] = float('inf')
    with pytest.raises(NonFiniteError, match=r'the parameter encoder\.layers\.1\.ffn\.layers\.'
                       r'1\.weight: Inf in 1 of'):
        bad.train().loss(*batch([(64, 64), (64, 64)]))


def test_first_non_finite_module_output_is_named(model):
    bad = copy.deepcopy(model)
    # An overflow inside the network: the neck's second level goes infinite.
    bad.neck.convs[1].register_forward_hook(lambda m, args, out: out * float('inf'))
    with pytest.raises(NonFiniteError, match=r'the output of neck\.convs\.1 \(ConvModule\)'):
        bad.train().loss(*batch([(64, 64), (64, 64)]))


def test_non_finite_costs_never_reach_scipy(monkeypatch):
    def refuse(matrix):
        raise AssertionError('scipy got a cost matrix')
    monkeypatch.setattr(assigner_module, 'linear_sum_assignment', refuse)
    logits = torch.randn(5, 3)
    logits[2, 1] = float('nan')
    matches = HungarianAssigner().assign_batch(
        [(logits, torch.rand(5, 4), torch.tensor([1]), torch.rand(1, 4), (10, 10))])
    assert matches == [None]
    with pytest.raises(ValueError, match='not finite'):
        HungarianAssigner().assign(logits, torch.rand(5, 4), torch.tensor([1]),
                                   torch.rand(1, 4))


def test_matcher_synchronises_once(monkeypatch):
    """All cost matrices (3 layers + the encoder's, 2 images) go to the host in one copy."""
    calls = {'cpu': 0, 'item': 0, 'tolist': 0}
    for name in calls:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    gts = [InstanceData(bboxes=torch.tensor([[1., 2, 30, 40], [5, 5, 9, 9]]),
                        labels=torch.tensor([0, 2])),
           InstanceData(bboxes=torch.tensor([[3., 3, 20, 20]]), labels=torch.tensor([1]))]
    metas = [dict(img_shape=(50, 60)), dict(img_shape=(40, 40))]
    losses = SetCriterion(num_classes=3)(torch.randn(3, 2, 7, 3), torch.rand(3, 2, 7, 4),
                                         gts, metas, torch.randn(2, 30, 3), torch.rand(2, 30, 4))
    assert len(losses) == 12
    assert calls == {'cpu': 1, 'item': 0, 'tolist': 0}
