"""Model fixtures of every test folder: configs, small models, random batches, model pairs.

The factories are session-scoped fixtures that hand the tests a function, so that
module-scoped fixtures (a model pair per variant) can use them too. The root conftest.py
imports them, so that the model, checkpoint and engine tests share them.
"""
import copy
import logging
import os
from typing import Callable, List, Sequence, Tuple

import mmdet
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData

import projects.deformable_detr  # noqa: F401  (registers the ddetr modules)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_CONFIGS = os.path.join(ROOT, 'configs', 'deformable_detr')
MMDET_CONFIGS = os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs',
                             'deformable_detr')
# The three multi-scale variants, by the names the tests parametrise with.
VARIANTS = {
    'plain': 'deformable-detr_r50_16xb2-50e_coco.py',
    'refine': 'deformable-detr-refine_r50_16xb2-50e_coco.py',
    'twostage': 'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
}
NUM_LAYERS, NUM_QUERIES = 2, 30
# The CPU demo's model: training BatchNorm, two-stage with 50 queries, 4 levels.
DEMO_CONFIG = os.path.join(ROOT, 'configs', 'synthetic',
                           'deformable-detr-refine-twostage_r18_1xb8-synthetic.py')
# init_weights() logs every parameter at INFO: slow, and noise in test output.
MMLogger.get_current_instance().setLevel(logging.WARNING)


def _config_path(name: str, ours: bool = True) -> str:
    """Path of a COCO config: a variant of :data:`VARIANTS` or a file name."""
    return os.path.join(OUR_CONFIGS if ours else MMDET_CONFIGS, VARIANTS.get(name, name))


def _small_model_cfg(name: str, ours: bool = True) -> Config:
    """A config's model with ResNet-18, two encoder and two decoder layers."""
    model = copy.deepcopy(Config.fromfile(_config_path(name, ours)).model)
    model.backbone.update(depth=18, init_cfg=None)
    model.neck.in_channels = [128, 256, 512][-len(model.neck.in_channels):]
    model.num_queries = NUM_QUERIES
    if ours:
        model.encoder = dict(model.encoder, num_layers=NUM_LAYERS)
        model.decoder = dict(model.decoder, num_layers=NUM_LAYERS)
    else:
        model.encoder.num_layers = model.decoder.num_layers = NUM_LAYERS
    return model


def _build_pair(variant: str, seed: int = 0) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """mmdet's model (initialised, then perturbed so no parameter is trivial) and
    ours carrying the very same weights."""
    init_default_scope('mmdet')
    torch.manual_seed(seed)
    theirs = MODELS.build(_small_model_cfg(variant, ours=False))
    theirs.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    ours = MODELS.build(_small_model_cfg(variant, ours=True))
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not unexpected and all(k.startswith('neck.') and k.endswith('.conv.bias')
                                  for k in missing), (missing, unexpected)
    for m in (theirs, ours):
        for mod in m.modules():  # identical losses need identical (no) dropout
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
            elif isinstance(mod, torch.nn.MultiheadAttention):
                mod.dropout = 0.0
    return theirs, ours


def _make_batch(img_shapes: Sequence[Tuple[int, int]] = ((64, 96), (56, 80)),
                num_gts: Sequence[int] = (3, 2), num_classes: int = 80, seed: int = 0,
                rescale: float = 1.25) -> Tuple[torch.Tensor, List[DetDataSample]]:
    """Normalised random images padded to one batch, and their data samples.

    Images of different sizes make the padding masks and valid ratios matter.
    """
    gen = torch.Generator().manual_seed(seed)
    batch_h = max(h for h, _ in img_shapes)
    batch_w = max(w for _, w in img_shapes)
    inputs = torch.zeros(len(img_shapes), 3, batch_h, batch_w)
    samples = []
    for i, ((h, w), n) in enumerate(zip(img_shapes, num_gts)):
        inputs[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
        wh = (torch.rand(n, 2, generator=gen) * 0.35 + 0.05) * torch.tensor([w, h])
        sample = DetDataSample(metainfo=dict(
            img_shape=(h, w), ori_shape=(round(h * rescale), round(w * rescale)),
            scale_factor=(1 / rescale, 1 / rescale), batch_input_shape=(batch_h, batch_w),
            pad_shape=(batch_h, batch_w)))
        sample.gt_instances = InstanceData(
            bboxes=torch.cat([xy, xy + wh], 1),
            labels=torch.randint(0, num_classes, (n, ), generator=gen))
        samples.append(sample)
    return inputs, samples


def _build_demo_model() -> torch.nn.Module:
    """The demo config's model, initialised from seed 0."""
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(DEMO_CONFIG).model)
    model.init_weights()
    return model


@pytest.fixture(scope='session')
def config_path() -> Callable[..., str]:
    """Path of a COCO config, ours or mmdet's: see :func:`_config_path`."""
    return _config_path


@pytest.fixture(scope='session')
def small_model_cfg() -> Callable[..., Config]:
    """A COCO config's model shrunk for the CPU: see :func:`_small_model_cfg`."""
    return _small_model_cfg


@pytest.fixture(scope='session')
def build_pair() -> Callable[..., Tuple[torch.nn.Module, torch.nn.Module]]:
    """mmdet's model and ours with the same weights: see :func:`_build_pair`."""
    return _build_pair


@pytest.fixture(scope='session')
def make_batch() -> Callable[..., Tuple[torch.Tensor, List[DetDataSample]]]:
    """Random padded images and their data samples: see :func:`_make_batch`."""
    return _make_batch


@pytest.fixture(scope='session')
def build_demo_model() -> Callable[[], torch.nn.Module]:
    """The demo config's model: see :func:`_build_demo_model`."""
    return _build_demo_model
