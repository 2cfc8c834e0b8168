"""ONNX export through the library: onnxruntime gives PyTorch's detections in the
GridSample and the gather op modes; no GridSample in the gather mode; TensorRT's plugin
node; bad input. The tool's own tests are in test_onnx_export_tool.py (a module of its
own, so that the two run side by side under ``pytest -n``).

Fidelity bar: for the same top-100, scores within 1e-4 and boxes within 1e-2 px of
``model.predict(..., rescale=False)`` (matched one to one: see ``_assert_runtime_matches`` in conftest.py).
"""
import os.path as osp

import numpy as np
import onnx
import pytest
import torch

from ops.onnx import TRT_DOMAIN, TRT_PLUGIN
from projects.deformable_detr.deployment import (ExportError, build_detector, export_onnx,
                                                 foreign_ops)


@pytest.fixture(scope='module')
def r50_export(random_detector, tmp_path_factory):
    """``get(name, op_mode, opset)`` -> (model, onnx path, export info): random-weight R50
    models exported at 128x128, batch 2. Each model is built once and each file written
    once for the whole module, so that tests share them."""
    tmp = tmp_path_factory.mktemp('r50_onnx')
    models, files = {}, {}

    def get(name, op_mode, opset):
        key = (name, op_mode, opset)
        if key not in files:
            if name not in models:
                models[name] = random_detector(name)
            path = str(tmp / f'{name}_{op_mode}_{opset}.onnx')
            info = export_onnx(models[name], path, (128, 128), batch=2, op_mode=op_mode,
                               opset=opset)
            files[key] = (models[name], path, info)
        return files[key]

    return get


# (variant, op mode, opset): each R50 variant once in the GridSample mode, at opset 18,
# 20 (GridSample's own opset 20 version) and 23; the gather mode on refine + two-stage,
# which holds every attention layer the plain model has (the gather mode's graph does
# not depend on the variant), at opset 22; both modes at opset 18, dynamic, through the
# tool (the demo tests in test_onnx_export_tool.py). Each export takes 20-50 s on one
# core, so no variant is exported twice in one mode.
R50_CASES = [('plain', 'onnx', 18), ('refine', 'onnx', 20), ('twostage', 'onnx', 23),
             ('twostage', 'gather', 22)]


@pytest.mark.parametrize('name,op_mode,opset', R50_CASES)
def test_r50_variants_match_pytorch(name, op_mode, opset, r50_export, assert_runtime_matches,
                                    attention_gathers):
    """Random-weight R50 models, a static batch of two (the second image padded)."""
    model, out, info = r50_export(name, op_mode, opset)
    graph = onnx.load(out).graph
    # 6 + 6 layers x 4 levels
    assert (attention_gathers(graph) if op_mode == 'gather' else info['attention_nodes']) == 48
    assert onnx.load(out).opset_import[0].version == opset
    scores = assert_runtime_matches(model, out, [(128, 128), (96, 112)])
    # Not degenerate: the perturbed weights give distinct scores, not a tied plateau.
    assert len(np.unique(scores[0])) > 90 and scores[0].max() - scores[0].min() > 1e-3


def test_gather_mode_has_no_grid_sample(r50_export, attention_gathers):
    """The gather mode's graph: standard ONNX, no GridSample, no plugin; the attention's
    sampling is one Gather of value rows per level and layer, and arithmetic."""
    _, out, info = r50_export('twostage', 'gather', 22)
    graph = onnx.load(out).graph
    types = {n.op_type for n in graph.node}
    assert 'GridSample' not in types
    assert {n.domain for n in graph.node} <= {''}
    assert info['attention_node'] == 'Gather'
    assert info['attention_nodes'] == sum(n.op_type == 'Gather' for n in graph.node)
    assert attention_gathers(graph) == 48
    assert {'Floor', 'Where', 'MatMul'} <= types


