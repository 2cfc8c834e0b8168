"""The CPU demo config: it builds, runs a tiny epoch with COCO evaluation, and learns."""
import os

import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('pycocotools')
from mmengine.config import Config  # noqa: E402

from projects.deformable_detr.datasets.synthetic import GenConfig, generate_split  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))
DEMO_CONFIG = os.path.join(
    ROOT, 'configs', 'synthetic', 'deformable-detr-refine-twostage_r18_1xb8-synthetic.py')


@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
    """The demo config pointed at a tiny freshly generated data set."""
    data = str(tmp_path_factory.mktemp('synthetic'))
    for split, num in (('train', 8), ('val', 4)):
        generate_split(data, split, num, seed=1, cfg=GenConfig(), verbose=False)
    cfg = Config.fromfile(DEMO_CONFIG)
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = data + '/'
    cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = os.path.join(
        data, 'annotations', 'val.json')
    return cfg


def test_one_epoch_with_coco_eval(cfg, tmp_path):
    from mmengine.runner import Runner
    cfg = cfg.copy()
    cfg.work_dir = str(tmp_path)
    cfg.train_cfg.max_epochs = 1
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1)
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.val_loop.run()
    # -1 would mean pycocotools found no ground truth to score against: the range says
    # the evaluation ran on the annotated images. One epoch of 8 images learns nothing
    # measurable: learning is test_smoke_map.py's bar, and the demo's own run the README's.
    assert 0.0 <= metrics['coco/bbox_mAP'] <= 1.0
    assert os.path.isfile(os.path.join(str(tmp_path), 'epoch_1.pth'))


def test_training_lowers_the_loss(cfg):
    """Twenty steps on one fixed batch: the set loss must fall (it overfits)."""
    from mmengine.dataset import pseudo_collate
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope

    from mmdet.registry import DATASETS, MODELS
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    if cfg.get('custom_imports'):
        from mmengine.utils import import_modules_from_strings
        import_modules_from_strings(**cfg.custom_imports)
    torch.manual_seed(0)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    batch = pseudo_collate([dataset[i] for i in range(4)])
    model = MODELS.build(cfg.model)
    model.init_weights()
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    model.train()
    losses = [model.train_step(batch, optim_wrapper)['loss'].item() for _ in range(20)]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
