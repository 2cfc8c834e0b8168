"""The CUDA kernel against the CPU kernel and mmcv's CUDA op (skipped without a GPU).

mmcv's kernel comes from mmcv's own CUDA build or, where mmcv has CPU ops only, from
its source distribution named by ``$MMCV_SDIST`` (``tools/gpu/mmcv_cuda.py``); the tests
against it skip where neither exists. ``tools/gpu/check_all.sh`` runs this file on a GPU.
"""
import math

import pytest
import torch

from ops import has_kernel, multi_scale_deformable_attn, multi_scale_deformable_attn_pytorch
from mmcv_cuda import load_mmcv_cuda, mmcv_cuda_attention

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
    # Autocast rounds the float32 inputs to `dtype`; rounded locations move the samples
    # (bfloat16: up to 2^-9 of a map's width), so compare with float32 on those inputs.
    rounded = {k: v.to(dtype).float() if v.is_floating_point() else v for k, v in inputs.items()}
    assert_close_relative(out, multi_scale_deformable_attn(**rounded), TOLERANCE[dtype], 'output')



def level_shapes(height, width, levels=4):
    """Feature map sizes of strides 8, 16, 32, 64 for an image of height x width."""
    shapes, h, w = [], math.ceil(height / 8), math.ceil(width / 8)
    for _ in range(levels):
        shapes.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return shapes


# Deformable DETR's own shapes: the encoder (queries = keys) and the 300 decoder queries
# of an 800x1333 image, 8 heads of 32 channels, 4 levels, 4 points.
COCO = level_shapes(800, 1333)
NUM_KEYS = sum(h * w for h, w in COCO)
DETR_CASES = {'enc-b1': (1, NUM_KEYS), 'enc-b2': (2, NUM_KEYS), 'dec-b1': (1, 300),
              'dec-b8': (8, 300)}


@pytest.mark.parametrize('bs,nq', DETR_CASES.values(), ids=DETR_CASES.keys())
def test_float64_matches_cpu_at_detr_shapes(bs, nq, make_inputs, forward_backward,
                                            assert_close_relative):
    """The same float64 inputs on both kernels: only the summation order differs."""
    inputs = make_inputs(COCO, bs=bs, nq=nq, dtype=torch.float64)
    expected = forward_backward(multi_scale_deformable_attn, inputs)
    ours = forward_backward(multi_scale_deformable_attn, to_device(inputs, torch.float64))
    for name, a, b in zip(NAMES, ours, expected):
        assert_close_relative(a.cpu(), b, 1e-10, name)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('bs,nq', [(2, NUM_KEYS), (8, 300)], ids=['enc-b2', 'dec-b8'])
def test_half_precision_matches_float32(dtype, bs, nq, make_inputs, forward_backward,
                                        assert_close_relative):
    """Half-precision results against float32 on the same (rounded) inputs.

    The kernel computes in float32 and rounds each result once, so against float32 the
    error is about one rounding of the result (2^-11 of it for float16, 2^-8 for
    bfloat16) plus the float32 differences; TOLERANCE allows 10x (float16) and 8x
    (bfloat16) of that, relative to each tensor's largest magnitude.
    """
    inputs = to_device(make_inputs(COCO, bs=bs, nq=nq), dtype)
    expected = forward_backward(multi_scale_deformable_attn,
                                {k: v.float() if v.is_floating_point() else v
                                 for k, v in inputs.items()})
    ours = forward_backward(multi_scale_deformable_attn, inputs)
    for name, a, b in zip(NAMES, ours, expected):
        assert a.dtype == dtype
        assert_close_relative(a.float(), b, TOLERANCE[dtype], name)


@pytest.fixture(scope='module')
def mmcv_cuda():
    """mmcv's CUDA kernel as a function with our argument order."""
    ext = load_mmcv_cuda()
    if ext is None:
        pytest.skip("no mmcv CUDA kernel: mmcv has no CUDA ops and $MMCV_SDIST is unset")
    return mmcv_cuda_attention(ext)


