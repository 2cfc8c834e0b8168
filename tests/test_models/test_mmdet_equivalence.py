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


@pytest.mark.parametrize('batch', list(BATCHES))
def test_losses_and_gradients(pair, batch, make_batch):
    theirs, ours = pair
    inputs, samples = make_batch(**BATCHES[batch])
    grads = []
    losses = []
    for model in (theirs, ours):
        model.train()
        model.zero_grad()
        loss = model(inputs, copy.deepcopy(samples), mode='loss')
        sum(loss.values()).backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert list(losses[0]) == list(losses[1])  # names and order
    for key in losses[0]:
        # (mmdet's loss_cls has shape (1,): its normaliser is a 1-element tensor)
        torch.testing.assert_close(losses[1][key], losses[0][key].reshape(()), rtol=1e-5,
                                   atol=1e-6, msg=lambda m, key=key: f'{key}: {m}')
    assert set(grads[0]) <= set(grads[1])  # ours also has the (zero) neck biases
    for name, grad in grads[0].items():
        scale = grad.abs().max().item() + 1e-8
        diff = (grads[1][name] - grad).abs().max().item()
        assert diff <= 1e-3 * scale + 1e-6, f'{name}: {diff} vs max {scale}'


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
