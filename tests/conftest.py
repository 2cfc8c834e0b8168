"""Fixtures of every test: running a tool's command line as a user would."""
import os
import subprocess
import sys
from typing import Callable, Dict, Optional, Sequence

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL_TIMEOUT = 240  # seconds: the longest tool run of the tests takes well under a minute


def _run_tool(args: Sequence[str], env: Optional[Dict[str, str]] = None, check: bool = True,
              pythonpath: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Runs a tool in a subprocess from the repository root, niced, on one thread.

    Args:
        args: The command line: ``['tools/train.py', ...]`` (run with this Python) or
            ``['bash', 'tools/dist_train.sh', ...]``.
        env: Variables to set besides the current environment.
        check: Raise an AssertionError with the output's tail if the tool fails.
        pythonpath: Folders to import from besides the repository root.

    Returns:
        The finished process, its output captured as text.
    """
    full_env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
                    PYTHONFAULTHANDLER='1',
                    PYTHONPATH=os.pathsep.join([*pythonpath, ROOT,
                                                os.environ.get('PYTHONPATH', '')]))
    full_env.setdefault('PYTHON', sys.executable)  # the interpreter the .sh launchers run
    full_env.update(env or {})
    cmd = ['nice', '-n', '5'] + ([sys.executable] if args[0].endswith('.py') else []) + list(args)
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f'{" ".join(args)} exited with {proc.returncode}:\n'
                             f'{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}')
    return proc


@pytest.fixture(scope='session')
def run_tool() -> Callable[..., subprocess.CompletedProcess]:
    """Runs a tool's command line in a subprocess: see :func:`_run_tool`."""
    return _run_tool


@pytest.fixture
def one_thread():
    """Runs a test on one intra-op thread, then restores the setting.

    The tensors here are tiny: a second thread only adds synchronisation, and on a
    busy 2-core machine OpenMP threads waiting for each other cost ~10x the work.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
