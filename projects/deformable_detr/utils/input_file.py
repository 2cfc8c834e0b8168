"""Reading an input file with one error that names it and says what is wrong."""
import os.path as osp
from typing import Type


def read_input_file(name: str, path: str, error: Type[Exception], local: bool = True) -> bytes:
    """The bytes of ``path``, or ``error`` naming the file when it cannot be used.

    Args:
        name: What the file is, for the message (``'config file x.py'``).
        path: The file to read.
        error: The exception class to raise.
        local: ``path`` is the user's own path (checked for being missing or a directory);
            False for a local copy of a remote file, where only reading can fail.

    Raises:
        error: the file is missing, a directory, unreadable or empty.
    """
    if local:
        if not osp.exists(path):
            raise error(f'{name} does not exist')
        if osp.isdir(path):
            raise error(f'{name} is a directory, not a file')
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as err:
        raise error(f'{name} cannot be read: {err.strerror or err}') from None
    if not data.strip():
        raise error(f'{name} is empty ({len(data)} bytes)')
    return data
