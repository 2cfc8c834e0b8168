"""The gather form of the op (what ``--op-mode gather`` exports) against the op, eager.

Tolerance. Both sides sum T = levels * points * 4 terms ``a * b * v`` per output (a the
attention weight, b a bilinear weight in [0, 1], v a value entry), and both map a
location to pixels as ``x * w - 0.5``, which may round differently (the C++ kernel may
fuse it into one FMA). With eps the dtype's machine epsilon, A = sum |a| over the
(level, point) pairs of an output and V = max |v|:

- the products and the sum differ by at most about eps * T * A * V on each side;
- a pixel coordinate differs by at most about 2 * eps * (|x| * w + 1), and the output
  moves by at most 2 * V * |a| per pixel a point moves (bilinear sampling is continuous,
  also across pixel and map borders, with slope at most 2 * V).

So |gather - op| <= eps * A * V * (2 * T + 8 * (|x|max * (w + h)max + 2)), the bound
below, with a factor of about two to spare. Against the op in float64 this is about
1e-13 of the output's scale; a misplaced pixel or a wrong border costs a sizeable
fraction of V.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ops import gather_sampling, multi_scale_deformable_attn, multi_scale_deformable_attn_gather


def _bound(inputs, dtype) -> float:
    """The tolerance of the module docstring for these inputs, computed in ``dtype``."""
    value, shapes = inputs['value'], inputs['spatial_shapes']
    loc, weights = inputs['sampling_locations'], inputs['attention_weights']
    levels, points = weights.shape[-2:]
    terms = 4 * levels * points
    finite = loc[loc.isfinite()]
    reach = float(finite.abs().max()) if finite.numel() else 0.0
    span = int(shapes.sum(1).max())  # (w + h) of the largest level
    a_sum = float(weights.double().abs().sum((-1, -2)).max())
    v_max = float(value.double().abs().max())
    return torch.finfo(dtype).eps * a_sum * v_max * (2 * terms + 8 * (reach * span + 2))


def _check(inputs, dtype=torch.float64):
    """The gather form in ``dtype`` against the op in float64, within :func:`_bound`."""
    expected = multi_scale_deformable_attn(**inputs)
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    actual = multi_scale_deformable_attn_gather(**cast)
    assert actual.dtype == dtype and actual.shape == expected.shape
    err = float((actual.double() - expected).abs().max())
    # float64 inputs cast to float32 also round value and the weights: the same bound.
    bound = _bound(inputs, dtype)
    assert err <= bound, f'max abs error {err:.3g} > bound {bound:.3g}'
    return actual, expected


SHAPES = {
    'odd_levels': [(7, 5), (3, 11), (1, 1), (2, 9)],
    'one_pixel': [(1, 1)],
    'detector_like': [(16, 12), (8, 6), (4, 3), (2, 2)],
}


@pytest.mark.parametrize('shapes', SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_matches_the_op(shapes, dtype, make_inputs):
    # Locations from [-0.5, 1.5]: about half of them with corners outside their level.
    inputs = make_inputs(shapes, bs=2, heads=3, dim=5, nq=17, points=3, dtype=torch.float64,
                         outside=0.5)
    actual, expected = _check(inputs, dtype)
    assert expected.abs().max() > 0.1  # a real output, not zeros on both sides


@settings(max_examples=30, deadline=None)
@given(hw=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=4),
       bs=st.integers(1, 3), heads=st.integers(1, 4), dim=st.integers(1, 6),
       nq=st.integers(1, 7), points=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_fuzz_shapes(hw, bs, heads, dim, nq, points, seed, make_inputs):
    inputs = make_inputs(hw, bs=bs, heads=heads, dim=dim, nq=nq, points=points,
                         dtype=torch.float64, outside=1.0, seed=seed)
    _check(inputs)


def test_borders_and_non_finite_locations(make_inputs):
    """Locations on pixel centres, on the map's borders, one pixel beyond them, far
    beyond, and NaN or infinite: the same as the op (which gives NaN and infinite
    locations no corner), and exactly zero where no corner is inside."""
    shapes = [(5, 7), (3, 1)]
    inputs = make_inputs(shapes, bs=1, heads=2, dim=4, nq=14, points=2, dtype=torch.float64)
    loc = inputs['sampling_locations']  # (1, 14, heads, levels, points, 2), random inside
    size = {0: torch.tensor([7.0, 1.0], dtype=torch.float64)[None, :, None],  # w per level
            1: torch.tensor([5.0, 3.0], dtype=torch.float64)[None, :, None]}  # h per level
    # (query, axis, location as a function of the level's size, nothing inside?: None
    # where rounding decides whether a corner keeps a weight of about 1e-16)
    cases = [
        (0, 0, lambda s: 0.5 / s, False),  # centre of pixel 0
        (1, 0, lambda s: 0 * s, False),  # the map's left edge: half of pixel 0
        (2, 0, lambda s: 1 + 0 * s, False),  # the right edge
        (3, 0, lambda s: -0.5 / s, None),  # one pixel out: weight 0 up to rounding
        (4, 0, lambda s: -1 / s, True),  # 1.5 pixels out
        (5, 0, lambda s: 1 + 1 / s, True),
        (6, 1, lambda s: -1 / s, True),
        (7, 1, lambda s: 1 + 0.5 / s, None),  # one pixel below, as query 3
        (8, 0, lambda s: math.nan + 0 * s, True),
        (9, 1, lambda s: math.nan + 0 * s, True),
        (10, 0, lambda s: math.inf + 0 * s, True),
        (11, 1, lambda s: -math.inf + 0 * s, True),
        (12, 0, lambda s: 1e30 + 0 * s, True),
        (13, 1, lambda s: -1e30 + 0 * s, True),
    ]
    for query, axis, where, empty in cases:
        loc[0, query, ..., axis] = where(size[axis]).expand(2, 2, 2)
    actual, expected = _check(inputs)
    assert actual.isfinite().all()
    for query, axis, _, empty in cases:
        if empty is True:
            assert not actual[0, query].any() and not expected[0, query].any(), query
        elif empty is False:
            assert actual[0, query].abs().max() > 0.01, query


def test_gather_sampling_traces_without_the_op(make_inputs):
    """Under ``gather_sampling()`` the op's entry point computes the gather form, so
    that ``torch.export`` (dynamic sizes) holds its gathers and no ``ddetr`` op; outside
    it, the op again."""

    class Attn(torch.nn.Module):
        def forward(self, value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights):
            return multi_scale_deformable_attn(value, spatial_shapes, level_start_index,
                                               sampling_locations, attention_weights)

    inputs = make_inputs(SHAPES['odd_levels'], bs=2, heads=3, dim=5, nq=7, points=3,
                         dtype=torch.float64, outside=0.5)
    args = tuple(inputs[k] for k in ('value', 'spatial_shapes', 'level_start_index',
                                     'sampling_locations', 'attention_weights'))
    batch, keys, queries = (torch.export.Dim(n) for n in ('batch', 'keys', 'queries'))
    dims = ({0: batch, 1: keys}, None, None, {0: batch, 1: queries}, {0: batch, 1: queries})
    with gather_sampling():
        program = torch.export.export(Attn(), args, dynamic_shapes=dims, strict=False)
    targets = {str(n.target) for n in program.graph.nodes if n.op == 'call_function'}
    assert not [t for t in targets if 'ddetr' in t] and 'aten.index_select.default' in targets
    assert 'ddetr' in str(torch.export.export(Attn(), args, strict=False).graph)
    # Other sizes than traced, other level sizes too: they are read from the tensors.
    other = make_inputs([(5, 3), (2, 2), (1, 1), (3, 4)], bs=1, heads=3, dim=5, nq=4,
                        points=3, dtype=torch.float64, outside=0.5, seed=1)
    other_args = tuple(other[k] for k in ('value', 'spatial_shapes', 'level_start_index',
                                          'sampling_locations', 'attention_weights'))
    assert torch.equal(program.module()(*other_args),
                       multi_scale_deformable_attn_gather(*other_args))
    _check(other)  # and that is the op's result
