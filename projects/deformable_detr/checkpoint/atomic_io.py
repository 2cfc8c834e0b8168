"""Crash-safe writes: a file is either the old one or the complete new one.

:func:`atomic_write` writes a file so that a process killed at any moment leaves either
the old file or the complete new one; MMEngine's file backend ``ATOMIC_BACKEND``
(``'ddetr_atomic_local'``, registered when this module is imported, as MMEngine's own
backends are) writes local files with it, and ``ddetr.ExactResumeHook``
(:mod:`..engine.hooks.exact_resume_hook`) saves checkpoints through it.
"""
import glob
import os
import os.path as osp
from pathlib import Path
from typing import List, Union

from mmengine.fileio import LocalBackend, register_backend

ATOMIC_BACKEND = 'ddetr_atomic_local'
_PARTIAL = '.partial-'  # .NAME.partial-PID: a file being written by process PID


def atomic_write(path: Union[str, Path], data: bytes) -> None:
    """Writes ``data`` to ``path`` so that a crash at any moment leaves either the
    previous file or the complete new one.

    The bytes go to ``.NAME.partial-PID`` in the same directory, are synced to disk,
    and the file is renamed over ``path`` (atomic on POSIX and Windows); then the
    directory is synced, so that the rename survives a power loss too.

    Args:
        path: The file to write.
        data: Its new contents.
    """
    path = osp.abspath(str(path))
    folder = osp.dirname(path)
    os.makedirs(folder, exist_ok=True)
    partial = osp.join(folder, f'.{osp.basename(path)}{_PARTIAL}{os.getpid()}')
    try:
        with open(partial, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        if osp.exists(partial):
            os.remove(partial)
        raise
    try:
        folder_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a directory can not be opened on Windows
        return
    try:
        os.fsync(folder_fd)
    except OSError:
        pass
    finally:
        os.close(folder_fd)


def remove_stale_partial_files(folder: str) -> List[str]:
    """Removes the partial files that killed processes left in ``folder``.

    Returns:
        The paths removed (those whose writing process no longer runs).
    """
    removed = []
    for path in glob.glob(osp.join(glob.escape(folder), f'.*{_PARTIAL}*')):
        pid = path.rsplit(_PARTIAL, 1)[1]
        if pid.isdigit() and not _running(int(pid)):
            os.remove(path)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it runs, as another user's
        return True
    return True


@register_backend(ATOMIC_BACKEND, force=True)
class AtomicLocalBackend(LocalBackend):
    """MMEngine's local file backend, writing with :func:`atomic_write`."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        atomic_write(filepath, obj)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
        atomic_write(filepath, obj.encode(encoding))


