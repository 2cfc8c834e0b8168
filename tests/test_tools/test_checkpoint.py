"""MMEngine checkpoints load under torch>=2.6's weights_only default; nothing else does."""
import io
import os
import os.path as osp
import pickle
import zipfile

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader

from projects.deformable_detr import safe_checkpoint


class RunsCode:
    """Unpickling this would call print: what a malicious checkpoint does with os.system."""

    def __reduce__(self):
        return (print, ('unpickled: code ran',))


class Plain:
    """An innocent but unknown class."""


def _save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


def test_runner_checkpoint_loads_with_weights_only_default(baseline_run):
    path = osp.join(baseline_run, 'iter_8.pth')
    ckpt = torch.load(path)  # weights_only=True is torch's default
    assert set(ckpt) >= {'meta', 'state_dict', 'message_hub', 'optimizer',
                         'param_schedulers'}
    scalars = ckpt['message_hub']['log_scalars']
    assert isinstance(scalars['train/loss'], HistoryBuffer)
    assert np.isfinite(scalars['train/loss'].mean())
    assert isinstance(ckpt['message_hub']['runtime_info']['eta'], np.floating)
    assert 'best_score' in ckpt['message_hub']['runtime_info']  # save_best's
    for name in os.listdir(baseline_run):  # iter_2..8 and the best
        if name.endswith('.pth'):
            full = osp.join(baseline_run, name)
            assert torch.serialization.get_unsafe_globals_in_checkpoint(full) == [], name
    # and through MMEngine, as the Runner's resume and load_from do
    assert CheckpointLoader.load_checkpoint(path, map_location='cpu')['meta']['iter'] == 8


def test_runner_checkpoint_needs_the_allow_list(baseline_run):
    path = osp.join(baseline_run, 'iter_8.pth')
    kept = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path)
    finally:
        torch.serialization.add_safe_globals(kept)


def test_allow_list_is_idempotent():
    count = len(torch.serialization.get_safe_globals())
    safe_checkpoint.allow_mmengine_checkpoints()
    safe_checkpoint.allow_mmengine_checkpoints()
    assert len(torch.serialization.get_safe_globals()) == count
    assert CheckpointLoader._schemes[''] is safe_checkpoint.load_local_checkpoint


@pytest.mark.parametrize('payload, named', [
    (RunsCode(), 'builtins.print'),
    (Plain(), 'Plain'),
    (np.array([1, 'a'], dtype=object), 'ObjectDType'),  # object arrays hold anything
])
def test_foreign_objects_are_refused_with_a_clear_message(tmp_path, capsys, payload, named):
    path = _save({'state_dict': {'w': torch.zeros(2)}, 'extra': payload},
                 tmp_path / 'foreign.pth')
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    with pytest.raises(pickle.UnpicklingError) as err:
        CheckpointLoader.load_checkpoint(path, map_location='cpu')
    message = str(err.value)
    assert f'Refused to load {path}' in message
    assert named in message
    assert 'get_unsafe_globals_in_checkpoint' in message
    assert 'add_safe_globals' in message
    assert 'code ran' not in capsys.readouterr().out


def test_getattr_stand_in_allows_history_buffer_statistics_only(tmp_path):
    class Attr:
        def __init__(self, owner, name):
            self.owner, self.name = owner, name

        def __reduce__(self):
            return (getattr, (self.owner, self.name))

    ok = _save({'f': Attr(HistoryBuffer, 'mean')}, tmp_path / 'ok.pth')
    assert torch.load(ok)['f'] is HistoryBuffer.mean
    for owner, name in ((np.ndarray, 'tofile'), (HistoryBuffer, '__init__'),
                        (HistoryBuffer, 'register_statistics')):
        path = _save({'f': Attr(owner, name)}, tmp_path / f'{name}.pth')
        with pytest.raises(pickle.UnpicklingError, match='refused getattr'):
            torch.load(path)


def test_numpy1_checkpoints_load(tmp_path):
    """numpy 1.x pickled arrays and scalars under ``numpy.core.multiarray``."""
    path = _save({'a': np.arange(3.), 's': np.float32(2.5)}, tmp_path / 'np2.pth')
    old = tmp_path / 'np1.pth'
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, 'w') as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith('data.pkl'):
                assert b'numpy._core.multiarray' in data
                data = data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
            dst.writestr(info, data)
    loaded = torch.load(io.BytesIO(old.read_bytes()))
    np.testing.assert_array_equal(loaded['a'], np.arange(3.))
    assert loaded['s'] == np.float32(2.5) and loaded['s'].dtype == np.float32


def test_mmdet_converter_reads_runner_checkpoints(tmp_path, baseline_run, run_tool):
    """tools/model_converters/mmdet_to_ours.py on what MMEngine's Runner saves for mmdet's
    model (message hub, numpy scalars): the converters share the allow-list."""
    src, dst = osp.join(baseline_run, 'iter_8.pth'), str(tmp_path / 'ours.pth')
    run_tool(['tools/model_converters/mmdet_to_ours.py', src, dst])
    source, converted = torch.load(src), torch.load(dst)
    assert converted['meta']['iter'] == 8 and converted['meta']['converted_from'] == 'mmdet'
    added = set(converted['state_dict']) - set(source['state_dict'])
    assert added and all(k.startswith('neck.') and k.endswith('.conv.bias') for k in added)
    for key, value in source['state_dict'].items():
        assert torch.equal(converted['state_dict'][key], value), key
