"""Fixtures of every test: running a tool's command line as a user would."""
import atexit
import os
import subprocess
import sys
from typing import Callable, Dict, Optional, Sequence

import pytest
import torch
from model_fixtures import (build_demo_model, build_pair, config_path,  # noqa: F401
                            make_batch, small_model_cfg)
from tool_launcher import ToolLauncher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# seconds: a guard against a hung tool, not a speed check. The longest tool run, an ONNX
# export, takes minutes on a loaded 2-core machine (240 s was once not enough).
TOOL_TIMEOUT = 600

if os.environ.get('PYTEST_XDIST_WORKER'):
    # `make test` runs one worker per core (pytest -n): each worker on one intra-op
    # thread, so that the workers do not oversubscribe the cores (TEST_THREADS overrides).
    torch.set_num_threads(int(os.environ.get('TEST_THREADS', '1')))


_launcher: Optional[ToolLauncher] = None


def _tool_env() -> Dict[str, str]:
    """The environment of every tool run, before a test's own variables."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONFAULTHANDLER='1')
    env.setdefault('PYTHON', sys.executable)  # the interpreter the .sh launchers run
    return env


def _full_tool_env(pythonpath: Sequence[str] = (), env: Optional[Dict[str, str]] = None
                   ) -> Dict[str, str]:
    """:func:`_tool_env` with ``pythonpath`` and the repository root importable, then
    ``env``."""
    full_env = dict(_tool_env(), PYTHONPATH=os.pathsep.join(
        [*pythonpath, ROOT, os.environ.get('PYTHONPATH', '')]))
    full_env.update(env or {})
    return full_env


def _tool_launcher() -> Optional[ToolLauncher]:
    """This process's launcher of Python tools (see tests/tool_launcher.py), started on
    first use; None when ``TEST_TOOL_LAUNCHER=subprocess``."""
    global _launcher
    if os.environ.get('TEST_TOOL_LAUNCHER', 'fork') == 'subprocess':
        return None
    if _launcher is None:
        env = _tool_env()
        env.pop('PYTHONPATH', None)  # the libraries it imports come from site-packages
        _launcher = ToolLauncher(env, ROOT, niceness=5)
        atexit.register(_launcher.close)
    return _launcher


def _run_tool(args: Sequence[str], env: Optional[Dict[str, str]] = None, check: bool = True,
              pythonpath: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Runs a tool from the repository root, niced, on one thread, as ``python TOOL ...``
    (a fresh process, or a child of the launcher: see tests/tool_launcher.py) or as
    ``bash TOOL.sh ...``.

    Args:
        args: The command line: ``['tools/train.py', ...]`` (run with this Python) or
            ``['bash', 'tools/dist_train.sh', ...]``.
        env: Variables to set besides the current environment.
        check: Raise an AssertionError with the output's tail if the tool fails.
        pythonpath: Folders to import from besides the repository root.

    Returns:
        The finished process, its output captured as text.
    """
    full_env = _full_tool_env(pythonpath, env)
    launcher = _tool_launcher()
    if launcher is not None and launcher.serves(args, full_env):
        proc = launcher.run(args, full_env, timeout=TOOL_TIMEOUT)
    else:
        cmd = ['nice', '-n', '5'] + ([sys.executable] if args[0].endswith('.py') else []) \
            + list(args)
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                              timeout=TOOL_TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f'{" ".join(args)} exited with {proc.returncode}:\n'
                             f'{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}')
    return proc


@pytest.fixture(scope='session')
def tool_env() -> Callable[..., Dict[str, str]]:
    """``tool_env(pythonpath=(), env=None)``: the environment ``run_tool`` runs a tool in
    (for tests that start one themselves)."""
    return _full_tool_env


@pytest.fixture(scope='session')
def run_tool() -> Callable[..., subprocess.CompletedProcess]:
    """Runs a tool's command line in a subprocess: see :func:`_run_tool`."""
    return _run_tool


def _assert_same_detections(boxes, scores, labels, expected_boxes, expected_scores,
                            expected_labels, score_tol: float, box_tol: float) -> None:
    """Two sets of detections of one image are the same, matched one to one.

    Detections sorted by score swap places where two scores are nearly tied, so they are
    not compared position by position: a minimum-cost one-to-one matching (Hungarian, on
    the box difference) pairs each detection with one of the other set, and every pair
    must have the same label, scores within ``score_tol`` and boxes within ``box_tol``.

    Args:
        boxes, scores, labels: The detections (array-likes: (n, 4), (n,), (n,)).
        expected_boxes, expected_scores, expected_labels: The reference detections.
        score_tol: The largest score difference of a pair.
        box_tol: The largest box coordinate difference of a pair, in pixels.
    """
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    boxes, scores, labels, expected_boxes, expected_scores, expected_labels = (
        np.asarray(a, dtype=np.float64) for a in (boxes, scores, labels, expected_boxes,
                                                  expected_scores, expected_labels))
    assert len(scores) == len(expected_scores), (len(scores), len(expected_scores))
    box_diff = np.abs(boxes[:, None] - expected_boxes[None]).max(-1)
    score_diff = np.abs(scores[:, None] - expected_scores[None])
    fits = (labels[:, None] == expected_labels[None]) & (score_diff <= score_tol) \
        & (box_diff <= box_tol)
    # pairs that do not fit cost more than any matching of fitting pairs: the matching
    # found has a pair that does not fit only if no complete matching of fitting pairs
    # exists
    penalty = 1 + len(scores) * (box_tol + score_tol)
    cost = np.where(fits, box_diff + score_diff, penalty)
    rows, cols = linear_sum_assignment(cost)
    bad = [(int(i), int(j)) for i, j in zip(rows, cols) if not fits[i, j]]
    assert not bad, (
        f'{len(bad)} of {len(scores)} detections have no counterpart; the first, '
        f'{bad[0][0]} (label {labels[bad[0][0]]:g}, score {scores[bad[0][0]]:.6f}, box '
        f'{boxes[bad[0][0]]}), is closest to {bad[0][1]} (label '
        f'{expected_labels[bad[0][1]]:g}, score {expected_scores[bad[0][1]]:.6f}, box '
        f'{expected_boxes[bad[0][1]]})')


@pytest.fixture(scope='session')
def assert_same_detections() -> Callable[..., None]:
    """Checks two sets of detections, matched one to one: see
    :func:`_assert_same_detections`."""
    return _assert_same_detections


@pytest.fixture
def one_thread():
    """Runs a test on one intra-op thread, then restores the setting.

    The tensors here are tiny: a second thread only adds synchronisation, and on a
    busy 2-core machine OpenMP threads waiting for each other cost ~10x the work.
    ``TEST_THREADS`` sets another count (``make test-numerics`` runs 1 and 2).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get('TEST_THREADS', '1')))
    yield
    torch.set_num_threads(threads)