@pytest.mark.parametrize('plugin_version', ['1', '2'])
def test_custom_mode_emits_the_tensorrt_plugin(random_detector, tmp_path, plugin_version):
    """One MultiscaleDeformableAttnPlugin_TRT node per attention layer, with the
    plugin's inputs (order, types, shapes) and attributes; checked by ONNX against the
    plugin's schema. TensorRT itself is not here to build an engine."""
    model = random_detector('demo')
    out = str(tmp_path / 'trt.onnx')
    info = export_onnx(model, out, (128, 96), op_mode='custom', plugin_version=plugin_version)
    graph = onnx.load(out).graph
    nodes = [n for n in graph.node if n.op_type == TRT_PLUGIN]
    assert info['attention_nodes'] == len(nodes) == 2 + 3  # encoder + decoder layers
    assert not [n for n in graph.node if n.op_type == 'GridSample']
    assert {n.domain for n in graph.node} == {'', TRT_DOMAIN}
    assert {(o.domain, o.version) for o in onnx.load(out).opset_import} >= {(TRT_DOMAIN, 1)}
    types = {v.name: v.type.tensor_type for v in [*graph.value_info, *graph.input]}
    types.update({t.name: onnx.helper.make_tensor_type_proto(t.data_type, t.dims).tensor_type
                  for t in graph.initializer})
    float_, int32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    # 128x96 input: levels of 16x12, 8x6, 4x3, 2x2 = 192 + 48 + 12 + 4 keys; 8 heads of 16.
    keys, queries = 256, {True: 256, False: 50}
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {'plugin_version': plugin_version.encode(), 'plugin_namespace': b''}
        assert len(node.input) == 5 and len(node.output) == 1
        value, shapes, starts, locations, weights = (types[i] for i in node.input)
        assert [t.elem_type for t in (value, shapes, starts, locations, weights)] == [
            float_, int32, int32, float_, float_]
        encoder = _dims_of(locations)[1] == keys
        nq = queries[encoder]
        assert _dims_of(value) == [1, keys, 8, 16]
        assert _dims_of(shapes) == [4, 2] and _dims_of(starts) == [4]
        assert _dims_of(locations) == [1, nq, 8, 4, 4, 2]
        assert _dims_of(weights) == [1, nq, 8, 4, 4]
        output = types[node.output[0]]
        assert output.elem_type == float_ and _dims_of(output) == [1, nq, 8, 16]
    assert sum(_dims_of(types[n.input[3]])[1] == keys for n in nodes) == 2  # encoder


def _dims_of(tensor_type):
    return [d.dim_param or d.dim_value for d in tensor_type.shape.dim]


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------


def test_piece_that_cannot_export_is_named(configs, tmp_path):
    """A backbone with mmcv's deformable convolution (a compiled op torch cannot trace)."""
    from mmengine.config import Config
    cfg = Config.fromfile(configs['plain'])
    cfg.model.backbone.update(init_cfg=None, stage_with_dcn=(False, False, True, True),
                              dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False))
    model = build_detector(cfg)
    with pytest.raises(ExportError, match=r'detector\.backbone\.layer3\.0\.conv2 '
                       r'\(ModulatedDeformConv2dPack\)'):
        export_onnx(model, str(tmp_path / 'x.onnx'), (64, 64))
    assert not osp.exists(tmp_path / 'x.onnx')


def test_foreign_custom_op_is_named():
    """An operator of another library has no ONNX translation: the check names it and
    the module that calls it, before the ONNX translation fails somewhere inside."""
    lib = torch.library.Library('deploytest', 'FRAGMENT')
    lib.define('twice(Tensor x) -> Tensor')
    lib.impl('twice', lambda x: x * 2, 'CPU')
    torch.library.register_fake('deploytest::twice', lambda x: torch.empty_like(x), lib=lib)

    class Inner(torch.nn.Module):
        def forward(self, x):
            return torch.ops.deploytest.twice(x) + 1

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x)

    program = torch.export.export(Outer(), (torch.ones(2), ))
    assert foreign_ops(program) == ['deploytest.twice.default in inner (Inner)']


def test_bad_op_mode_and_opset_in_the_library(random_detector, tmp_path):
    model = random_detector('demo')
    with pytest.raises(ValueError, match="op_mode must be one of"):
        export_onnx(model, str(tmp_path / 'x.onnx'), (64, 64), op_mode='tensorrt')
    with pytest.raises(ValueError, match='ONNX opset 16 is not supported'):
        export_onnx(model, str(tmp_path / 'x.onnx'), (64, 64), opset=16)


def test_optimizer_skips_only_the_named_rewrite_rules():
    """The optimizer's rewrite rules less SKIPPED_REWRITE_RULES, restored afterwards: if
    onnxscript renames or drops a skipped rule, this says so (the skip would be moot)."""
    from onnxscript import rewriter

    from projects.deformable_detr.deployment.onnx_export import (
        SKIPPED_REWRITE_RULES, _default_rewrite_rules_without)
    before = rewriter._DEFAULT_REWRITE_RULES
    with _default_rewrite_rules_without(SKIPPED_REWRITE_RULES):
        names = [r.name for r in rewriter._DEFAULT_REWRITE_RULES]
        assert not set(names) & set(SKIPPED_REWRITE_RULES)
        assert len(names) == len(before) - len(SKIPPED_REWRITE_RULES)
    assert rewriter._DEFAULT_REWRITE_RULES is before
