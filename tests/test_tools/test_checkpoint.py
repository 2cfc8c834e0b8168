"""MMEngine checkpoints load under torch>=2.6's weights_only default; nothing else does."""
import io
import os
import os.path as osp
import pickle
import signal
import time
import zipfile

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader

from projects.deformable_detr import checkpoint as safe_checkpoint

safe_checkpoint.allow_mmengine_checkpoints()  # what the tools do first


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


# --- files that are no checkpoint: one error that names the file --------------------

def _broken_files(folder, good: str) -> dict:
    """Files a user may pass for a checkpoint, by kind."""
    with open(good, 'rb') as f:
        data = f.read()
    kinds = dict(truncated=data[:len(data) // 2], cut_at_end=data[:-100], empty=b'',
                 text=b'epoch_12.pth\n', jpeg=b'\xff\xd8\xff\xe0' + bytes(200),
                 plain_pickle=pickle.dumps({'state_dict': {}}))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, 'w') as z:
        z.writestr('images/0001.jpg', b'not a checkpoint')
    kinds['zip_of_other_files'] = archive.getvalue()
    paths = {}
    for kind, content in kinds.items():
        paths[kind] = str(folder / f'{kind}.pth')
        with open(paths[kind], 'wb') as f:
            f.write(content)
    return paths


def test_broken_files_get_one_error_naming_them(tmp_path, baseline_run):
    for kind, path in _broken_files(tmp_path, osp.join(baseline_run, 'iter_2.pth')).items():
        with pytest.raises(safe_checkpoint.CheckpointError) as err:
            CheckpointLoader.load_checkpoint(path, map_location='cpu')
        message = str(err.value)
        assert message.startswith(f'{path} is not a readable checkpoint: '), (kind, message)
        assert err.value.__cause__ is None and err.value.__suppress_context__, kind
    # a complete checkpoint still loads, and a missing one is named too
    assert CheckpointLoader.load_checkpoint(osp.join(baseline_run, 'iter_2.pth'))
    with pytest.raises(FileNotFoundError, match='nothing.pth'):
        CheckpointLoader.load_checkpoint(str(tmp_path / 'nothing.pth'))
    with pytest.raises(IsADirectoryError, match=f'{tmp_path} is a directory'):
        CheckpointLoader.load_checkpoint(str(tmp_path))


def _assert_one_error(proc, path: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f'CheckpointError: {path} is not a readable checkpoint' in out, out[-3000:]
    assert out.count('Traceback') == 1 and 'During handling' not in out, out[-3000:]


def test_tools_refuse_a_truncated_checkpoint(tmp_path, tiny_setup, baseline_run, run_tool):
    bad = _broken_files(tmp_path, osp.join(baseline_run, 'iter_2.pth'))['truncated']
    train = ['tools/train.py', tiny_setup['config'], '--work-dir', str(tmp_path / 'w')]
    _assert_one_error(run_tool(train + ['--resume', bad], check=False), bad)
    _assert_one_error(run_tool(train + ['--cfg-options', f'load_from={bad}'], check=False), bad)
    _assert_one_error(run_tool(['tools/test.py', tiny_setup['config'], bad, '--work-dir',
                                str(tmp_path / 't')], check=False), bad)
    for converter in ('mmdet_to_ours', 'official_to_ours'):
        proc = run_tool([f'tools/model_converters/{converter}.py', bad,
                         str(tmp_path / 'out.pth')], check=False)
        _assert_one_error(proc, bad)
        assert not osp.exists(tmp_path / 'out.pth')


# --- atomic writes --------------------------------------------------------------------

def test_atomic_write_replaces_whole_files_only(tmp_path):
    path = str(tmp_path / 'ckpt.pth')
    safe_checkpoint.atomic_write(path, b'old')
    safe_checkpoint.atomic_write(path, b'new contents')
    with open(path, 'rb') as f:
        assert f.read() == b'new contents'

    import builtins
    real_open = builtins.open

    def failing_open(file, mode='r', *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if 'w' in mode:
            f.write(b'half')
            f.close()
            raise OSError(28, 'No space left on device')
        return f
    builtins.open = failing_open
    try:
        with pytest.raises(OSError, match='No space'):
            safe_checkpoint.atomic_write(path, b'newer')
    finally:
        builtins.open = real_open
    with open(path, 'rb') as f:
        assert f.read() == b'new contents'  # the previous file, whole
    assert os.listdir(tmp_path) == ['ckpt.pth']  # and no partial file left


def test_stale_partial_files_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f'.iter_4.pth.partial-{dead}'
    mine = tmp_path / f'.iter_6.pth.partial-{os.getpid()}'
    for p in (stale, mine):
        p.write_bytes(b'x')
    assert safe_checkpoint.remove_stale_partial_files(str(tmp_path)) == [str(stale)]
    assert mine.exists() and not stale.exists()


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path, tiny_setup, baseline_run,
                                                            start_tool, run_tool):
    """The process is killed while iter_4.pth is half written, with max_keep_ckpts=1
    (MMEngine's hook deletes iter_2.pth before it writes iter_4.pth)."""
    work_dir = str(tmp_path)
    train = ['tools/train.py', tiny_setup['config'], '--work-dir', work_dir, '--cfg-options',
             'default_hooks.checkpoint.max_keep_ckpts=1']
    proc = start_tool(train, log=str(tmp_path / 'killed.log'), env=dict(STALL_SAVE_AT='4'))
    deadline = time.monotonic() + 180
    while not osp.exists(osp.join(work_dir, 'stalled')) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, open(tmp_path / 'killed.log').read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    partial = [n for n in os.listdir(work_dir) if n.startswith('.iter_4.pth.partial-')]
    assert len(partial) == 1 and os.path.getsize(osp.join(work_dir, partial[0])) > 0
    assert not osp.exists(osp.join(work_dir, 'iter_4.pth'))
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        assert f.read().strip() == osp.join(work_dir, 'iter_2.pth')
    assert torch.load(osp.join(work_dir, 'iter_2.pth'))['meta']['iter'] == 2

    resumed = run_tool(train + ['--resume'])
    assert 'resumed epoch: 0, iter: 2' in resumed.stdout + resumed.stderr
    assert not any('.partial-' in n for n in os.listdir(work_dir))  # cleaned up
    assert sorted(n for n in os.listdir(work_dir) if n.startswith('iter_')) == ['iter_8.pth']
    final = torch.load(osp.join(work_dir, 'iter_8.pth'))
    expected = torch.load(osp.join(baseline_run, 'iter_8.pth'))
    for name, value in expected['state_dict'].items():
        assert torch.equal(final['state_dict'][name], value), name
