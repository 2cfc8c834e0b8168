"""ONNX expressions of ``ddetr::multi_scale_deformable_attn`` for ``torch.onnx.export``.

Two translations of the op for the exporter's ``custom_translation_table`` (the dynamo
exporter: torch.export, then ONNX Script):

- :func:`grid_sample_translation`: standard ONNX, one ``GridSample`` per level
  (bilinear, zero padding, ``align_corners=0``, as the kernels), so that any ONNX
  runtime runs it. The level sizes are read from ``spatial_shapes`` at run time, so one
  graph serves every image size.
- :func:`tensorrt_plugin_translation`: one node per call of the op, for TensorRT's
  built-in plugin ``MultiscaleDeformableAttnPlugin_TRT`` (TensorRT OSS,
  ``plugin/multiscaleDeformableAttnPlugin``; plugin version 1 since TensorRT 8.x,
  version 2, the IPluginV3 port of TensorRT >= 10.11, with the same inputs). Its inputs,
  in order: ``value`` (N, S, M, D), ``spatial_shapes`` (L, 2) int32,
  ``level_start_index`` (L,) int32, ``sampling_locations`` (N, Lq, M, L, P, 2),
  ``attention_weights`` (N, Lq, M, L, P); its output (N, Lq, M, D). It has no
  parameters; TensorRT's ONNX parser finds it by the node's op type and the
  ``plugin_version`` / ``plugin_namespace`` attributes.

Both take the op's inputs with mmcv's layout (see :func:`ops.multi_scale_deformable_attn`)
and return its (N, Lq, M * D) output. They know nothing of the detector.

The export's third mode, ``gather`` (standard ONNX without ``GridSample``), needs no
translation: the model is traced under :func:`ops.gather_sampling`, so that its program
holds :func:`ops.multi_scale_deformable_attn_gather` (gathers and arithmetic) instead
of the op, and torch's exporter writes those operators.
"""
from typing import Callable

import onnx
import onnxscript
from onnxscript import ir

#: The TensorRT plugin's name, and the ONNX domain its nodes are put in. TensorRT's
#: parser looks the plugin up by name, version and namespace (the ``plugin_namespace``
#: attribute, then the domain): an empty namespace finds the built-in plugin.
TRT_PLUGIN = 'MultiscaleDeformableAttnPlugin_TRT'
TRT_DOMAIN = 'trt'
TRT_PLUGIN_VERSIONS = ('1', '2')

#: ONNX opsets these translations are written for: GridSample came in 16, and the
#: exporter itself writes opset 18 or later (onnxscript's highest is 23).
MIN_OPSET, MAX_OPSET = 18, 23


def _opset(version: int) -> onnxscript.values.Opset:
    """The default-domain ONNX Script opset ``version``, checked."""
    if not MIN_OPSET <= version <= MAX_OPSET:
        raise ValueError(f'ONNX opset {version} is not supported: the translations of '
                         f'multi_scale_deformable_attn are written for opsets {MIN_OPSET} to '
                         f'{MAX_OPSET}')
    return getattr(onnxscript, f'opset{version}')


def grid_sample_translation(opset: int = MIN_OPSET) -> Callable:
    """The op as standard ONNX for ``opset``: one ``GridSample`` per level.

    Value and locations of every (image, head) pair are batched together, as in
    :func:`ops.multi_scale_deformable_attn_pytorch`: ``GridSample`` samples
    (N*M, D, h, w) maps at (N*M, Lq, P) points, level by level, and the weighted sum
    over the points of each level is added up.
    """
    op = _opset(opset)
    # GridSample-20 renamed 'bilinear' to 'linear' (and generalised it to N-D).
    mode = 'linear' if opset >= 20 else 'bilinear'

    def multi_scale_deformable_attn(value, spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights):
        levels = sampling_locations.shape[3]
        heads, dim = value.shape[2], value.shape[3]
        # (N, S, M, D) -> (N, M, D, S): each level a slice of the last axis.
        value = op.Transpose(value, perm=[0, 2, 3, 1])
        # (N, Lq, M, L, P, 2) in [0, 1] -> (N*M, Lq, L, P, 2) in [-1, 1].
        grids = op.Sub(op.Mul(sampling_locations, 2.0), 1.0)
        grids = op.Transpose(grids, perm=[0, 2, 1, 3, 4, 5])
        grids = op.Reshape(grids, op.Concat(op.Constant(value_ints=[-1]),
                                            op.Shape(grids, start=2), axis=0))
        # (N, Lq, M, L, P) -> (N*M, 1, Lq, L, P)
        weights = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])
        weights = op.Reshape(weights, op.Concat(op.Constant(value_ints=[-1, 1]),
                                                op.Shape(weights, start=2), axis=0))
        out = None
        for lvl in range(levels):
            index = op.Constant(value_ints=[lvl])
            hw = op.Reshape(op.Gather(spatial_shapes, index, axis=0),
                            op.Constant(value_ints=[2]))
            start = op.Gather(level_start_index, index, axis=0)
            end = op.Add(start, op.Mul(op.Gather(hw, op.Constant(value_ints=[0])),
                                       op.Gather(hw, op.Constant(value_ints=[1]))))
            value_l = op.Slice(value, start, end, op.Constant(value_ints=[3]))
            value_l = op.Reshape(value_l, op.Concat(op.Constant(value_ints=[-1, dim]), hw,
                                                    axis=0))
            grid_l = op.Gather(grids, op.Constant(value_int=lvl), axis=2)
            sampled = op.GridSample(value_l, grid_l, mode=mode, padding_mode='zeros',
                                    align_corners=0)  # (N*M, D, Lq, P)
            # Weighted and summed level by level: the samples of all levels at once
            # would be a (N*M, D, Lq, L, P) tensor, L times the memory.
            weights_l = op.Gather(weights, op.Constant(value_int=lvl), axis=3)
            part = op.ReduceSum(op.Mul(sampled, weights_l), op.Constant(value_ints=[3]),
                                keepdims=0)  # (N*M, D, Lq)
            out = part if out is None else op.Add(out, part)
        batch = op.Shape(attention_weights, start=0, end=1)
        out = op.Reshape(out, op.Concat(batch, op.Constant(value_ints=[heads * dim, -1]),
                                        axis=0))
        return op.Transpose(out, perm=[0, 2, 1])  # (N, Lq, M*D)

    return multi_scale_deformable_attn


