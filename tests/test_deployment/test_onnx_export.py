"""ONNX export: onnxruntime gives PyTorch's detections in the GridSample and the gather
op modes; no GridSample in the gather mode; TensorRT's plugin node; bad input.

Fidelity bar: for the same top-100, scores within 1e-4 and boxes within 1e-2 px of
``model.predict(..., rescale=False)`` (matched one to one: see ``_assert_runtime_matches`` in conftest.py).
"""
import os
import os.path as osp
import re

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from mmdet.structures import DetDataSample

from ops.onnx import TRT_DOMAIN, TRT_PLUGIN
from projects.deformable_detr.deployment import (ExportError, build_detector, export_onnx,
                                                 foreign_ops, load_weights)


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _synthetic_batch(model, data, shapes):
    """Val images of the synthetic set, cropped to ``shapes``, through the model's data
    preprocessor: the normalised padded batch a user hands the graph."""
    files = sorted(os.listdir(osp.join(data, 'val')))
    images, samples = [], []
    for (h, w), name in zip(shapes, files):
        pixels = np.asarray(Image.open(osp.join(data, 'val', name)).convert('RGB'))[:h, :w]
        # BGR, channels first: what mmdet's LoadImageFromFile and PackDetInputs hand on.
        images.append(torch.from_numpy(pixels[..., ::-1].copy()).permute(2, 0, 1))
        samples.append(DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                                   scale_factor=(1.0, 1.0))))
    batch = model.data_preprocessor(dict(inputs=images, data_samples=samples), False)
    return batch['inputs'], batch['data_samples']


# Standard ONNX that onnxruntime runs. Default: GridSample (5 attention layers x 4
# levels). --backend tensorrt: the gather mode, chosen by the tool, at opset 18.
TOOL_MODES = {'default': ([], 'for onnxruntime: opset 18, op mode onnx (20 GridSample nodes)'),
              'tensorrt': (['--backend', 'tensorrt'], 'for tensorrt: opset 18, op mode gather (')}


def _attention_gathers(graph) -> int:
    """Gather nodes written for the attention's ``index_select`` (one per level and layer):
    the exporter keeps each node's aten operator and the model's source line that
    called it (here the attention layer's call of the op) in its metadata."""
    def is_attention_gather(node):
        meta = {p.key: p.value for p in node.metadata_props}
        call = meta.get('pkg.torch.onnx.stack_trace', '').strip().splitlines()[-1:]
        return (node.op_type == 'Gather' and 'aten.index_select' in
                meta.get('pkg.torch.onnx.fx_node', '') and bool(call)
                and 'multi_scale_deformable_attn(' in call[0])
    return sum(map(is_attention_gather, graph.node))


@pytest.mark.parametrize('mode', TOOL_MODES.values(), ids=TOOL_MODES.keys())
def test_demo_checkpoint_dynamic_export_through_the_tool(mode, demo_trained, run_tool, tmp_path,
                                                         configs, assert_runtime_matches):
    """The demo config trained two iterations: one --dynamic file, two batch shapes, the
    second a padded batch of two images of different sizes."""
    data, ckpt = demo_trained
    options, printed = mode
    out = str(tmp_path / 'demo.onnx')
    proc = run_tool(['tools/deployment/pytorch2onnx.py', configs['demo'], ckpt, '--shape',
                     '128', '128', '--out', out, '--dynamic', *options])
    assert printed in proc.stdout, proc.stdout
    low = re.search(r'height (\d+)\.\.', proc.stdout)
    assert low and int(low.group(1)) <= 96, proc.stdout
    model = onnx.load(out)
    assert [i.name for i in model.graph.input] == ['input', 'img_shapes']
    assert _dims(model.graph.input[0]) == ['batch', 3, 'height', 'width']
    assert [o.name for o in model.graph.output] == ['dets', 'labels']
    assert _dims(model.graph.output[0])[0] == 'batch' and _dims(model.graph.output[0])[2] == 5
    assert {n.domain for n in model.graph.node} <= {''}  # standard ONNX only
    assert model.opset_import[0].version == 18
    if options:
        assert not [n for n in model.graph.node if n.op_type == 'GridSample']
        assert _attention_gathers(model.graph) == 20

    detector = build_detector(configs['demo'])
    load_weights(detector, ckpt)
    for shapes in ([(128, 128)], [(112, 128), (96, 100)]):
        inputs, samples = _synthetic_batch(detector, data, shapes)
        scores = assert_runtime_matches(detector, out, None, inputs=inputs, samples=samples)
        assert all(len(s) == 100 for s in scores)


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


# (variant, op mode, opset). The gather mode on the plain model and on refine + two-stage
# (refinement alone adds nothing to the attention), at the two opsets not otherwise
# tested; at opset 18 through the tool (the demo test above).
R50_CASES = [('plain', 'onnx', 18), ('refine', 'onnx', 21), ('twostage', 'onnx', 23),
             ('plain', 'gather', 20), ('twostage', 'gather', 22)]


