"""Runs Python tools as a user would, without paying their imports on every run.

Starting a tool costs ~3 s of CPU before its first line runs: importing torch, MMEngine,
mmcv's ops and MMDetection's models. The suite starts about a hundred tools, so that is
a fifth of its time. A launcher process imports those libraries once (third-party
libraries only: never this project, whose import is part of what a tool run tests) and
then forks one child per tool run. The child takes the run's working folder,
environment, ``sys.argv`` and ``sys.path`` (as ``python tool.py ...`` would set them),
writes to its own output files and runs the script as ``__main__``; its exit status is
the tool's, as ``python`` would give it (an uncaught exception: the traceback and 1).

What a fresh interpreter would print while importing those libraries (warnings) is
recorded at the launcher's start and written again at the start of every child's output,
so that a test of a tool's output sees what a user would see.

Runs whose environment differs from the launcher's in a variable the libraries read at
import (thread counts, instruction sets, allocators, ...) get a fresh interpreter
instead, as do ``.sh`` launchers; ``TEST_TOOL_LAUNCHER=subprocess`` gives every run one.

    python tests/tool_launcher.py FD   # the launcher: requests on stdin, replies on fd FD
"""
import builtins
import importlib
import importlib.machinery
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import types
from typing import Dict, List, Sequence

# Imported by the launcher, in this order (what the tools import before their first line).
PRELOAD = ('numpy', 'torch', 'scipy.optimize', 'mmengine.runner', 'mmcv.ops', 'mmdet.models',
           'mmdet.datasets', 'mmdet.evaluation', 'mmdet.visualization', 'pycocotools.coco')
# Environment variables that a library may read while it is imported: a run that sets
# one of them differently from the launcher gets a fresh interpreter.
IMPORT_TIME_PREFIXES = ('OMP_', 'MKL_', 'KMP_', 'GOMP_', 'ATEN_', 'ONEDNN_', 'DNNL_', 'TORCH',
                        'PYTORCH', 'CUDA', 'NVIDIA', 'LD_', 'MALLOC_', 'OPENBLAS',
                        'PYTHONHASHSEED', 'PYTHONWARNINGS', 'PYTHONDONTWRITEBYTECODE',
                        'PYTHONUTF8', 'PYTHONIOENCODING', 'MPLBACKEND', 'OPENCV')


def _import_time_env(env: Dict[str, str]) -> Dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)}


# ----------------------------------------------------------------------------------
# The launcher process
# ----------------------------------------------------------------------------------


