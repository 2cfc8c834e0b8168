"""The ``ddetr::multi_scale_deformable_attn`` operator and its Python entry point.

The C++ extension (``ops._C``) defines the operator schema, its CPU and CUDA kernels
and its autocast rule. This module adds what torch needs around them (a fake kernel
for torch.compile / torch.export, autograd) and the public
:func:`multi_scale_deformable_attn`, which checks its arguments before any kernel
sees them.
"""
import contextlib
import warnings
from typing import Iterator

import torch
from torch import Tensor

from .multi_scale_deformable_attn_gather import multi_scale_deformable_attn_gather
from .multi_scale_deformable_attn_pytorch import multi_scale_deformable_attn_pytorch

try:
    from . import _C  # registers torch.ops.ddetr.*
except ImportError as _err:  # not built: the pure-PyTorch path still works
    _C = None
    warnings.warn(f'ops._C is not built ({_err}); multi_scale_deformable_attn falls back to '
                  'the pure-PyTorch implementation. Build it with `pip install -e . '
                  '--no-build-isolation`.')

# Read once: a constant to torch.compile.
_KERNEL_DEVICES = frozenset() if _C is None else frozenset(
    ('cpu', 'cuda') if _C.with_cuda else ('cpu', ))


# Set by gather_sampling(): compute with the gather expression instead of the kernels.
_GATHER_SAMPLING = False


@contextlib.contextmanager
def gather_sampling() -> Iterator[None]:
    """Within it, :func:`multi_scale_deformable_attn` computes with
    :func:`~ops.multi_scale_deformable_attn_gather.multi_scale_deformable_attn_gather`
    (gathers and arithmetic, no op and no ``grid_sample``), so that a model traced in it
    (``torch.export``) holds that expression instead of the op: the ONNX export's
    ``gather`` mode. Not meant for training: the kernels are faster.
    """
    global _GATHER_SAMPLING
    previous, _GATHER_SAMPLING = _GATHER_SAMPLING, True
    try:
        yield
    finally:
        _GATHER_SAMPLING = previous


def has_kernel(device_type: str) -> bool:
    """Whether the compiled extension has a kernel for ``device_type`` ('cpu', 'cuda')."""
    return device_type in _KERNEL_DEVICES


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_shapes(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                  sampling_locations: Tensor, attention_weights: Tensor) -> None:
    """Checks ranks, sizes, dtypes and devices: everything knowable without reading data."""
    args = dict(value=value, spatial_shapes=spatial_shapes,
                level_start_index=level_start_index,
                sampling_locations=sampling_locations, attention_weights=attention_weights)
    _check_kinds(args)
    _check_sizes(value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights)


def _check_kinds(args: dict) -> None:
    """Checks that the arguments (by name) are tensors of the right ranks, dtypes and
    device."""
    value, sampling_locations, attention_weights = (
        args['value'], args['sampling_locations'], args['attention_weights'])
    for name, t in args.items():
        if not isinstance(t, Tensor):
            raise TypeError(f'{name} must be a torch.Tensor, got {type(t).__name__}')
    ranks = dict(value=4, spatial_shapes=2, level_start_index=1, sampling_locations=6,
                 attention_weights=5)
    for name, rank in ranks.items():
        if args[name].dim() != rank:
            raise ValueError(f'{name} must have {rank} dimensions, got shape '
                             f'{tuple(args[name].shape)}')
    devices = {name: t.device for name, t in args.items()}
    if len(set(devices.values())) > 1:
        raise ValueError('all arguments must be on the same device, got ' +
                         ', '.join(f'{n}: {d}' for n, d in devices.items()))
    for name in ('spatial_shapes', 'level_start_index'):
        if args[name].dtype not in (torch.int64, torch.int32):
            raise TypeError(f'{name} must be an int64 (or int32) tensor, got {args[name].dtype}')
    for name in ('value', 'sampling_locations', 'attention_weights'):
        if args[name].dtype not in _FLOAT_DTYPES:
            raise TypeError(f'{name} must be a floating tensor, got {args[name].dtype}')
    float_dtypes = {value.dtype, sampling_locations.dtype, attention_weights.dtype}
    # Under autocast the op's autocast rule casts them; outside it, mixing is a mistake.
    if len(float_dtypes) > 1 and not torch.is_autocast_enabled(value.device.type):
        raise TypeError('value, sampling_locations and attention_weights must share one dtype '
                        f'(got {value.dtype}, {sampling_locations.dtype}, '
                        f'{attention_weights.dtype}); cast them, or run under torch.autocast')


