"""Fixtures of the op tests: random inputs, forward + backward, a scale-relative check.

Each fixture hands the tests a function (session-scoped, so that hypothesis tests can
use them too).
"""
import os
import sys
from typing import Callable, Dict, Sequence, Tuple

import pytest
import torch

# tools/gpu/mmcv_cuda.py: mmcv's CUDA kernel, the reference of the GPU tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'tools', 'gpu'))


def _make_inputs(shapes: Sequence[Tuple[int, int]], bs: int = 2, heads: int = 8, dim: int = 32,
                nq: int = 11, points: int = 4, dtype: torch.dtype = torch.float32,
                device: str = 'cpu', outside: float = 0.2, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Arguments of ``multi_scale_deformable_attn``.

    ``outside``: the sampling locations are drawn from [-outside, 1 + outside], so that
    some fall outside the feature maps.
    """
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(bs, int(sizes.sum()), heads, dim, generator=gen, dtype=torch.float64)
    loc = torch.rand(bs, nq, heads, levels, points, 2, generator=gen, dtype=torch.float64)
    loc = loc * (1 + 2 * outside) - outside
    weights = torch.rand(bs, nq, heads, levels, points, generator=gen, dtype=torch.float64)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return dict(value=value.to(device, dtype), spatial_shapes=spatial_shapes.to(device),
                level_start_index=level_start_index.to(device),
                sampling_locations=loc.to(device, dtype),
                attention_weights=weights.to(device, dtype))


def _forward_backward(fn, inputs: Dict[str, torch.Tensor], grad_seed: int = 1):
    """Output and the gradients of value, sampling_locations and attention_weights."""
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point())
              for k, v in inputs.items()}
    out = fn(**leaves)
    gen = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, [leaves['value'], leaves['sampling_locations'],
                                      leaves['attention_weights']], grad)
    return (out, *grads)


def _assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str):
    """Max abs error at most ``rtol`` times the largest magnitude of ``expected``.

    Per-element relative error is meaningless for the near-zero entries every such
    tensor has (points outside the map, cancelling sums), so the error is measured
    against the tensor's scale.
    """
    expected = expected.double()
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual.double() - expected).abs().max()
    assert err <= rtol * scale, f'{name}: max abs error {err:.3g} > {rtol} x scale {scale:.3g}'


def _sum_lengths(levels: int, points: int, num_queries: int, dim: int) -> Dict[str, int]:
    """The longest sum behind each result of the op, for error bounds of ``n * eps``.

    An output element sums levels * points * 4 bilinear taps; a row of grad_value at most
    every query's taps (num_queries * levels * points * 4); a location or weight gradient
    4 taps of each of ``dim`` channels. A float rounding of a sum of n terms is off by at
    most n * eps of the sum of their magnitudes, which these inputs (random values,
    positive weights summing to one per query) keep within a few times the tensor's
    largest magnitude.
    """
    taps = levels * points * 4
    return {'output': taps, 'grad_value': num_queries * taps,
            'grad_sampling_locations': 4 * dim, 'grad_attention_weights': 4 * dim}


@pytest.fixture(scope='session')
def make_inputs() -> Callable[..., Dict[str, torch.Tensor]]:
    """The op's arguments: see :func:`_make_inputs`."""
    return _make_inputs


@pytest.fixture(scope='session')
def forward_backward() -> Callable:
    """Output and the three gradients of an implementation: see :func:`_forward_backward`."""
    return _forward_backward


@pytest.fixture(scope='session')
def assert_close_relative() -> Callable:
    """Max error against the expected tensor's scale: see :func:`_assert_close_relative`."""
    return _assert_close_relative


@pytest.fixture(scope='session')
def sum_lengths() -> Callable[..., Dict[str, int]]:
    """The longest sum behind each of the op's results: see :func:`_sum_lengths`."""
    return _sum_lengths
