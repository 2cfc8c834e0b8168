"""tools/model_converters/mmdet_to_ours.py on a checkpoint saved with EMAHook."""
import os.path as osp

import torch

from projects.deformable_detr.checkpoint import allow_mmengine_checkpoints
from projects.deformable_detr.checkpoint.converters import mmdet_to_ours

allow_mmengine_checkpoints()  # torch.load of Runner checkpoints, as the tools do

CONVERTER = 'tools/model_converters/mmdet_to_ours.py'


def ema_checkpoint(baseline_run: str, path: str) -> dict:
    """The baseline's mmdet checkpoint made an EMA one: EMAHook's layout, with training
    weights other than the EMA weights."""
    ckpt = torch.load(osp.join(baseline_run, 'iter_8.pth'))
    raw = {f'module.{k}': v + 1 if v.is_floating_point() else v
           for k, v in ckpt['state_dict'].items()}
    ckpt['ema_state_dict'] = dict(raw, steps=torch.tensor(8))
    torch.save(ckpt, path)
    return ckpt


def test_both_sets_carried_over_or_one_alone(tmp_path, baseline_run, run_tool):
    src = str(tmp_path / 'source.pth')
    ckpt = ema_checkpoint(baseline_run, src)
    ema = mmdet_to_ours(ckpt['state_dict'])
    raw = mmdet_to_ours({k[7:]: v for k, v in ckpt['ema_state_dict'].items()
                         if k.startswith('module.')})

    out = run_tool([CONVERTER, src, str(tmp_path / 'both.pth')]).stdout
    assert 'EMA and raw weights' in out
    both = torch.load(str(tmp_path / 'both.pth'))
    assert both['state_dict'].keys() == ema.keys()
    assert all(torch.equal(both['state_dict'][k], v) for k, v in ema.items())
    assert both['ema_state_dict'].keys() == {'steps', *(f'module.{k}' for k in raw)}
    assert all(torch.equal(both['ema_state_dict'][f'module.{k}'], v) for k, v in raw.items())

    for weights, expected in (('ema', ema), ('raw', raw)):
        run_tool([CONVERTER, src, str(tmp_path / f'{weights}.pth'), '--weights', weights])
        one = torch.load(str(tmp_path / f'{weights}.pth'))
        assert 'ema_state_dict' not in one
        assert all(torch.equal(one['state_dict'][k], v) for k, v in expected.items())


def test_ema_option_without_ema_weights_is_refused(tmp_path, baseline_run, run_tool):
    src = osp.join(baseline_run, 'iter_8.pth')
    proc = run_tool([CONVERTER, src, str(tmp_path / 'out.pth'), '--weights', 'ema'],
                    check=False)
    assert proc.returncode != 0
    assert f"weights='ema': {src} holds no EMA weights" in proc.stderr, proc.stderr
    assert not osp.exists(tmp_path / 'out.pth')
