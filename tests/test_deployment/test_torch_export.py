"""torch.export of the detector's tensor-mode forward, the op a custom op (fake kernel)."""
import pytest
import torch


@pytest.mark.parametrize('name', ['demo', 'plain'])
def test_tensor_mode_exports_and_runs_as_eager(random_detector, name):
    model = random_detector(name)
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(model, (x, ), kwargs=dict(mode='tensor'))
    calls = [n.target for n in program.graph.nodes if n.op == 'call_function']
    op = torch.ops.ddetr.multi_scale_deformable_attn.default
    layers = model.encoder.num_layers + model.decoder.num_layers
    assert calls.count(op) == layers  # one node per attention layer, not decomposed
    with torch.no_grad():
        expected = model(x, mode='tensor')
        got = program.module()(x, mode='tensor')
    assert len(got) == len(expected) == 2  # class logits and boxes of every decoder layer
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        # The exported program runs the same kernels on the same inputs: torch's default
        # float32 tolerance (1.3e-6 relative, 1e-5 absolute) covers reordered sums.
        torch.testing.assert_close(g, e)


def test_dynamic_shapes_keep_sizes_symbolic(random_detector):
    """The level sizes come from the feature maps, not from a tensor read back: one
    program serves other batch sizes and image sizes."""
    model = random_detector('demo')
    x = torch.randn(2, 3, 96, 128)
    dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC,
            3: torch.export.Dim.DYNAMIC}
    program = torch.export.export(model, (x, ), kwargs=dict(mode='tensor'),
                                  dynamic_shapes=(dims, None))
    for shape in ((1, 3, 128, 112), (3, 3, 80, 160)):
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x, mode='tensor')
            got = program.module()(x, mode='tensor')
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)