@pytest.mark.parametrize('bs,nq,heads,dim', [(2, NUM_KEYS, 8, 32), (8, 300, 8, 32),
                                             (2, 300, 8, 33), (1, 77, 3, 64)],
                         ids=['enc-b2', 'dec-b8', 'dec-odd-dim', 'odd-heads'])
def test_float32_matches_mmcv_cuda(bs, nq, heads, dim, mmcv_cuda, make_inputs,
                                   forward_backward, assert_close_relative):
    inputs = to_device(make_inputs(COCO, bs=bs, nq=nq, heads=heads, dim=dim), torch.float32)
    ours = forward_backward(multi_scale_deformable_attn, inputs)
    theirs = forward_backward(mmcv_cuda, inputs)
    for name, a, b in zip(NAMES, ours, theirs):
        assert_close_relative(a, b, 1e-5, name)


def test_float16_matches_mmcv_cuda(mmcv_cuda, make_inputs, forward_backward,
                                   assert_close_relative):
    """mmcv accumulates float16 in float16 (and adds grad_value with half atomics), so
    against ours, which accumulates in float32, the error is mostly mmcv's."""
    inputs = to_device(make_inputs(SHAPES['four_levels'], nq=100), torch.float16)
    ours = forward_backward(multi_scale_deformable_attn, inputs)
    theirs = forward_backward(mmcv_cuda, inputs)
    for name, a, b in zip(NAMES, ours, theirs):
        assert_close_relative(a.float(), b.float(), 2e-2, name)


@pytest.mark.parametrize('shapes,points', [([(13, 7)], 4), (SHAPES['four_levels'], 8),
                                           ([(1, 1), (2, 3)], 1)],
                         ids=['one-level', 'eight-points', 'one-point-tiny-levels'])
def test_levels_and_points(shapes, points, make_inputs, forward_backward,
                           assert_close_relative):
    inputs = make_inputs(shapes, nq=29, points=points, dtype=torch.float64)
    expected = forward_backward(multi_scale_deformable_attn, inputs)
    ours = forward_backward(multi_scale_deformable_attn, to_device(inputs, torch.float64))
    for name, a, b in zip(NAMES, ours, expected):
        assert_close_relative(a.cpu(), b, 1e-10, name)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_unaligned_and_sliced_inputs(dtype, make_inputs, forward_backward,
                                     assert_close_relative):
    """Inputs that start off a 16-byte boundary, or are views with strides, give the
    aligned, contiguous inputs' results (the kernel falls back to scalar loads)."""
    inputs = to_device(make_inputs(SHAPES['four_levels'], nq=50, dim=32), dtype)
    expected = forward_backward(multi_scale_deformable_attn, inputs)

    def shifted(t):  # same values, contiguous, data pointer one element off alignment
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        out = flat[1:].view(t.shape)
        out.copy_(t)
        assert out.data_ptr() % 16 != 0 and out.is_contiguous()
        return out

    def strided(t):  # a view of every other channel of a twice-wider tensor
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]

    for make in (shifted, strided):
        args = dict(inputs, value=make(inputs['value']),
                    sampling_locations=make(inputs['sampling_locations']),
                    attention_weights=make(inputs['attention_weights']))
        got = forward_backward(multi_scale_deformable_attn, args)
        for name, a, b in zip(NAMES, got, expected):
            assert_close_relative(a.float(), b.float(), 1e-6 if dtype == torch.float32 else
                                  TOLERANCE[dtype], f'{make.__name__} {name}')


def test_bad_arguments_refused_on_cuda(make_inputs):
    """What the shapes tell is checked without reading data (no host synchronisation)."""
    inputs = to_device(make_inputs(SHAPES['four_levels'], nq=5), torch.float32)
    with pytest.raises(ValueError, match='num_keys must be positive'):
        multi_scale_deformable_attn(**dict(inputs, value=inputs['value'][:, :0]))
    with pytest.raises(ValueError, match='levels differs'):
        multi_scale_deformable_attn(**dict(inputs, spatial_shapes=inputs['spatial_shapes'][:3]))
    with pytest.raises(ValueError, match='same device'):
        multi_scale_deformable_attn(**dict(inputs, spatial_shapes=inputs['spatial_shapes'].cpu()))


