"""Same weights, same inputs: our model computes what mmdet 3.3's computes.

mmdet's model is built from mmdet's own config files, ours from ours (both shrunk
to ResNet-18 and two encoder / decoder layers for CPU speed), mmdet's weights are
perturbed so that no parameter stays at a trivial init, then loaded into ours.
"""
import copy

import pytest
import torch

pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.numerics]

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


def relative_errors(actual, expected):
    """name: the largest error of each gradient over its largest magnitude."""
    assert set(expected) <= set(actual)  # ours also has the (zero) neck biases
    return {name: ((actual[name] - grad).abs().max() / (grad.abs().max() + 1e-30)).item()
            for name, grad in expected.items()}


def assert_grads_close(actual, expected, rtol):
    """Every gradient within ``rtol`` of its largest magnitude."""
    for name, err in relative_errors(actual, expected).items():
        assert err <= rtol, f'{name}: error {err:.3g} of its largest magnitude, over {rtol:.3g}'


def without_kinks(model):
    """A copy of ``model`` with every ReLU replaced by GELU.

    Wherever float32 rounding moves a ReLU's input across zero, that unit's gradient
    changes outright, not by a rounding: on a machine's CPU path (ATEN_CPU_CAPABILITY
    =default) one such unit moved an encoder FFN weight's float32 gradient by 2% of its
    scale. GELU is smooth, so float32 and float64 then differ by rounding alone.
    """
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.ReLU):
                setattr(module, name, torch.nn.GELU())
    return model


@pytest.mark.parametrize('batch', list(BATCHES))
def test_losses_and_gradients(pair, batch, make_batch):
    theirs, ours = pair
    inputs, samples = make_batch(**BATCHES[batch])
    # float64: the two models compute the same losses and gradients. (1e-6, not 1e-15:
    # both models make a few constants in float32, e.g. the valid ratios.)
    their_losses, their_grads64 = losses_and_gradients(theirs, inputs, samples, torch.float64)
    our_losses, our_grads64 = losses_and_gradients(ours, inputs, samples, torch.float64)
    assert list(their_losses) == list(our_losses)  # names and order
    for key in their_losses:
        # (mmdet's loss_cls has shape (1,): its normaliser is a 1-element tensor)
        torch.testing.assert_close(our_losses[key], their_losses[key].reshape(()),
                                   rtol=1e-6, atol=1e-9, msg=lambda m, key=key: f'{key}: {m}')
    assert_grads_close(our_grads64, their_grads64, 1e-6)
    # float32 losses against the float64 ones: each within n * eps32 of its value, n the
    # batch's pixel count, the longest sum of the forward pass (a convolution over
    # every pixel; the focal sum over queries x classes is shorter). Losses are
    # continuous, so ReLU's kink (below) moves them by a rounding only.
    bound = inputs[:, 0].numel() * torch.finfo(torch.float32).eps
    our_losses32, _ = losses_and_gradients(ours, inputs, samples, torch.float32)
    for key, truth in their_losses.items():
        torch.testing.assert_close(our_losses32[key].double(), truth.reshape(()), rtol=bound,
                                   atol=0, msg=lambda m, key=key: f'{key}: {m}')

    # float32 against the float64 truth, on the models without ReLU kinks. The longest
    # sum behind any gradient here runs over every pixel of the batch (a convolution's
    # weight, a level embedding), so each is within n * eps32 of its scale, n the
    # batch's pixel count. mmdet's own float32 error is measured alongside, to show.
    smooth_theirs, smooth_ours = without_kinks(theirs), without_kinks(ours)
    _, truth = losses_and_gradients(smooth_theirs, inputs, samples, torch.float64)
    _, our_grads = losses_and_gradients(smooth_ours, inputs, samples, torch.float32)
    _, their_grads = losses_and_gradients(smooth_theirs, inputs, samples, torch.float32)
    ours_err, theirs_err = relative_errors(our_grads, truth), relative_errors(their_grads, truth)
    worst = max(ours_err, key=ours_err.get)
    assert ours_err[worst] <= bound, (
        f'{worst}: float32 error {ours_err[worst]:.3g} of its scale, over n * eps32 = '
        f'{bound:.3g} (mmdet: {theirs_err[worst]:.3g}, at worst {max(theirs_err.values()):.3g})')


@pytest.mark.parametrize('batch', list(BATCHES))
def test_predictions(pair, batch, make_batch, assert_same_detections):
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
        # matched one to one: near-tied scores may sort the two models' lists differently.
        # Two float32 forward passes of one function (their float64 gradients agree to
        # 1e-6): scores in [0, 1] and boxes of at most 96 px apart by a few roundings of a
        # chain of sums, about ten eps32 of their scale: 96 px x 10 x 1.2e-7 ~ 1e-4.
        assert_same_detections(b.bboxes, b.scores, b.labels, a.bboxes, a.scores, a.labels,
                               score_tol=1e-4, box_tol=1e-4)