def _child(request: dict, preload_out: bytes, preload_err: bytes, base_path: List[str]) -> None:
    """In the forked child: becomes ``python SCRIPT ARGS...`` and never returns."""
    code = 1
    try:
        os.chdir(request['cwd'])
        os.environ.clear()
        os.environ.update(request['env'])
        for fd, path, mode in ((0, os.devnull, os.O_RDONLY),
                               (1, request['stdout'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                               (2, request['stderr'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            new = os.open(path, mode, 0o644)
            os.dup2(new, fd)
            os.close(new)
        sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as python sets it up
        os.write(1, preload_out)
        os.write(2, preload_err)
        script = request['argv'][0]
        if not os.path.isfile(script):
            print(f"{sys.executable}: can't open file {os.path.abspath(script)!r}: "
                  '[Errno 2] No such file or directory', file=sys.stderr)
            code = 2
            return
        pythonpath = [p for p in request['env'].get('PYTHONPATH', '').split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(os.path.realpath(script)),
                       *pythonpath, *base_path]
        sys.argv[:] = list(request['argv'])
        # the script as the module __main__, with the attributes python gives it
        path = os.path.join(os.getcwd(), script)
        main = types.ModuleType('__main__')
        main.__file__, main.__cached__, main.__builtins__ = path, None, builtins
        main.__loader__ = importlib.machinery.SourceFileLoader('__main__', path)
        sys.modules['__main__'] = main
        try:
            with open(path, 'rb') as f:
                exec(compile(f.read(), path, 'exec'), main.__dict__)
            code = 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:  # sys.exit('message'): python prints it and exits with 1
                print(exit_.code, file=sys.stderr)
                code = 1
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        # what the interpreter does at its end: non-daemon threads, atexit, flushing
        import atexit
        import threading
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code if 0 <= code < 256 else 1)


def _serve(reply_fd: int) -> None:
    """Imports :data:`PRELOAD`, then forks a child per request line read on stdin and
    writes ``{"pid": ...}`` and, when it ends, ``{"status": ...}`` on ``reply_fd``."""
    replies = os.fdopen(reply_fd, 'w', buffering=1)
    # What the imports print goes to two files, replayed by every child.
    captured = {}
    for fd in (1, 2):
        captured[fd] = tempfile.TemporaryFile()
        os.dup2(captured[fd].fileno(), fd)
    for name in PRELOAD:
        importlib.import_module(name)
    sys.stdout.flush()
    sys.stderr.flush()
    preload = {}
    for fd in (1, 2):
        captured[fd].seek(0)
        preload[fd] = captured[fd].read()
    # the launcher's sys.path less its own folder and PYTHONPATH: the children's base
    own = {os.path.dirname(os.path.abspath(__file__)),
           *(os.path.abspath(p) for p in os.environ.get('PYTHONPATH', '').split(os.pathsep)
             if p)}
    base_path = [p for p in sys.path if p and os.path.abspath(p) not in own]
    replies.write(json.dumps(dict(ready=True)) + '\n')
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            replies.close()
            _child(request, preload[1], preload[2], base_path)
        replies.write(json.dumps(dict(pid=pid)) + '\n')
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps(dict(status=os.waitstatus_to_exitcode(status))) + '\n')


# ----------------------------------------------------------------------------------
# The tests' side
# ----------------------------------------------------------------------------------


class ToolLauncher:
    """A launcher process started with ``env`` (the environment of the runs it serves),
    niced by ``niceness``, in folder ``cwd``."""

    def __init__(self, env: Dict[str, str], cwd: str, niceness: int = 5):
        self.env, self.cwd = dict(env), cwd
        read_fd, write_fd = os.pipe()
        self._proc = subprocess.Popen(
            ['nice', '-n', str(niceness), sys.executable, os.path.abspath(__file__),
             str(write_fd)], cwd=cwd, env=self.env, stdin=subprocess.PIPE, text=True,
            pass_fds=(write_fd, ))
        os.close(write_fd)
        self._replies, self._pending = read_fd, b''
        self._tmp = tempfile.TemporaryDirectory(prefix='tool_launcher_')
        self._runs = 0
        if not self._reply(timeout=300).get('ready'):
            raise RuntimeError('the tool launcher did not start')

    def serves(self, args: Sequence[str], env: Dict[str, str]) -> bool:
        """Whether this launcher runs ``args`` in ``env`` as a fresh interpreter would."""
        return (self._proc.poll() is None and args[0].endswith('.py')
                and _import_time_env(env) == _import_time_env(self.env))

    def _reply(self, timeout: float) -> dict:
        """The launcher's next reply line (raw reads: a buffered reader could hold a
        second line that ``select`` would not see)."""
        deadline = time.monotonic() + timeout
        while b'\n' not in self._pending:
            ready, _, _ = select.select([self._replies], [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError
            chunk = os.read(self._replies, 4096)
            if not chunk:
                raise RuntimeError(f'the tool launcher ended (exit status {self._proc.wait()})')
            self._pending += chunk
        line, self._pending = self._pending.split(b'\n', 1)
        return json.loads(line)

    def run(self, args: Sequence[str], env: Dict[str, str], timeout: float
            ) -> subprocess.CompletedProcess:
        """Runs ``python ARGS...`` (``args[0]`` a script) as :func:`subprocess.run` with
        ``capture_output=True, text=True`` would."""
        self._runs += 1
        out = os.path.join(self._tmp.name, f'{self._runs}.out')
        err = os.path.join(self._tmp.name, f'{self._runs}.err')
        request = dict(argv=list(args), env=env, cwd=self.cwd, stdout=out, stderr=err)
        self._proc.stdin.write(json.dumps(request) + '\n')
        self._proc.stdin.flush()
        pid = self._reply(timeout=60)['pid']
        try:
            status = self._reply(timeout=timeout)['status']
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._reply(timeout=60)
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
        texts = []
        for path in (out, err):
            with open(path, encoding='utf-8', errors='replace') as f:
                texts.append(f.read())
            os.remove(path)
        return subprocess.CompletedProcess([sys.executable, *args], status, *texts)

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
        os.close(self._replies)
        self._tmp.cleanup()


if __name__ == '__main__':
    _serve(int(sys.argv[1]))
