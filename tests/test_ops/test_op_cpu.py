"""The CPU kernel against mmcv's pure-PyTorch path and ours.

Only the comparisons with mmcv need mmcv: without it they skip, and the kernel's own
tests (against our float64 reference, gradcheck, dtypes, compile) still run.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ops import has_kernel, multi_scale_deformable_attn, multi_scale_deformable_attn_pytorch

pytestmark = pytest.mark.numerics

EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps

try:
    from mmcv.ops import multi_scale_deform_attn as mmcv_op
except ImportError:  # mmcv, or its compiled ops, not installed
    mmcv_op = None
needs_mmcv = pytest.mark.skipif(mmcv_op is None, reason='mmcv.ops is not installed')

SHAPES = {
    'one_level_odd': [(7, 5)],
    'four_levels': [(16, 16), (8, 8), (4, 4), (2, 2)],
    'non_square_odd': [(13, 7), (7, 4), (3, 2), (1, 1)],
}
NAMES = ('output', 'grad_value', 'grad_sampling_locations', 'grad_attention_weights')


def mmcv_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights):
    return mmcv_op.multi_scale_deformable_attn_pytorch(value, spatial_shapes,
                                                       sampling_locations, attention_weights)


def test_cpu_kernel_is_built():
    assert has_kernel('cpu'), 'ops._C was not built with its CPU kernel'


@needs_mmcv
@pytest.mark.parametrize('shapes', SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize('heads', [1, 8])
# 16 and 32 channels a head have kernels of their own (the d=128 and d=256 models).
@pytest.mark.parametrize('dim', [4, 16, 32, 33])
def test_matches_mmcv_float32(shapes, heads, dim, make_inputs, forward_backward,
                              assert_close_relative, sum_lengths):
    inputs = make_inputs(shapes, bs=2, heads=heads, dim=dim, nq=13, points=4)
    ours = forward_backward(multi_scale_deformable_attn, inputs)
    theirs = forward_backward(mmcv_pytorch, inputs)
    for name, a, b in zip(NAMES, ours, theirs):
        assert a.dtype == torch.float32
        # Both sides round every sum in float32: 2 * n * eps32 of the scale (sum_lengths).
        bound = 2 * EPS32 * sum_lengths(len(shapes), 4, 13, dim)[name]
        assert_close_relative(a, b, bound, name)


def test_matches_pytorch_float64_and_gradcheck(make_inputs, forward_backward,
                                               assert_close_relative, sum_lengths):
    inputs = make_inputs(SHAPES['non_square_odd'], bs=1, heads=2, dim=3, nq=4, points=2,
                         dtype=torch.float64)
    ours = forward_backward(multi_scale_deformable_attn, inputs)
    ref = forward_backward(multi_scale_deformable_attn_pytorch, inputs)
    for name, a, b in zip(NAMES, ours, ref):
        # float64 on both sides: 2 * n * eps64 of the scale (sum_lengths), with room for
        # sums that cancel to 1/1000 of the tensor's largest value. A fault is O(1).
        assert_close_relative(a, b, 1000 * 2 * EPS64 * sum_lengths(4, 2, 4, 3)[name], name)

    def fn(value, loc, weights):
        return multi_scale_deformable_attn(value, inputs['spatial_shapes'],
                                           inputs['level_start_index'], loc, weights)

    args = [inputs[k].clone().requires_grad_() for k in
            ('value', 'sampling_locations', 'attention_weights')]
    assert torch.autograd.gradcheck(fn, args)


@settings(max_examples=40, deadline=None)
@given(
    hw=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=4),
    bs=st.integers(1, 3), heads=st.integers(1, 4), dim=st.integers(1, 9),
    nq=st.integers(1, 7), points=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_fuzz_shapes_against_pytorch(hw, bs, heads, dim, nq, points, seed, make_inputs,
                                     forward_backward, assert_close_relative, sum_lengths):
    inputs = make_inputs(hw, bs=bs, heads=heads, dim=dim, nq=nq, points=points,
                         dtype=torch.float64, outside=0.5, seed=seed)
    ours = forward_backward(multi_scale_deformable_attn, inputs)
    ref = forward_backward(multi_scale_deformable_attn_pytorch, inputs)
    for name, a, b in zip(NAMES, ours, ref):
        assert a.shape == b.shape
        # As above: 2 * n * eps64, with room for sums cancelling to 1/1000 of the scale.
        bound = 1000 * 2 * EPS64 * sum_lengths(len(hw), points, nq, dim)[name]
        assert_close_relative(a, b, bound, name)


def test_locations_outside_contribute_zero(make_inputs, forward_backward):
    inputs = make_inputs(SHAPES['four_levels'], nq=5)
    loc = inputs['sampling_locations']
    # Each pixel covers [i, i + 1) / size, so locations beyond the map's edge by at
    # least one pixel read nothing: 1.5 and -0.5 are out of every level here.
    inputs['sampling_locations'] = torch.where(loc > 0.5, torch.full_like(loc, 1.5),
                                               torch.full_like(loc, -0.5))
    out, grad_value, grad_loc, grad_weights = forward_backward(multi_scale_deformable_attn,
                                                               inputs)
    for t in (out, grad_value, grad_loc, grad_weights):
        assert torch.count_nonzero(t) == 0


def test_backward_is_deterministic(make_inputs, forward_backward):
    """The CPU backward needs no atomics (each thread owns whole (batch, head) slices of
    grad_value), so its gradients are the same bits on every run and for any number of
    threads."""
    # Many queries on small maps: every grad_value row sums many terms.
    inputs = make_inputs([(3, 2), (2, 2)], bs=2, heads=4, dim=8, nq=150)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 3, 3, 4):
            torch.set_num_threads(n)
            runs.append(forward_backward(multi_scale_deformable_attn, inputs))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for name, a, b in zip(NAMES, run, runs[0]):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f'{name} differs'


def test_non_contiguous_inputs(make_inputs):
    inputs = make_inputs(SHAPES['non_square_odd'], heads=4, dim=8)
    expected = multi_scale_deformable_attn(**inputs)
    strided = dict(inputs)
    strided['value'] = inputs['value'].transpose(0, 1).contiguous().transpose(0, 1)
    strided['sampling_locations'] = (
        inputs['sampling_locations'].permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0))
    strided['attention_weights'] = inputs['attention_weights'].transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(strided[k].is_contiguous()
                   for k in ('value', 'sampling_locations', 'attention_weights'))
    # Same kernel, same summation order (strides only change where it reads):
    # torch's default float32 tolerance (1.3e-6 relative) is ample.
    torch.testing.assert_close(multi_scale_deformable_attn(**strided), expected)


def test_int32_level_tensors_accepted(make_inputs):
    inputs = make_inputs(SHAPES['four_levels'], nq=3)
    expected = multi_scale_deformable_attn(**inputs)
    inputs['spatial_shapes'] = inputs['spatial_shapes'].int()
    inputs['level_start_index'] = inputs['level_start_index'].int()
    # Same kernel and order on int32 level tensors: default float32 tolerance.
    torch.testing.assert_close(multi_scale_deformable_attn(**inputs), expected)


def test_bfloat16_accumulates_in_float32(make_inputs, forward_backward, assert_close_relative):
    inputs = make_inputs(SHAPES['four_levels'], nq=9)
    bf16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
    # The float32 result on the bfloat16-rounded inputs isolates the kernel's own error.
    exact = forward_backward(multi_scale_deformable_attn,
                             {k: v.float() if v.is_floating_point() else v
                              for k, v in bf16.items()})
    ours = forward_backward(multi_scale_deformable_attn, bf16)
    for name, a, b in zip(NAMES, ours, exact):
        assert a.dtype == torch.bfloat16
        # One bfloat16 rounding of the result (2^-8 relative) plus that of grad_output.
        assert_close_relative(a, b, 2e-2, name)


def test_autocast_cpu_runs_in_bfloat16(make_inputs, forward_backward, assert_close_relative):
    inputs = make_inputs(SHAPES['four_levels'], nq=9)
    # What a layer hands the op under autocast: bfloat16 value and locations from the
    # linear projections, float32 softmax weights.
    mixed = dict(inputs, value=inputs['value'].bfloat16(),
                 sampling_locations=inputs['sampling_locations'].bfloat16())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, grad_value, grad_loc, grad_weights = forward_backward(
            multi_scale_deformable_attn, mixed)
    assert out.dtype == torch.bfloat16
    assert grad_weights.dtype == torch.float32  # autograd casts back to the input's dtype
    # Autocast rounds the weights to bfloat16 too; the float32 result on inputs rounded
    # the same way isolates the kernel's own error.
    rounded = {k: v.bfloat16().float() if v.is_floating_point() else v for k, v in inputs.items()}
    assert_close_relative(out, multi_scale_deformable_attn(**rounded), 1e-2, 'output')
    with pytest.raises(TypeError, match='share one dtype'):
        multi_scale_deformable_attn(**mixed)  # outside autocast, mixing is an error


@pytest.mark.parametrize('backend', ['aot_eager', 'inductor'])
def test_torch_compile_fullgraph(backend, make_inputs, forward_backward,
                                 assert_close_relative):
    inputs = make_inputs(SHAPES['non_square_odd'], heads=2, dim=8, nq=5)
    torch._dynamo.reset()
    compiled = torch.compile(multi_scale_deformable_attn, fullgraph=True, backend=backend)
    ours = forward_backward(compiled, inputs)
    eager = forward_backward(multi_scale_deformable_attn, inputs)
    for name, a, b in zip(NAMES, ours, eager):
        # The compiled graph calls the same kernels; only the ops around them may be
        # fused or reordered: a few float32 roundings (8 * eps32 = 1e-6).
        assert_close_relative(a, b, 1e-6, name)


def test_fake_tensor_shapes(make_inputs):
    from torch._subclasses.fake_tensor import FakeTensorMode
    inputs = make_inputs(SHAPES['four_levels'], bs=3, heads=4, dim=16, nq=7)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in inputs.items()}
        out = torch.ops.ddetr.multi_scale_deformable_attn(**fake)
    assert out.shape == (3, 7, 64)
