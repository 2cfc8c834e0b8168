"""A tool's CONFIG argument, broken in each way: one error that names the file and the fault."""
import os
import os.path as osp

import pytest

pytest.importorskip('mmdet')

from projects.deformable_detr.engine.config_file import (TEST_KEYS, TRAIN_KEYS,  # noqa: E402
                                                  ConfigError, load_config)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO_CONFIG = osp.join(ROOT, 'configs', 'synthetic',
                       'deformable-detr-refine-twostage_r18_1xb8-synthetic.py')


def _file(tmp_path, name: str, text: str) -> str:
    path = str(tmp_path / name)
    with open(path, 'w') as f:
        f.write(text)
    return path


CASES = {
    # name: (file name, content (None: no such file; 'DIR': a directory), error after the
    # path)
    'missing': ('nothing.py', None, ' does not exist'),
    'directory': ('configs.py', 'DIR', ' is a directory, not a file'),
    'suffix': ('config.txt', 'a = 1\n', ': a config is a .py, .json, .yaml, .yml file'),
    'empty': ('empty.py', '', ' is empty (0 bytes)'),
    'blank': ('blank.py', '\n\n', ' is empty (2 bytes)'),
    'syntax': ('syntax.py', 'model = dict(type="X"\n', ' fails to load: SyntaxError: '),
    'name_error': ('name.py', 'model = dict(depth=depth)\n',
                   " fails to load: NameError: name 'depth' is not defined"),
    'missing_base': ('base.py', "_base_ = './no_such_base.py'\n", ' fails to load: '),
    'json': ('cut.json', '{"model": {"type": ', ' fails to load: '),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_load_config_names_the_file(tmp_path, case):
    name, text, message = CASES[case]
    path = str(tmp_path / name)
    if text == 'DIR':
        os.mkdir(path)
    elif text is not None:
        _file(tmp_path, name, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f'config file {path}{message}'), str(err.value)
    assert err.value.__cause__ is None and (err.value.__context__ is None
                                                or err.value.__suppress_context__), case
    if case == 'missing_base':
        assert 'no_such_base.py' in str(err.value)


def test_a_config_without_what_the_tool_builds(tmp_path):
    path = _file(tmp_path, 'partial.py', 'model = dict(type="X")\ntrain_cfg = dict()\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, needs=TEST_KEYS)
    assert str(err.value) == (f'config file {path} defines no test_dataloader, '
                              'test_evaluator, test_cfg (it defines: model, train_cfg)')
    # --cfg-options are merged before the check, and a complete config loads
    cfg = load_config(path, dict(test_dataloader=dict(a=1), test_evaluator=dict(b=2),
                                 test_cfg=dict(c=3)), needs=TEST_KEYS)
    assert cfg.test_cfg.c == 3 and cfg.model.type == 'X'
    assert load_config(DEMO_CONFIG, needs=TRAIN_KEYS + TEST_KEYS).model.type \
        == 'ddetr.DeformableDETR'


def test_a_failing_custom_import_keeps_its_traceback(tmp_path):
    path = _file(tmp_path, 'imports.py', "custom_imports = dict(imports=['no_such_module_x'], "
                 'allow_failed_imports=False)\nmodel = dict()\n')
    with pytest.raises(ConfigError, match=f'config file {path}: an import failed while it '
                       'loaded: .*no_such_module_x') as err:
        load_config(path)
    assert isinstance(err.value.__cause__, ImportError)


def _assert_one_error(proc, message: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert message in proc.stderr, out[-3000:]
    assert out.count('Traceback') == 1 and 'During handling' not in out, out[-3000:]


def test_the_tools_name_a_broken_config(tmp_path, run_tool):
    missing = str(tmp_path / 'nothing.py')
    _assert_one_error(run_tool(['tools/train.py', missing, '--work-dir', str(tmp_path / 'w')],
                               check=False),
                      f'ConfigError: config file {missing} does not exist')
    empty = _file(tmp_path, 'empty.py', '')
    _assert_one_error(run_tool(['tools/test.py', empty, 'no.pth', '--work-dir',
                                str(tmp_path / 'w')], check=False),
                      f'ConfigError: config file {empty} is empty (0 bytes)')
    # the demo config without its test set: refused before anything is built
    partial = _file(tmp_path, 'partial.py', f'_base_ = {DEMO_CONFIG!r}\n'
                    'test_dataloader = None\n')
    _assert_one_error(run_tool(['tools/test.py', partial, 'no.pth', '--work-dir',
                                str(tmp_path / 'w')], check=False),
                      f'ConfigError: config file {partial} defines no test_dataloader')
    syntax = _file(tmp_path, 'syntax.py', 'model = dict(\n')
    proc = run_tool(['tools/misc/check_dataset.py', syntax], check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f'error: config file {syntax} fails to load: SyntaxError')