@pytest.mark.parametrize('name,op_mode,opset', R50_CASES)
def test_r50_variants_match_pytorch(name, op_mode, opset, r50_export, assert_runtime_matches):
    """Random-weight R50 models, a static batch of two (the second image padded)."""
    model, out, info = r50_export(name, op_mode, opset)
    graph = onnx.load(out).graph
    # 6 + 6 layers x 4 levels
    assert (_attention_gathers(graph) if op_mode == 'gather' else info['attention_nodes']) == 48
    assert onnx.load(out).opset_import[0].version == opset
    scores = assert_runtime_matches(model, out, [(128, 128), (96, 112)])
    # Not degenerate: the perturbed weights give distinct scores, not a tied plateau.
    assert len(np.unique(scores[0])) > 90 and scores[0].max() - scores[0].min() > 1e-3


def test_gather_mode_has_no_grid_sample(r50_export):
    """The gather mode's graph: standard ONNX, no GridSample, no plugin; the attention's
    sampling is one Gather of value rows per level and layer, and arithmetic."""
    _, out, info = r50_export('twostage', 'gather', 22)
    graph = onnx.load(out).graph
    types = {n.op_type for n in graph.node}
    assert 'GridSample' not in types
    assert {n.domain for n in graph.node} <= {''}
    assert info['attention_node'] == 'Gather'
    assert info['attention_nodes'] == sum(n.op_type == 'Gather' for n in graph.node)
    assert _attention_gathers(graph) == 48
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


@pytest.mark.parametrize('opset,why', [(17, 'writes opset 18'), (24, 'knows opsets up to 23')])
def test_unsupported_opset_is_refused(run_tool, configs, tmp_path, opset, why):
    proc = run_tool(['tools/deployment/pytorch2onnx.py', configs['demo'], 'none.pth',
                     '--shape', '128', '128', '--out', str(tmp_path / 'x.onnx'), '--opset',
                     str(opset)], check=False)
    assert proc.returncode != 0
    assert f'ONNX opset {opset} is not supported (use 18 to 23)' in proc.stderr
    assert why in proc.stderr and 'Traceback' not in proc.stderr


def test_checkpoint_of_another_variant_is_refused(demo_trained, run_tool, configs, tmp_path):
    _, ckpt = demo_trained
    out = str(tmp_path / 'x.onnx')
    # Another model: MMEngine's strict-load error, with the keys.
    proc = run_tool(['tools/deployment/pytorch2onnx.py', configs['plain'], ckpt, '--shape',
                     '128', '128', '--out', out, '--cfg-options', 'model.backbone.init_cfg=None'],
                    check=False)
    assert proc.returncode != 0 and 'does not fit' in proc.stderr
    assert 'missing keys in source state_dict: ' in proc.stderr
    assert 'query_embedding.weight' in proc.stderr  # plain has learnt queries, the demo not
    assert 'size mismatch for' in proc.stderr
    # The same keys, but a variant that shares its head branches: refused, not silently
    # loaded with the last layer's branch.
    proc = run_tool(['tools/deployment/pytorch2onnx.py', configs['demo'], ckpt, '--shape',
                     '128', '128', '--out', out, '--cfg-options', 'model.with_box_refine=False'],
                    check=False)
    assert proc.returncode != 0 and 'does not fit' in proc.stderr
    assert 'bbox_head.cls_branches.0.weight' in proc.stderr and 'shares' in proc.stderr
    assert not osp.exists(out)


def test_model_that_is_not_ours_is_refused(run_tool, tmp_path):
    import mmdet
    theirs = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', 'deformable_detr',
                      'deformable-detr_r50_16xb2-50e_coco.py')
    proc = run_tool(['tools/deployment/pytorch2onnx.py', theirs, 'none.pth', '--shape', '128',
                     '128', '--out', str(tmp_path / 'x.onnx')], check=False)
    assert proc.returncode != 0
    assert "model (type='DeformableDETR'" in proc.stderr and 'ddetr.DeformableDETR' in proc.stderr


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


def _pytorch2onnx_tool():
    """tools/deployment/pytorch2onnx.py as a module (its functions, without running it)."""
    import importlib.util
    path = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'tools',
                    'deployment', 'pytorch2onnx.py')
    spec = importlib.util.spec_from_file_location('pytorch2onnx', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('backend,op_mode,opset,expected', [
    ('tensorrt', None, None, ('gather', 18)),  # chosen for TensorRT
    ('tensorrt', 'custom', None, ('custom', 18)),  # the plugin, when asked for
    ('tensorrt', 'gather', 21, ('gather', 21)),  # an opset asked for is kept
    ('onnxruntime', None, None, ('onnx', 18)),
    ('onnxruntime', 'gather', None, ('gather', 18)),
])
def test_backend_picks_op_mode_and_opset(backend, op_mode, opset, expected):
    import argparse
    args = argparse.Namespace(backend=backend, op_mode=op_mode, opset=opset)
    _pytorch2onnx_tool().resolve_backend(args)
    assert (args.op_mode, args.opset) == expected


def test_grid_sample_for_tensorrt_is_refused(run_tool, configs, tmp_path):
    proc = run_tool(['tools/deployment/pytorch2onnx.py', configs['demo'], 'none.pth',
                     '--shape', '128', '128', '--out', str(tmp_path / 'x.onnx'), '--backend',
                     'tensorrt', '--op-mode', 'onnx'], check=False)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert '--backend tensorrt with --op-mode onnx' in proc.stderr
    assert '4646' in proc.stderr and '4813' in proc.stderr and '--op-mode gather' in proc.stderr
    assert not osp.exists(tmp_path / 'x.onnx')
