"""Load checkpoints under torch>=2.6's ``weights_only=True`` default.

Since torch 2.6, ``torch.load`` unpickles only tensors, containers, primitives and the
globals allow-listed with ``torch.serialization.add_safe_globals``. A checkpoint that
MMEngine 0.10's Runner saves holds a few more (found by saving one through the Runner
and listing ``torch.serialization.get_unsafe_globals_in_checkpoint``):

- ``message_hub.log_scalars``: ``mmengine.logging.HistoryBuffer`` objects, whose state
  holds numpy arrays (``numpy.ndarray``, ``numpy.dtype`` and its numeric classes such
  as ``numpy.dtypes.Float64DType``, ``_reconstruct``) and its statistics methods,
  pickled as ``getattr(HistoryBuffer, 'mean')``;
- ``message_hub.runtime_info``: numpy scalars (``eta``, ``best_score``...).

mmdet's checkpoints are MMEngine checkpoints. The official Deformable-DETR release
(``tools/model_converters/official_to_ours.py``) adds one type: its ``args`` entry, an
``argparse.Namespace`` of plain values.

:func:`allow_mmengine_checkpoints` allow-lists exactly these; ``builtins.getattr`` is
bound to a function that resolves methods of ``HistoryBuffer`` and nothing else. The
``weights_only`` safety stays on: a checkpoint holding any other object is refused with
an ``UnpicklingError`` that names the objects and says what to do. Nothing is installed
on import: ``tools/train.py``, ``tools/test.py`` and the other tools that load
checkpoints call it, and so must a script that loads one of our checkpoints through
MMEngine (``init_detector``, ``DetInferencer``); calling it again is harmless.

A file that is no checkpoint at all (truncated by a crash, empty, a text or an image)
is refused with one :class:`CheckpointError` that names it, for ``--resume``,
``load_from``, ``tools/test.py`` and the converters alike.
"""
import argparse
import os.path as osp
import pickle
import zipfile
from typing import Any, Callable, List, Optional, Tuple, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

_reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy(._core).multiarray._reconstruct
_scalar = np.float64(0).__reduce__()[0]  # numpy(._core).multiarray.scalar
_STATISTICS = ('min', 'max', 'current', 'mean')  # HistoryBuffer's built-in statistics
# Unpickling ``np.dtype('f8')`` builds an instance of numpy.dtypes.Float64DType: allow the
# numeric (plain data) dtypes; object, string and structured dtypes stay refused.
_NUMERIC_DTYPES = ('bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32',
                   'uint64', 'float16', 'float32', 'float64')


def _history_buffer_attr(owner: Any, name: str) -> Callable:
    """Stands in for ``builtins.getattr`` while unpickling: HistoryBuffer methods only."""
    if owner is not HistoryBuffer or name not in _STATISTICS:
        raise pickle.UnpicklingError(
            f'refused getattr({owner!r}, {name!r}): the allow-list of MMEngine checkpoints '
            'permits getattr only for the statistics methods of HistoryBuffer')
    return getattr(HistoryBuffer, name)


def safe_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """The globals our checkpoints hold besides what torch allows by default.

    Those of MMEngine's (and so mmdet's) checkpoints and the official release's
    ``argparse.Namespace``.
    """
    entries: List[Union[Callable, Tuple[Callable, str]]] = [
        HistoryBuffer, np.ndarray, np.dtype, (_history_buffer_attr, 'builtins.getattr'),
        argparse.Namespace]
    entries += [type(np.dtype(name)) for name in _NUMERIC_DTYPES]
    # numpy 2 pickles as numpy._core.multiarray, numpy 1 as numpy.core.multiarray.
    for module in ('numpy._core.multiarray', 'numpy.core.multiarray'):
        entries += [(_reconstruct, f'{module}._reconstruct'), (_scalar, f'{module}.scalar')]
    return entries


# torch < 1.6 saved checkpoints as pickles that start with this magic number.
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


