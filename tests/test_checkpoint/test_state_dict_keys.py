"""Checkpoints saved before the package was laid out by role still load, strictly.

``fixtures/state_dict_keys.json.gz`` holds, for each COCO config, the key and shape of
every tensor in the state dict of the model that the code before the move built (written
by building each config's model and listing ``model.state_dict()``). Every model built
now must have exactly those keys and shapes, and a state dict of them must load with
``strict=True``.
"""
import gzip
import json
import os

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

import projects.deformable_detr  # noqa: F401  (registers the ddetr modules)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
with gzip.open(os.path.join(HERE, 'fixtures', 'state_dict_keys.json.gz'), 'rt') as f:
    SAVED = json.load(f)

pytestmark = pytest.mark.usefixtures('one_thread')


# Configs of a variant with other training settings (activation checkpointing, EMA...):
# the same model, so the same keys as the variant's.
SAME_MODEL = {'deformable-detr-refine-twostage_r50_16xb2-50e_coco-at-scale.py':
              'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py'}


def test_every_coco_config_is_covered():
    configs = sorted(f for f in os.listdir(os.path.join(ROOT, 'configs', 'deformable_detr'))
                     if f.endswith('.py'))
    assert sorted([*SAVED, *SAME_MODEL]) == configs and len(SAVED) == 5


@pytest.mark.parametrize('config', sorted([*SAVED, *SAME_MODEL]))
def test_old_checkpoint_keys_load_strictly(config):
    cfg = Config.fromfile(os.path.join(ROOT, 'configs', 'deformable_detr', config))
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    cfg.model.backbone.init_cfg = None  # no download: the keys do not depend on it
    model = MODELS.build(cfg.model)
    saved = SAVED[SAME_MODEL.get(config, config)]
    own = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert sorted(set(own) - set(saved)) == [] and sorted(set(saved) - set(own)) == []
    assert {k: v for k, v in own.items() if saved[k] != v} == {}
    # An old checkpoint of this variant: every tensor of its saved shape.
    gen = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=gen) if shape else torch.tensor(0)
             for key, shape in saved.items()}
    state = {k: (v.long() if k.endswith('num_batches_tracked') else v)
             for k, v in state.items()}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
