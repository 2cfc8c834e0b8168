"""The two weight sets of an EMA checkpoint: picked by name, refused where absent."""
import types

import pytest
import torch

from projects.deformable_detr.checkpoint.ema import NoEMAWeightsError, pick_weights
from projects.deformable_detr.engine.hooks import FineTuneHook


def checkpoint(with_ema: bool) -> dict:
    ema = {'a.weight': torch.ones(2), 'b.bias': torch.zeros(3)}
    ckpt = dict(state_dict=ema, meta={})
    if with_ema:
        ckpt['ema_state_dict'] = {'steps': torch.tensor(5),
                                  'module.a.weight': torch.full((2, ), 2.),
                                  'module.b.bias': torch.full((3, ), 3.)}
    return ckpt


def test_pick_either_set():
    ckpt = checkpoint(True)
    assert pick_weights(ckpt, 'ema') is ckpt['state_dict']
    raw = pick_weights(ckpt, 'raw')
    assert raw.keys() == {'a.weight', 'b.bias'}
    assert torch.equal(raw['b.bias'], torch.full((3,), 3.))


@pytest.mark.parametrize('weights', ['ema', 'raw'])
def test_a_checkpoint_without_ema_is_refused(weights):
    with pytest.raises(NoEMAWeightsError, match=f"weights='{weights}': x.pth holds no EMA "
                       'weights'):
        pick_weights(checkpoint(False), weights, 'x.pth')


def test_fine_tune_hook_option():
    with pytest.raises(ValueError, match="weights='average': one of 'ema', 'raw'"):
        FineTuneHook(weights='average')
    runner = types.SimpleNamespace(model=torch.nn.Module(), _resume=False, _load_from='x.pth')
    with pytest.raises(NoEMAWeightsError, match=r'load_from \(x.pth\) holds no EMA weights'):
        FineTuneHook(weights='ema').after_load_checkpoint(runner, checkpoint(False))
