"""ONNX export through tools/deployment/pytorch2onnx.py: the demo's checkpoint exported
with dynamic shapes in both standard-ONNX op modes and run by onnxruntime; the backend's
choice of op mode and opset; bad input, refused with a message.

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

from projects.deformable_detr.deployment import build_detector, load_weights


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


@pytest.mark.parametrize('mode', TOOL_MODES.values(), ids=TOOL_MODES.keys())
def test_demo_checkpoint_dynamic_export_through_the_tool(mode, demo_trained, run_tool, tmp_path,
                                                         configs, assert_runtime_matches,
                                                         attention_gathers):
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
        assert attention_gathers(model.graph) == 20

    detector = build_detector(configs['demo'])
    load_weights(detector, ckpt)
    for shapes in ([(128, 128)], [(112, 128), (96, 100)]):
        inputs, samples = _synthetic_batch(detector, data, shapes)
        scores = assert_runtime_matches(detector, out, None, inputs=inputs, samples=samples)
        assert all(len(s) == 100 for s in scores)


# ----------------------------------------------------------------------------------
# Bad input and the backend's choices
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
