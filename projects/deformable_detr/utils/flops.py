"""FLOP handles for MMEngine's ``FlopAnalyzer`` (``tools/analysis_tools/get_flops.py``).

Tracing sees our op as one node, ``ddetr::multi_scale_deformable_attn``, that no default
handle knows, and MMEngine has none for ``aten::scaled_dot_product_attention`` (the
decoder's fused self-attention). Convention: one multiply-add is one FLOP (fvcore's,
MMEngine's and the DETR papers'). Use them with
``FlopAnalyzer(model, inputs).set_op_handle(**FLOP_HANDLES)``.
"""
from typing import Any, Callable, Dict, List

import numpy as np
from mmengine.analysis.jit_handles import get_shape


def multi_scale_deformable_attn_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """FLOPs of ``ddetr::multi_scale_deformable_attn(value, shapes, starts, locations, weights)``.

    Every sampled point reads ``dim`` channels at 4 bilinear corners and scales the
    result by its attention weight: 5 multiply-adds per channel and point.
    """
    bs, _, heads, dim = get_shape(inputs[0])
    _, num_queries, _, levels, points, _ = get_shape(inputs[3])
    return bs * num_queries * heads * levels * points * dim * 5


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """FLOPs of ``aten::scaled_dot_product_attention`` (q k^T, then weights x v)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = int(np.prod(q[:-2]))
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


FLOP_HANDLES: Dict[str, Callable[[List[Any], List[Any]], int]] = {
    'ddetr::multi_scale_deformable_attn': multi_scale_deformable_attn_flop_jit,
    'aten::scaled_dot_product_attention': sdpa_flop_jit,
}
