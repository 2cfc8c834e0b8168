"""The CUDA kernel against the CPU kernel and mmcv's CUDA op (skipped without a GPU)."""
import pytest
import torch

from ops import has_kernel, multi_scale_deformable_attn, multi_scale_deformable_attn_pytorch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')

SHAPES = {
    'one_level_odd': [(7, 5)],
    'four_levels': [(32, 32), (16, 16), (8, 8), (4, 4)],
    'non_square_odd': [(13, 7), (7, 4), (3, 2), (1, 1)],
}
NAMES = ('output', 'grad_value', 'grad_sampling_locations', 'grad_attention_weights')
# Relative to each tensor's scale: one rounding of the result in the low precision and
# the rounding of the inputs' products; fp32 accumulation keeps the sums themselves exact.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def test_cuda_kernel_is_built():
    assert has_kernel('cuda'), 'ops._C was built without CUDA; rebuild with FORCE_CUDA=1'


def to_device(inputs, dtype):
    return {k: v.cuda().to(dtype) if v.is_floating_point() else v.cuda() for k, v in inputs.items()}


@pytest.mark.parametrize('shapes', SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize('dtype', TOLERANCE.keys(), ids=str)
@pytest.mark.parametrize('heads,dim', [(1, 32), (8, 32), (8, 33), (4, 8), (2, 64)])
def test_matches_cpu(shapes, dtype, heads, dim, make_inputs, forward_backward,
                     assert_close_relative):
    inputs = make_inputs(shapes, heads=heads, dim=dim, nq=37)
    # The CPU result on the same rounded inputs, in float64, is the truth.
    rounded = {k: v.to(dtype).double() if v.is_floating_point() else v for k, v in inputs.items()}
    expected = forward_backward(multi_scale_deformable_attn, rounded)
    ours = forward_backward(multi_scale_deformable_attn, to_device(inputs, dtype))
    for name, a, b in zip(NAMES, ours, expected):
        assert a.dtype == dtype and a.is_cuda
        assert_close_relative(a.cpu(), b, TOLERANCE[dtype], name)


def test_gradcheck_float64(make_inputs):
    inputs = to_device(make_inputs(SHAPES['non_square_odd'], bs=1, heads=2, dim=3, nq=4,
                                   points=2), torch.float64)

    def fn(value, loc, weights):
        return multi_scale_deformable_attn(value, inputs['spatial_shapes'],
                                           inputs['level_start_index'], loc, weights)

    args = [inputs[k].clone().requires_grad_() for k in
            ('value', 'sampling_locations', 'attention_weights')]
    assert torch.autograd.gradcheck(fn, args)


def test_matches_pytorch_large(make_inputs, forward_backward, assert_close_relative):
    inputs = to_device(make_inputs(SHAPES['four_levels'], bs=2, heads=8, dim=32, nq=300),
                       torch.float32)
    ours = forward_backward(multi_scale_deformable_attn, inputs)
    ref = forward_backward(multi_scale_deformable_attn_pytorch, inputs)
    for name, a, b in zip(NAMES, ours, ref):
        assert_close_relative(a, b, 1e-5, name)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
def test_autocast_cuda(dtype, make_inputs, assert_close_relative):
    inputs = to_device(make_inputs(SHAPES['four_levels'], nq=50), torch.float32)
    with torch.autocast('cuda', dtype=dtype):
        out = multi_scale_deformable_attn(**inputs)
    assert out.dtype == dtype
    assert_close_relative(out, multi_scale_deformable_attn(**inputs), TOLERANCE[dtype], 'output')


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=str)
def test_matches_mmcv_cuda(dtype, make_inputs, forward_backward, assert_close_relative):
    mmcv_op = pytest.importorskip('mmcv.ops.multi_scale_deform_attn')
    try:
        from mmcv.utils import ext_loader
        ext = ext_loader.load_ext('_ext', ['ms_deform_attn_forward'])
    except (ImportError, AttributeError) as err:
        pytest.skip(f'mmcv has no CUDA ops here: {err}')
    if not hasattr(ext, 'ms_deform_attn_forward'):
        pytest.skip('mmcv was built without its CUDA ops')
    inputs = to_device(make_inputs(SHAPES['four_levels'], nq=100), dtype)

    def mmcv_cuda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return mmcv_op.MultiScaleDeformableAttnFunction.apply(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, 64)

    ours = forward_backward(multi_scale_deformable_attn, inputs)
    theirs = forward_backward(mmcv_cuda, inputs)
    for name, a, b in zip(NAMES, ours, theirs):
        assert_close_relative(a.float(), b.float(), TOLERANCE[dtype], name)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=str)
def test_deterministic_backward_is_bitwise_reproducible(dtype, make_inputs, forward_backward,
                                                        assert_close_relative):
    """Under torch.use_deterministic_algorithms the backward takes the path without
    floating-point atomics: the same bits on every run, and the default (atomic) path's
    values within the dtype's tolerance."""
    # Many queries on a small map: each grad_value row sums hundreds of terms, in an
    # order that atomics would change from run to run.
    inputs = to_device(make_inputs(SHAPES['one_level_odd'], bs=2, heads=8, dim=32, nq=2000),
                       dtype)
    default = forward_backward(multi_scale_deformable_attn, inputs)
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [forward_backward(multi_scale_deformable_attn, inputs) for _ in range(5)]
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    for run in runs[1:]:
        for name, a, b in zip(NAMES, run, runs[0]):
            assert torch.equal(a.view(torch.int16 if dtype == torch.float16 else torch.int32),
                               b.view(torch.int16 if dtype == torch.float16 else torch.int32)), \
                f'{name} differs between runs of the deterministic backward'
    for name, a, b in zip(NAMES, runs[0], default):
        assert_close_relative(a.float(), b.float(), TOLERANCE[dtype], name)
