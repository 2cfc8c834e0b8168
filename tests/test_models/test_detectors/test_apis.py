"""mmdet's inference API with our configs, and a training step that learns."""

import numpy as np
import pytest
import torch
from mmcv.transforms import Compose
from mmdet.apis import inference_detector, init_detector
from mmdet.registry import MODELS
from mmdet.utils import get_test_pipeline_cfg
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

pytestmark = pytest.mark.usefixtures('one_thread')


def test_init_detector_and_inference_detector(config_path):
    cfg = Config.fromfile(config_path('twostage'))
    # A small test scale: a full R50 at 1333x800 is slow on a CPU.
    cfg.test_dataloader.dataset.pipeline[1].scale = (160, 128)
    model = init_detector(cfg, checkpoint=None, device='cpu')
    image = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    result = inference_detector(model, image)
    pred = result.pred_instances
    assert len(pred) == 100 and pred.bboxes.shape == (100, 4)
    assert result.img_shape == (96, 160) and result.ori_shape == (120, 200)
    # Boxes are rescaled to the original image: they are the boxes predicted on the resized
    # image, divided by its scale factor (0.8)
    assert result.scale_factor == pytest.approx((0.8, 0.8))
    pipeline = get_test_pipeline_cfg(cfg)
    pipeline[0].type = 'mmdet.LoadImageFromNDArray'
    data = Compose(pipeline)(dict(img=image, img_id=0))
    data = model.data_preprocessor(dict(inputs=[data['inputs']],
                                        data_samples=[data['data_samples']]), False)
    with torch.no_grad():
        (plain, ) = model.predict(data['inputs'], data['data_samples'], rescale=False)
    torch.testing.assert_close(pred.scores, plain.pred_instances.scores)
    # the same numbers, each divided once: float32 rounding of one division
    torch.testing.assert_close(
        pred.bboxes, plain.pred_instances.bboxes / pred.bboxes.new_tensor([0.8] * 4),
        rtol=2 * torch.finfo(torch.float32).eps, atol=0)
    assert pred.bboxes[:, 0::2].max() <= 200 + 1e-3 and pred.bboxes[:, 1::2].max() <= 120 + 1e-3
    assert ((pred.scores >= 0) & (pred.scores <= 1)).all() and pred.labels.max() < 80


def test_training_steps_lower_the_loss(config_path, small_model_cfg, make_batch):
    """The config's optimiser (AdamW, lr multipliers, clipping) on one fixed batch."""
    init_default_scope('mmdet')
    torch.manual_seed(0)
    cfg = Config.fromfile(config_path('refine'))
    model = MODELS.build(small_model_cfg('refine'))
    model.init_weights()
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    # The data preprocessor's input: uint8 images and their data samples.
    _, samples = make_batch(img_shapes=((64, 96), (64, 80)), num_gts=(2, 1), rescale=1.0)
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, *s.img_shape), generator=gen, dtype=torch.uint8)
              for s in samples]
    model.train()
    losses = [model.train_step(dict(inputs=images, data_samples=samples),
                               optim_wrapper)['loss'].item() for _ in range(15)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