class CheckpointError(RuntimeError):
    """A file that is not a readable checkpoint: empty, cut short, damaged, or not one."""


def checkpoint_problem(filename: str) -> Optional[str]:
    """Why a file is not a checkpoint that ``torch.load`` can read, or None if it looks
    like one (a complete zip archive with a ``data.pkl``, or a torch < 1.6 pickle)."""
    size = osp.getsize(filename)
    if size == 0:
        return 'the file is empty'
    with open(filename, 'rb') as f:
        head = f.read(len(_LEGACY_MAGIC))
    if zipfile.is_zipfile(filename):
        try:
            with zipfile.ZipFile(filename) as archive:
                names, damaged = archive.namelist(), archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            return f'a damaged zip archive ({err})'
        if damaged is not None:
            return f'a damaged zip archive: its member {damaged} fails its CRC check'
        if not any(name.rsplit('/', 1)[-1] == 'data.pkl' for name in names):
            return 'a zip archive, but not one that torch.save wrote (it has no data.pkl)'
        return None
    if head.startswith(b'PK\x03\x04'):
        return (f'a zip archive cut short ({size} bytes, and no end of central directory): '
                'a save or copy that did not finish')
    if head == _LEGACY_MAGIC:  # what torch < 1.6 saved: torch's messages are clear
        return None
    if head.startswith(b'\x80'):
        return 'a pickle file, but not one that torch.save wrote'
    return f'not a torch checkpoint: it starts with the bytes {head[:4]!r}'


def load_local_checkpoint(filename: str, map_location: Any = None) -> Any:
    """MMEngine's local-file loader, with errors that name the file and say what to do.

    The checkpoint converters load their input with it too.

    Args:
        filename: Path of the checkpoint.
        map_location: ``torch.load``'s ``map_location``.

    Returns:
        What the file holds.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: a directory.
        CheckpointError: the file is empty, cut short, damaged or not a checkpoint.
        pickle.UnpicklingError: the file holds types outside the allow-list.
    """
    filename = osp.expanduser(filename)
    if osp.isdir(filename):
        raise IsADirectoryError(f'{filename} is a directory, not a checkpoint file')
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    try:
        return torch.load(filename, map_location=map_location)
    except Exception as err:
        problem = checkpoint_problem(filename)
        if problem is not None:
            # One error, not torch's and pickle's chained under it.
            raise CheckpointError(
                f'{filename} is not a readable checkpoint: {problem}. Use a complete '
                'checkpoint (a run\'s previous one, or download it again).') from None
        if not isinstance(err, pickle.UnpicklingError):
            raise
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(filename)
        except Exception:  # a legacy (non-zip) checkpoint: leave it to torch's message
            unsafe = []
        listed = f' It holds {", ".join(sorted(unsafe))}.' if unsafe else ''
        raise pickle.UnpicklingError(
            f'Refused to load {filename}: it holds objects that are neither tensors nor '
            'the types of MMEngine or official Deformable-DETR checkpoints (allow-listed by '
            f'projects.deformable_detr.checkpoint.safe_load), and unpickling them could run '
            f'code.{listed} Inspect it with torch.serialization.'
            'get_unsafe_globals_in_checkpoint(path). If you trust its source, allow those '
            'types with torch.serialization.add_safe_globals([...]) before loading, or '
            'save its weights alone: torch.save(ckpt["state_dict"], path).\n'
            f'torch says: {err}') from err


def allow_mmengine_checkpoints() -> None:
    """Allow-lists the types of our checkpoints and installs the local loader.

    The checkpoint safety of this package: the tools call it before anything loads a
    checkpoint. Idempotent: torch keeps the allow-list in a set, and the loader
    replaces MMEngine's ``''`` (local path) scheme by the same function each time.
    """
    torch.serialization.add_safe_globals(safe_globals())
    CheckpointLoader.register_scheme(prefixes='', loader=load_local_checkpoint, force=True)
