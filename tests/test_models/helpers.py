"""Small configs, batches and model pairs shared by the model tests."""
import copy
import logging
import os
import sys
from typing import List, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # the project's packages, before `pip install -e .`
    sys.path.insert(0, ROOT)

import mmdet  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

import projects.deformable_detr  # noqa: E402,F401  (registers the ddetr modules)

OUR_CONFIGS = os.path.join(ROOT, 'configs', 'deformable_detr')
MMDET_CONFIGS = os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs',
                             'deformable_detr')
VARIANTS = {
    'plain': 'deformable-detr_r50_16xb2-50e_coco.py',
    'refine': 'deformable-detr-refine_r50_16xb2-50e_coco.py',
    'twostage': 'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
}
NUM_LAYERS, NUM_QUERIES = 2, 30
# init_weights() logs every parameter at INFO: slow, and noise in test output.
MMLogger.get_current_instance().setLevel(logging.WARNING)


def small_model_cfg(path: str, ours: bool) -> Config:
    """A config's model with ResNet-18, two encoder and two decoder layers."""
    model = copy.deepcopy(Config.fromfile(path).model)
    model.backbone.update(depth=18, init_cfg=None)
    model.neck.in_channels = [128, 256, 512][-len(model.neck.in_channels):]
    model.num_queries = NUM_QUERIES
    if ours:
        model.encoder = dict(model.encoder, num_layers=NUM_LAYERS)
        model.decoder = dict(model.decoder, num_layers=NUM_LAYERS)
    else:
        model.encoder.num_layers = model.decoder.num_layers = NUM_LAYERS
    return model


def build_pair(variant: str, seed: int = 0) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """mmdet's model (initialised, then perturbed so no parameter is trivial) and
    ours carrying the very same weights."""
    init_default_scope('mmdet')
    torch.manual_seed(seed)
    theirs = MODELS.build(small_model_cfg(os.path.join(MMDET_CONFIGS, VARIANTS[variant]),
                                          ours=False))
    theirs.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    ours = MODELS.build(small_model_cfg(os.path.join(OUR_CONFIGS, VARIANTS[variant]),
                                        ours=True))
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


def make_batch(img_shapes: Sequence[Tuple[int, int]] = ((64, 96), (56, 80)),
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
