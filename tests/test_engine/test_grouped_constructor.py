import copy

import pytest
import torch
from mmengine.optim import DefaultOptimWrapperConstructor, build_optim_wrapper
from torch import nn

from projects.deformable_detr.engine import GroupedOptimWrapperConstructor
from projects.deformable_detr.engine.config_file import load_config

PARAMWISE = dict(custom_keys={'backbone': dict(lr_mult=0.1),
                              'sampling_offsets': dict(lr_mult=0.1, decay_mult=0.0)},
                 norm_decay_mult=0.5)


class Net(nn.Module):

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.sampling_offsets = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        x = self.backbone(x).mean((2, 3))
        return self.head(self.norm(self.sampling_offsets(x)))


def build(constructor, model, fused=False):
    optimizer = dict(type='AdamW', lr=1e-3, weight_decay=1e-2, fused=fused)
    return constructor(dict(type='OptimWrapper', optimizer=optimizer), PARAMWISE)(model)


def settings(optim_wrapper):
    """Each parameter's options, by name, and the number of groups."""
    found = {}
    for group in optim_wrapper.optimizer.param_groups:
        options = {k: v for k, v in group.items() if k != 'params'}
        for param in group['params']:
            assert id(param) not in found, 'a parameter in two groups'
            found[id(param)] = options
    return found


def test_same_settings_in_fewer_groups():
    model = Net()
    default = build(DefaultOptimWrapperConstructor, model)
    grouped = build(GroupedOptimWrapperConstructor, model)
    assert settings(grouped) == settings(default)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(settings(grouped)) == len(trainable) == len(default.optimizer.param_groups)
    # the backbone (its BN too: a custom key overrides norm_decay_mult), the offsets, the
    # LayerNorm, the head; the frozen layer in none
    lr_wd = [(len(g['params']), g['lr'], g['weight_decay'])
             for g in grouped.optimizer.param_groups]
    assert lr_wd == [(4, 1e-3 * 0.1, 1e-2), (2, 1e-3 * 0.1, 0.0), (2, 1e-3, 1e-2 * 0.5),
                     (2, 1e-3, 1e-2)]
    # in each group, the parameters in the model's order
    order = {id(p): i for i, p in enumerate(model.parameters())}
    for group in grouped.optimizer.param_groups:
        ranks = [order[id(p)] for p in group['params']]
        assert ranks == sorted(ranks)


@pytest.mark.parametrize('fused', [False, True])
def test_steps_equal_the_default_ones(fused):
    """AdamW updates each parameter on its own: grouping changes no bit of it."""
    torch.manual_seed(0)
    models = [Net(), None]
    models[1] = copy.deepcopy(models[0])
    wrappers = [build(DefaultOptimWrapperConstructor, models[0], fused),
                build(GroupedOptimWrapperConstructor, models[1], fused)]
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        for model, wrapper in zip(models, wrappers):
            wrapper.update_params(model(x).square().sum())
    for a, b in zip(*(m.state_dict().values() for m in models)):
        assert torch.equal(a, b)


def test_demo_config_builds_two_groups():
    cfg = load_config('configs/synthetic/deformable-detr-refine-twostage_r18_1xb8-synthetic.py')
    assert cfg.optim_wrapper.constructor == 'GroupedOptimWrapperConstructor'
    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.sampling_offsets = nn.Linear(2, 2)
    model.encoder.value_proj = nn.Linear(2, 2)
    model.reference_points = nn.Linear(2, 2)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    groups = wrapper.optimizer.param_groups
    # the sampling offsets with the reference points (lr x0.1), then the rest
    assert [len(g['params']) for g in groups] == [4, 2]
    assert [g['lr'] for g in groups] == [8e-4 * 0.1, 8e-4]


def test_default_constructor_state_is_refused_with_torchs_message():
    """What docs/training.md tells a user resuming an older checkpoint."""
    model = Net()
    default = build(DefaultOptimWrapperConstructor, model)
    default.update_params(model(torch.randn(2, 3, 8, 8)).sum())
    grouped = build(GroupedOptimWrapperConstructor, model)
    with pytest.raises(ValueError, match='different number of parameter groups'):
        grouped.load_state_dict(default.state_dict())
