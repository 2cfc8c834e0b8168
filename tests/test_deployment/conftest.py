"""Fixtures of the deployment tests: models with weights, padded batches, a matcher.

Random weights are initialised, then every parameter is perturbed (as in the model
tests), so that no score is tied by construction and the top-100 is well defined.
"""
import functools
import logging
import os
import os.path as osp
from typing import Callable, List, Sequence, Tuple

import numpy as np
import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402

from projects.deformable_detr.checkpoint import allow_mmengine_checkpoints  # noqa: E402
from projects.deformable_detr.deployment import build_detector  # noqa: E402

allow_mmengine_checkpoints()  # load_weights of Runner checkpoints, as the tools do

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
# The configs the tests export, by the names they are parametrised with: the CPU demo
# (R18 at half width, refine + two-stage) and the three multi-scale R50 variants.
CONFIGS = {
    'demo': 'configs/synthetic/deformable-detr-refine-twostage_r18_1xb8-synthetic.py',
    'plain': 'configs/deformable_detr/deformable-detr_r50_16xb2-50e_coco.py',
    'refine': 'configs/deformable_detr/deformable-detr-refine_r50_16xb2-50e_coco.py',
    'twostage': 'configs/deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
}
MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights' per-tensor log


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (the machines are shared; the tensors are small)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_detector(name: str, seed: int = 0) -> torch.nn.Module:
    """The detector of config ``name`` (of :data:`CONFIGS`) with initialised, then
    perturbed, random weights, in eval mode."""
    cfg = Config.fromfile(osp.join(ROOT, CONFIGS[name]))
    cfg.model.backbone.init_cfg = None  # no pretrained weights to download
    torch.manual_seed(seed)
    model = build_detector(cfg)
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _padded_batch(shapes: Sequence[Tuple[int, int]], seed: int = 0
                  ) -> Tuple[torch.Tensor, List[DetDataSample], np.ndarray]:
    """Random normalised images of ``shapes``, zero-padded to one batch; their samples
    (as the data preprocessor fills them) and their (h, w) as the ONNX input."""
    gen = torch.Generator().manual_seed(seed)
    batch_h, batch_w = max(h for h, _ in shapes), max(w for _, w in shapes)
    inputs = torch.zeros(len(shapes), 3, batch_h, batch_w)
    samples = []
    for i, (h, w) in enumerate(shapes):
        inputs[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        samples.append(DetDataSample(metainfo=dict(
            img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0),
            batch_input_shape=(batch_h, batch_w), pad_shape=(batch_h, batch_w))))
    return inputs, samples, np.array(shapes, dtype=np.int64)


def _assert_runtime_matches(assert_same_detections: Callable, model: torch.nn.Module,
                            onnx_path: str, shapes: Sequence[Tuple[int, int]], seed: int = 0,
                            inputs=None, samples=None) -> List[np.ndarray]:
    """Runs the ONNX file with onnxruntime on a padded batch of ``shapes`` (or the given
    batch) and checks it against ``model.predict(..., rescale=False)``, image by image:
    the same detections, matched one to one (``assert_same_detections``, the root
    conftest's), scores within 1e-4 (sigmoids in [0, 1]; the runtimes round float32 sums
    of up to a few thousand terms in other orders: ~800 eps32) and boxes within 1e-2 px
    (coordinates of up to ~1333 px: the same relative rounding).

    Returns the PyTorch scores of every image (for the callers' own checks).
    """
    import onnxruntime as ort
    if inputs is None:
        inputs, samples, img_shapes = _padded_batch(shapes, seed)
    else:
        img_shapes = np.array([s.img_shape[:2] for s in samples], dtype=np.int64)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_path, options, providers=['CPUExecutionProvider'])
    dets, labels = session.run(None, {'input': inputs.numpy(), 'img_shapes': img_shapes})
    with torch.no_grad():
        results = model.predict(inputs, samples, rescale=False)
    for i, result in enumerate(results):
        expected = result.pred_instances
        assert dets[i].shape == (len(expected.scores), 5), (dets[i].shape, len(expected.scores))
        assert_same_detections(dets[i][:, :4], dets[i][:, 4], labels[i], expected.bboxes,
                               expected.scores, expected.labels, score_tol=1e-4, box_tol=1e-2)
    return [r.pred_instances.scores.numpy() for r in results]


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


@pytest.fixture(scope='session')
def attention_gathers() -> Callable:
    """Counts a graph's attention Gathers: see :func:`_attention_gathers`."""
    return _attention_gathers


@pytest.fixture(scope='session')
def configs() -> dict:
    """Config paths (relative to the repository root) by name: see :data:`CONFIGS`."""
    return CONFIGS


@pytest.fixture(scope='session')
def random_detector() -> Callable[..., torch.nn.Module]:
    """A config's detector with perturbed random weights: see :func:`_random_detector`."""
    return _random_detector


@pytest.fixture(scope='session')
def padded_batch() -> Callable:
    """Random padded images, their samples and sizes: see :func:`_padded_batch`."""
    return _padded_batch


@pytest.fixture(scope='session')
def assert_runtime_matches(assert_same_detections) -> Callable:
    """onnxruntime against PyTorch on a batch: see :func:`_assert_runtime_matches`."""
    return functools.partial(_assert_runtime_matches, assert_same_detections)


@pytest.fixture(scope='session')
def demo_trained(tmp_path_factory, run_tool) -> Tuple[str, str]:
    """The demo config trained for two iterations (8 synthetic images, batch 4).

    Returns the data root and the checkpoint, an MMEngine checkpoint as tools/train.py
    saves it.
    """
    tmp = tmp_path_factory.mktemp('deploy_demo')
    data = str(tmp / 'data')
    run_tool(['tools/dataset_converters/synthetic_coco.py', '--out', data, '--num-train', '8',
              '--num-val', '2', '--no-validate'])
    ann = osp.join(data, 'annotations', 'val.json')
    run_tool(['tools/train.py', CONFIGS['demo'], '--work-dir', str(tmp / 'work'), '--cfg-options',
              f'train_dataloader.dataset.data_root={data}/',
              f'val_dataloader.dataset.data_root={data}/',
              f'test_dataloader.dataset.data_root={data}/', f'val_evaluator.ann_file={ann}',
              f'test_evaluator.ann_file={ann}', 'train_cfg.max_epochs=1',
              'train_dataloader.batch_size=4', 'param_scheduler=[]'])
    ckpt = str(tmp / 'work' / 'epoch_1.pth')
    assert os.path.isfile(ckpt)
    return data, ckpt