def _check_sizes(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                 sampling_locations: Tensor, attention_weights: Tensor) -> None:
    """Checks that the sizes the arguments share agree, and that none is zero."""
    bs, num_keys, heads, dim = value.shape
    lbs, nq, lheads, levels, points, two = sampling_locations.shape
    if spatial_shapes.shape[1] != 2:
        raise ValueError(f'spatial_shapes must have shape (levels, 2), got '
                         f'{tuple(spatial_shapes.shape)}')
    if two != 2:
        raise ValueError('sampling_locations last dimension must be 2 (x, y), got '
                         f'{tuple(sampling_locations.shape)}')
    expected = dict(
        batch=(bs, lbs, attention_weights.shape[0]),
        num_queries=(nq, attention_weights.shape[1]),
        heads=(heads, lheads, attention_weights.shape[2]),
        levels=(spatial_shapes.shape[0], levels, attention_weights.shape[3],
                level_start_index.shape[0]),
        points=(points, attention_weights.shape[4]),
    )
    sources = dict(
        batch='value, sampling_locations, attention_weights',
        num_queries='sampling_locations, attention_weights',
        heads='value, sampling_locations, attention_weights',
        levels='spatial_shapes, sampling_locations, attention_weights, level_start_index',
        points='sampling_locations, attention_weights',
    )
    for what, sizes in expected.items():
        # Compared, not hashed: under torch.export the sizes may be symbolic (SymInt).
        if any(size != sizes[0] for size in sizes[1:]):
            raise ValueError(f'{what} differs between arguments ({sources[what]}): {sizes}')
    for what, size in dict(batch=bs, num_queries=nq, heads=heads, channels=dim,
                           levels=levels, points=points, num_keys=num_keys).items():
        if size == 0:
            raise ValueError(f'{what} must be positive, got value shape {tuple(value.shape)}, '
                             f'sampling_locations shape {tuple(sampling_locations.shape)}')


def _check_levels(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor) -> None:
    """Checks that the level layout agrees with itself and with ``value``.

    This reads the two small index tensors. It runs for CPU tensors only: on a GPU it
    would synchronise the host, so there the kernels instead bound every index by
    ``num_keys`` and can never read outside ``value``.
    """
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f'spatial_shapes must hold positive (h, w) pairs, got {shapes}')
    sizes = [h * w for h, w in shapes]
    expected_starts = [sum(sizes[:i]) for i in range(len(sizes))]
    if starts != expected_starts:
        raise ValueError(f'level_start_index {starts} disagrees with spatial_shapes {shapes}: '
                         f'expected {expected_starts}')
    if sum(sizes) != value.shape[1]:
        raise ValueError(f'spatial_shapes {shapes} cover {sum(sizes)} keys but value has '
                         f'num_keys={value.shape[1]}')


def multi_scale_deformable_attn(value: Tensor, spatial_shapes: Tensor,
                                level_start_index: Tensor, sampling_locations: Tensor,
                                attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention (Zhu et al., 2021), mmcv's contract.

    Args:
        value: (bs, num_keys, heads, dim) features of all levels, flattened and
            concatenated.
        spatial_shapes: (levels, 2) int64, (h, w) of each level.
        level_start_index: (levels,) int64, offset of each level in ``num_keys``.
        sampling_locations: (bs, num_queries, heads, levels, points, 2), (x, y) in
            [0, 1]; points outside contribute zero (grid_sample's zero padding).
        attention_weights: (bs, num_queries, heads, levels, points).

    Returns:
        (bs, num_queries, heads * dim), in ``value``'s dtype.

    Raises:
        ValueError / TypeError naming the argument, for any inconsistent input.
    """
    # torch.jit.trace (MMEngine's FLOP counter) records sizes as tensors, which the
    # checks cannot compare; a traced model has already run, and been checked, eagerly.
    tracing = torch.jit.is_tracing()
    if not tracing:
        _check_shapes(value, spatial_shapes, level_start_index, sampling_locations,
                      attention_weights)
    spatial_shapes, level_start_index = spatial_shapes.long(), level_start_index.long()
    if value.device.type == 'cpu' and not (tracing or torch.compiler.is_compiling()):
        _check_levels(value, spatial_shapes, level_start_index)
    if _GATHER_SAMPLING:
        return multi_scale_deformable_attn_gather(value, spatial_shapes, level_start_index,
                                                  sampling_locations, attention_weights)
    if has_kernel(value.device.type):
        return torch.ops.ddetr.multi_scale_deformable_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return multi_scale_deformable_attn_pytorch(value, spatial_shapes, level_start_index,
                                               sampling_locations, attention_weights)


if _C is not None:

    @torch.library.register_fake('ddetr::multi_scale_deformable_attn')
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations,
                      attention_weights):
        bs, _, heads, dim = value.shape
        return value.new_empty(bs, sampling_locations.shape[1], heads * dim)

    @torch.library.register_fake('ddetr::_multi_scale_deformable_attn_backward')
    def _backward_fake(grad_output, value, spatial_shapes, level_start_index,
                       sampling_locations, attention_weights):
        return (torch.empty_like(value), torch.empty_like(sampling_locations),
                torch.empty_like(attention_weights))

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, shapes, starts, locations, weights = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = torch.ops.ddetr._multi_scale_deformable_attn_backward(
            grad_output.contiguous(), value, shapes, starts, locations, weights)
        return grad_value, None, None, grad_loc, grad_attn

    torch.library.register_autograd('ddetr::multi_scale_deformable_attn', _backward,
                                    setup_context=_setup_context)
