"""Same weights, same inputs: our model computes what mmdet 3.3's computes.

mmdet's model is built from mmdet's own config files, ours from ours (both shrunk
to ResNet-18 and two encoder / decoder layers for CPU speed), mmdet's weights are
perturbed so that no parameter stays at a trivial init, then loaded into ours.
"""
import copy

import pytest
import torch

pytestmark = pytest.mark.usefixtures('one_thread')

BATCHES = {
    'padded': dict(img_shapes=((64, 96), (56, 80)), num_gts=(3, 2)),  # masks, ratios < 1
    'unpadded': dict(img_shapes=((64, 96), (64, 96)), num_gts=(1, 4)),  # no masks
}


@pytest.fixture(scope='module', params=['plain', 'refine', 'twostage'])
def pair(request, build_pair):
    return build_pair(request.param)


def losses_and_gradients(model, inputs, samples, dtype):
    """Losses and parameter gradients of a copy of ``model`` run in ``dtype``."""
    model = copy.deepcopy(model).to(dtype)
    model.train()
    samples = copy.deepcopy(samples)
    for sample in samples:
        sample.gt_instances.bboxes = sample.gt_instances.bboxes.to(dtype)
    losses = model(inputs.to(dtype), samples, mode='loss')
    sum(losses.values()).backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def assert_grads_close(actual, expected, rtol):
    """Every gradient within ``rtol`` of its largest magnitude."""
    assert set(expected) <= set(actual)  # ours also has the (zero) neck biases
    for name, grad in expected.items():
        scale = grad.abs().max().item() + 1e-12
        diff = (actual[name] - grad).abs().max().item()
        assert diff <= rtol * scale, f'{name}: {diff:.3g} vs max {scale:.3g}'


@pytest.mark.parametrize('batch', list(BATCHES))
def test_losses_and_gradients(pair, batch, make_batch):
    theirs, ours = pair
    inputs, samples = make_batch(**BATCHES[batch])
    their_losses, _ = losses_and_gradients(theirs, inputs, samples, torch.float32)
    our_losses, our_grads = losses_and_gradients(ours, inputs, samples, torch.float32)
    assert list(their_losses) == list(our_losses)  # names and order
    for key in their_losses:
        # (mmdet's loss_cls has shape (1,): its normaliser is a 1-element tensor)
        torch.testing.assert_close(our_losses[key], their_losses[key].reshape(()),
                                   rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f'{key}: {m}')
    # The gradients are compared with mmdet's in float64, the truth both approximate:
    # mmcv's grid_sample path loses more in float32 (up to 4e-3 of a gradient's scale,
    # e.g. the encoder FFN of the refine model here) than our kernel does (1e-6).
    _, their_grads64 = losses_and_gradients(theirs, inputs, samples, torch.float64)
    _, our_grads64 = losses_and_gradients(ours, inputs, samples, torch.float64)
    # (1e-6, not 1e-15: both models make a few constants in float32, e.g. valid ratios.)
    assert_grads_close(our_grads64, their_grads64, 1e-6)
    assert_grads_close(our_grads, their_grads64, 1e-4)


@pytest.mark.parametrize('batch', list(BATCHES))
def test_predictions(pair, batch, make_batch):
    theirs, ours = pair
    inputs, samples = make_batch(**BATCHES[batch])
    results = []
    for model in (theirs, ours):
        model.eval()
        with torch.no_grad():
            results.append(model(inputs, copy.deepcopy(samples), mode='predict'))
    for a, b in zip(*results):
        a, b = a.pred_instances, b.pred_instances
        assert len(a) == len(b) == 100
        assert torch.equal(a.labels, b.labels)
        assert (a.scores - b.scores).abs().max() < 1e-4
        assert (a.bboxes - b.bboxes).abs().max() < 1e-4