def tensorrt_plugin_schema() -> onnx.defs.OpSchema:
    """The ONNX schema of the plugin node: its inputs, their types, its attributes.

    Written from the plugin's source (TensorRT OSS ``multiscaleDeformableAttnPlugin``):
    ``supportsFormatCombination`` takes float32 or float16 for value, locations, weights
    and output (one type for all) and int32 for the two level tables. Registered with
    ``onnx.defs.register_schema``, it lets ONNX's checker validate the nodes (see
    :func:`check_model`); the export uses it to build them.
    """
    param = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    string = onnx.defs.OpSchema.AttrType.STRING
    return onnx.defs.OpSchema(
        TRT_PLUGIN, TRT_DOMAIN, 1,
        'TensorRT multi-scale deformable attention (Deformable DETR); output (N, Lq, M, D).',
        inputs=[param('value', 'T', '(N, S, M, D)'),
                param('spatial_shapes', 'tensor(int32)', '(L, 2): (h, w) of every level'),
                param('level_start_index', 'tensor(int32)', '(L,): first key of every level'),
                param('sampling_locations', 'T', '(N, Lq, M, L, P, 2), (x, y) in [0, 1]'),
                param('attention_weights', 'T', '(N, Lq, M, L, P)')],
        outputs=[param('output', 'T', '(N, Lq, M, D)')],
        type_constraints=[('T', ['tensor(float)', 'tensor(float16)'], 'float32 or float16')],
        attributes=[attr('plugin_version', string, 'plugin version', required=False),
                    attr('plugin_namespace', string, 'plugin namespace ("": built in)',
                         required=False)])


def check_model(model: onnx.ModelProto) -> None:
    """ONNX's full check (types and shapes), the plugin nodes against their schema."""
    schema = tensorrt_plugin_schema()
    registered = onnx.defs.has(TRT_PLUGIN, TRT_DOMAIN)
    if not registered:
        onnx.defs.register_schema(schema)
    try:
        onnx.checker.check_model(model, full_check=True)
    finally:
        if not registered:
            onnx.defs.deregister_schema(TRT_PLUGIN, 1, TRT_DOMAIN)


def tensorrt_plugin_translation(opset: int = MIN_OPSET, plugin_version: str = '1') -> Callable:
    """The op as one ``MultiscaleDeformableAttnPlugin_TRT`` node (domain ``trt``).

    The level tables are cast to int32 (the plugin takes no other integer type), and
    the plugin's (N, Lq, M, D) output is reshaped to the op's (N, Lq, M*D). The node's
    output carries its type and shape, which ONNX cannot infer for a custom op.
    """
    if plugin_version not in TRT_PLUGIN_VERSIONS:
        raise ValueError(f'{TRT_PLUGIN} has versions {TRT_PLUGIN_VERSIONS}, not '
                         f'{plugin_version!r}')
    op = _opset(opset)
    plugin = onnxscript.values.Op(onnxscript.values.Opset(TRT_DOMAIN, 1), TRT_PLUGIN,
                                  tensorrt_plugin_schema())

    def multi_scale_deformable_attn(value, spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights):
        out = plugin(
            value, op.Cast(spatial_shapes, to=ir.DataType.INT32),
            op.Cast(level_start_index, to=ir.DataType.INT32), sampling_locations,
            attention_weights, plugin_version=plugin_version, plugin_namespace='')
        out.dtype = value.dtype
        out.shape = ir.Shape([value.shape[0], sampling_locations.shape[1], value.shape[2],
                              value.shape[3]])
        heads, dim = value.shape[2], value.shape[3]
        return op.Reshape(out, op.Concat(op.Shape(out, start=0, end=2),
                                         op.Constant(value_ints=[heads * dim]), axis=0))

    return multi_scale_deformable_attn