def test_layout_disagreeing_with_num_keys_stays_inside_value(make_inputs):
    """Level shapes that claim more keys than ``value`` holds: on a GPU they are not read
    on the host, so the kernels bound every index by num_keys. compute-sanitizer runs
    this case in tools/gpu/check_all.sh; here its results must be finite, and the
    samples that fall past num_keys contribute nothing."""
    inputs = to_device(make_inputs([(8, 8), (4, 4)], nq=40, dim=32), torch.float32)
    value = inputs['value'][:, :50].contiguous()  # 50 of the 80 keys the shapes claim
    out = multi_scale_deformable_attn(**dict(inputs, value=value))
    assert torch.isfinite(out).all()
    padded = torch.cat([value, value.new_zeros(value.shape[0], 30, *value.shape[2:])], 1)
    torch.testing.assert_close(out, multi_scale_deformable_attn(**dict(inputs, value=padded)))


def test_cuda_graph_replay_matches_eager(make_inputs, forward_backward):
    """Forward + backward captured in a CUDA graph: no host synchronisation inside, and
    each replay on new inputs computes what eager mode does."""
    inputs = to_device(make_inputs(SHAPES['four_levels'], bs=2, nq=64), torch.float32)
    static = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    grad_out = torch.randn(2, 64, 8 * 32, device='cuda')
    wrt = [static[k] for k in ('value', 'sampling_locations', 'attention_weights')]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture needs
        for _ in range(2):
            torch.autograd.grad(multi_scale_deformable_attn(**static), wrt, grad_out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = multi_scale_deformable_attn(**static)
        grads = torch.autograd.grad(out, wrt, grad_out)
    for seed in (1, 2):
        fresh = to_device(make_inputs(SHAPES['four_levels'], bs=2, nq=64, seed=seed),
                          torch.float32)
        for k in ('value', 'sampling_locations', 'attention_weights'):
            static[k].detach().copy_(fresh[k])
        graph.replay()
        torch.cuda.synchronize()
        leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in fresh.items()}
        eager_out = multi_scale_deformable_attn(**leaves)
        eager = torch.autograd.grad(eager_out, [leaves[k] for k in (
            'value', 'sampling_locations', 'attention_weights')], grad_out)
        torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
        for name, a, b in zip(NAMES[1:], grads, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_torch_compile_inductor_of_a_layer(make_inputs):
    """The attention layer of the detector, compiled with inductor, matches eager in
    forward and backward (the op is one node: no graph break)."""
    from projects.deformable_detr.models.layers.multi_scale_deformable_attention import \
        MultiScaleDeformableAttention
    torch.manual_seed(0)
    layer = MultiScaleDeformableAttention(embed_dims=256, num_heads=8, num_levels=4,
                                          num_points=4).cuda()
    for p in layer.parameters():  # the paper's init zeroes some: perturb them all
        torch.nn.init.normal_(p, std=0.02)
    shapes = torch.tensor(SHAPES['four_levels'], device='cuda')
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(2, int(sizes.sum()), 256, device='cuda')
    query = torch.randn(2, 100, 256, device='cuda', requires_grad=True)
    ref = torch.rand(2, 100, 4, 2, device='cuda')
    kwargs = dict(value=value, reference_points=ref, spatial_shapes=shapes,
                  level_start_index=starts)
    compiled = torch.compile(layer, backend='inductor', fullgraph=True)
    eager_out = layer(query, **kwargs)
    (eager_grad, ) = torch.autograd.grad(eager_out.square().sum(), query)
    out = compiled(query, **kwargs)
    (grad, ) = torch.autograd.grad(out.square().sum(), query)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-4)


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
