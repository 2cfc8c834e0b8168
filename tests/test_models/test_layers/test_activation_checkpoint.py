"""Activation checkpointing (``num_cp`` of the encoder and the decoder).

A checkpointed layer keeps no activations and recomputes them in backward, with the
RNG state of its forward. Non-reentrant checkpointing records the same autograd graph,
and the recomputation runs the same CPU kernels on the same inputs, so losses and
gradients are not just close but equal, bit for bit, dropout included.
"""
import copy
import os

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

from projects.deformable_detr.models.layers.deformable_transformer import (DeformableDecoder,
                                                                     DeformableEncoder)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
DEMO_CONFIG = os.path.join(ROOT, 'configs', 'synthetic',
                           'deformable-detr-refine-twostage_r18_1xb8-synthetic.py')


def demo_model(encoder_cp: int, decoder_cp: int, dropout: float = 0.1) -> torch.nn.Module:
    """The demo model (2 encoder, 3 decoder layers) with dropout, from seed 0."""
    init_default_scope('mmdet')
    cfg = copy.deepcopy(Config.fromfile(DEMO_CONFIG).model)
    cfg.encoder = dict(cfg.encoder, dropout=dropout, num_cp=encoder_cp)
    cfg.decoder = dict(cfg.decoder, dropout=dropout, num_cp=decoder_cp)
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.init_weights()
    return model


def count_forwards(model: torch.nn.Module) -> dict:
    """Calls of each transformer layer's forward, by name, counted from now on."""
    calls = {}
    for name, module in model.named_modules():
        if name.startswith(('encoder.layers.', 'decoder.layers.')) and name.count('.') == 2:
            calls[name] = 0

            def hook(module, args, name=name):
                calls[name] += 1
            module.register_forward_pre_hook(hook)
    return calls


def loss_and_grads(model, inputs, samples, seed: int):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout's masks
    losses = model(inputs, copy.deepcopy(samples), mode='loss')
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize('encoder_cp, decoder_cp', [(2, 3), (1, 2), (0, -1)])
def test_losses_and_every_gradient_equal_with_dropout(make_batch, one_thread, encoder_cp,
                                                      decoder_cp):
    inputs, samples = make_batch(num_classes=5)  # two image sizes: padded
    plain = demo_model(0, 0)
    checkpointed = demo_model(encoder_cp, decoder_cp)
    checkpointed.load_state_dict(plain.state_dict())
    calls = count_forwards(checkpointed)

    losses, grads = loss_and_grads(plain, inputs, samples, seed=1)
    cp_losses, cp_grads = loss_and_grads(checkpointed, inputs, samples, seed=1)

    # The checkpointed layers ran twice (forward, then the recomputation in backward).
    for name, n in calls.items():
        stack, index = name.split('.')[0], int(name.split('.')[2])
        limit = encoder_cp if stack == 'encoder' else decoder_cp
        assert n == (2 if index < limit else 1), (name, n)
    # Dropout is on: another seed gives other losses.
    other, _ = loss_and_grads(plain, inputs, samples, seed=2)
    assert any(not torch.equal(other[k], losses[k]) for k in losses)

    assert losses.keys() == cp_losses.keys()
    for key, value in losses.items():
        assert torch.equal(cp_losses[key], value), key
    assert grads.keys() == cp_grads.keys()
    missing = [n for n, g in grads.items() if g is None]
    assert not missing or missing == [n for n, g in cp_grads.items() if g is None]
    for name, grad in grads.items():
        if grad is not None:
            assert torch.equal(cp_grads[name], grad), name


def test_inference_recomputes_nothing(make_batch, one_thread):
    inputs, samples = make_batch(num_classes=5)
    plain, checkpointed = demo_model(0, 0), demo_model(2, 3)
    calls = count_forwards(checkpointed)
    for model in (plain, checkpointed):
        model.eval()
    with torch.no_grad():
        expected = plain(inputs, copy.deepcopy(samples), mode='tensor')
        got = checkpointed(inputs, copy.deepcopy(samples), mode='tensor')
    assert all(n == 1 for n in calls.values()), calls
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize('num_cp', [3, -2, True, 1.0, 'all', None])
def test_unknown_layer_count_is_refused(num_cp):
    for stack in (DeformableEncoder, DeformableDecoder):
        with pytest.raises(ValueError, match=r'num_cp=.*num_layers=2'):
            stack(num_layers=2, num_cp=num_cp, embed_dims=32, num_heads=4, num_levels=2,
                  num_points=2, feedforward_channels=64)


def test_torch_export_of_a_checkpointed_model(make_batch, one_thread):
    """Export (inference) ignores the switch: the graph is the plain model's."""
    inputs, _ = make_batch(num_classes=5)
    model = demo_model(2, 3).eval()
    program = torch.export.export(model, (inputs, ), kwargs=dict(mode='tensor'))
    with torch.no_grad():
        expected = model(inputs, mode='tensor')
    for a, b in zip(program.module()(inputs, mode='tensor'), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_of_a_checkpointed_stack(one_thread):
    """torch.compile traces the checkpointed layers (training, dropout on) and computes
    what eager does: the same kernels (aot_eager), so the same bits."""
    torch.manual_seed(0)
    encoder = DeformableEncoder(num_layers=2, num_cp=2, embed_dims=32, num_heads=4,
                                num_levels=2, num_points=2, feedforward_channels=64,
                                dropout=0.1)
    shapes = [(6, 8), (3, 4)]
    spatial = torch.tensor(shapes)
    start = torch.tensor([0, 48])
    feat = torch.randn(2, 60, 32, requires_grad=True)
    pos = torch.randn(2, 60, 32)
    ratios = torch.ones(2, 2, 2)

    def step(module):
        feat.grad = None
        module.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        out = module(feat, pos, None, spatial, start, ratios, shapes)
        out.square().sum().backward()
        return out.detach(), feat.grad.clone(), [p.grad.clone() for p in encoder.parameters()]

    compiled = torch.compile(encoder, backend='aot_eager')
    eager_out, eager_grad, eager_params = step(encoder)
    out, grad, params = step(compiled)
    assert torch.equal(out, eager_out)
    assert torch.equal(grad, eager_grad)
    for a, b in zip(params, eager_params):
        assert torch.equal(a, b)
