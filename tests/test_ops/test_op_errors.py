"""Bad arguments get a ValueError or TypeError that names what is wrong."""
import pytest
import torch

from ops import multi_scale_deformable_attn

SHAPES = [(6, 5), (3, 3), (2, 1)]


def call(make_inputs, **changes):
    inputs = make_inputs(SHAPES, bs=2, heads=4, dim=8, nq=5, points=3)
    inputs.update({k: v(inputs) if callable(v) else v for k, v in changes.items()})
    return multi_scale_deformable_attn(**inputs)


CASES = {
    'batch': (ValueError, r'batch differs.*\(2, 3, 2\)',
              dict(sampling_locations=lambda i: torch.cat([i['sampling_locations']] * 2)[:3])),
    'heads': (ValueError, r'heads differs.*\(4, 4, 2\)',
              dict(attention_weights=lambda i: i['attention_weights'][:, :, :2])),
    'points': (ValueError, r'points differs.*\(3, 2\)',
               dict(attention_weights=lambda i: i['attention_weights'][..., :2])),
    'levels': (ValueError, r'levels differs.*\(2, 3, 3, 3\)',
               dict(spatial_shapes=lambda i: i['spatial_shapes'][:2])),
    'queries': (ValueError, r'num_queries differs.*\(5, 4\)',
                dict(attention_weights=lambda i: i['attention_weights'][:, :4])),
    'rank': (ValueError, r'value must have 4 dimensions, got shape \(2, 41, 32\)',
             dict(value=lambda i: i['value'].flatten(2))),
    'xy': (ValueError, r'sampling_locations last dimension must be 2',
           dict(sampling_locations=lambda i: i['sampling_locations'][..., :1])),
    'shapes_vs_keys': (ValueError, r'cover 42 keys but value has num_keys=41',
                       dict(spatial_shapes=torch.tensor([[6, 5], [3, 3], [3, 1]]),
                            level_start_index=torch.tensor([0, 30, 39]))),
    'start_index': (ValueError, r'level_start_index \[0, 30, 40\] disagrees.*\[0, 30, 39\]',
                    dict(level_start_index=torch.tensor([0, 30, 40]))),
    'non_positive_shape': (ValueError, r'positive',
                           dict(spatial_shapes=torch.tensor([[6, 5], [0, 3], [2, 1]]))),
    'integer_value': (TypeError, r'value must be a floating tensor, got torch.int64',
                      dict(value=lambda i: i['value'].long())),
    'float_shapes': (TypeError, r'spatial_shapes must be an int64',
                     dict(spatial_shapes=lambda i: i['spatial_shapes'].float())),
    'mixed_floats': (TypeError, r'share one dtype.*torch.float64',
                     dict(attention_weights=lambda i: i['attention_weights'].double())),
    'not_a_tensor': (TypeError, r'attention_weights must be a torch.Tensor, got list',
                     dict(attention_weights=[1.0])),
    'device': (ValueError, r'same device.*meta',
               dict(attention_weights=lambda i: i['attention_weights'].to('meta'))),
    'empty_batch': (ValueError, r'batch must be positive',
                    dict(value=lambda i: i['value'][:0],
                         sampling_locations=lambda i: i['sampling_locations'][:0],
                         attention_weights=lambda i: i['attention_weights'][:0])),
    'empty_queries': (ValueError, r'num_queries must be positive',
                      dict(sampling_locations=lambda i: i['sampling_locations'][:, :0],
                           attention_weights=lambda i: i['attention_weights'][:, :0])),
}


@pytest.mark.parametrize('case', CASES.values(), ids=CASES.keys())
def test_bad_input_is_named(case, make_inputs):
    error, message, changes = case
    with pytest.raises(error, match=message):
        call(make_inputs, **changes)


def test_kernel_guards_direct_calls(make_inputs):
    """torch.ops.ddetr.* bypasses the Python checks: the kernel's own checks still hold."""
    inputs = make_inputs(SHAPES, heads=4, dim=8, nq=5, points=3)
    bad = dict(inputs, attention_weights=inputs['attention_weights'][:, :, :2])
    with pytest.raises(ValueError, match='attention_weights'):
        torch.ops.ddetr.multi_scale_deformable_attn(*bad.values())


# 8: the kernels for any channel count; 16 and 32: those for a fixed one.
@pytest.mark.parametrize('dim', [8, 16, 32])
def test_kernel_never_reads_outside_value(make_inputs, dim):
    """Level shapes larger than value (unchecked on GPUs) only drop the keys past the end,
    in the forward and in the backward."""
    inputs = make_inputs(SHAPES, heads=4, dim=dim, nq=5, points=3)
    shapes = torch.tensor([[6, 5], [3, 3], [50, 50]])
    # what it must give: value padded with zeros up to the keys the shapes declare
    value = inputs['value']
    num_keys = value.shape[1]
    missing = int(shapes.prod(1).sum()) - num_keys
    padded = torch.cat([value, value.new_zeros(value.shape[0], missing, *value.shape[2:])], 1)
    grad_out = torch.randn(value.shape[0], 5, 4 * dim, dtype=value.dtype)

    def run(value):
        args = [value, inputs['sampling_locations'], inputs['attention_weights']]
        args = [a.detach().requires_grad_() for a in args]
        out = torch.ops.ddetr.multi_scale_deformable_attn(
            args[0], shapes, inputs['level_start_index'], *args[1:])
        out.backward(grad_out)
        return [out, args[0].grad[:, :num_keys], args[1].grad, args[2].grad]

    got, expected = run(value), run(padded)
    assert (expected[0] != 0).any()
    # the same sums, with exact zeros added in place of the dropped corners: not one bit
    # may differ
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
