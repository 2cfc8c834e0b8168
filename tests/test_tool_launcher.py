"""The tests' tool launcher (tests/tool_launcher.py) runs a script as ``python SCRIPT``
does: the same output, exit status, ``sys.argv``, ``sys.path``, ``__file__``, working
folder and environment, and the libraries' import-time output."""
import os
import subprocess
import sys

import pytest
from tool_launcher import ToolLauncher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import json, os, sys, warnings
if __name__ != '__main__':
    raise SystemExit('not run as __main__')
import mmdet.models  # preloaded by the launcher: the same module either way
what = sys.argv[1]
print(json.dumps(dict(argv=sys.argv, path0=sys.path[0], file=__file__, cwd=os.getcwd(),
                      var=os.environ.get('LAUNCHER_TEST_VAR'),
                      extra=[p for p in sys.path if p.endswith('extra_folder')])))
print('to stderr', file=sys.stderr)
if what == 'raise':
    raise ValueError('broken on purpose')
if what == 'exit-text':
    sys.exit('a message')
if what == 'exit-3':
    sys.exit(3)
if what == 'kill':
    os.kill(os.getpid(), 9)
'''


@pytest.fixture(scope='module')
def launcher():
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('PYTHONPATH', None)
    launcher = ToolLauncher(env, ROOT)
    yield launcher
    launcher.close()


@pytest.mark.parametrize('what', ['ok', 'raise', 'exit-text', 'exit-3', 'kill'])
def test_a_run_is_what_python_gives(launcher, tmp_path, what):
    script = tmp_path / 'script.py'
    script.write_text(SCRIPT)
    extra = tmp_path / 'extra_folder'
    extra.mkdir()
    env = dict(launcher.env, LAUNCHER_TEST_VAR='set', PYTHONPATH=str(extra))
    args = [os.path.relpath(script, ROOT), what, '--flag']  # as the tests give tools
    assert launcher.serves(args, env)
    forked = launcher.run(args, env, timeout=120)
    fresh = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert forked.returncode == fresh.returncode
    assert forked.stdout == fresh.stdout
    # the tracebacks differ in the frames above the script's (runpy's), nothing else
    assert forked.stderr.splitlines()[-2:] == fresh.stderr.splitlines()[-2:]
    assert ('Traceback' in forked.stderr) == ('Traceback' in fresh.stderr)
    assert 'to stderr' in forked.stderr


def test_runs_that_set_import_time_variables_get_a_fresh_python(launcher):
    assert not launcher.serves(['tools/train.py'], dict(launcher.env, OMP_NUM_THREADS='2'))
    assert not launcher.serves(['tools/train.py'], dict(launcher.env, ATEN_CPU_CAPABILITY='avx2'))
    assert not launcher.serves(['bash', 'tools/dist_train.sh'], launcher.env)
    assert launcher.serves(['tools/train.py'], dict(launcher.env, PORT='1234'))


def test_a_hung_run_is_killed_at_the_timeout(launcher, tmp_path):
    script = tmp_path / 'hang.py'
    script.write_text('import time\ntime.sleep(600)\n')
    with pytest.raises(subprocess.TimeoutExpired):
        launcher.run([str(script)], launcher.env, timeout=2)
    # and the launcher goes on serving
    assert launcher.run([str(script).replace('hang', 'none')], launcher.env,
                        timeout=60).returncode == 2
