"""Reading a data set's files with one error that names the file and says what is wrong.

A run reads an annotation file and an image folder before it reads any image. When one of
them is missing, unreadable, empty or not what it should be, the run stops at once with a
:class:`DatasetError` that names it, rather than later, inside a library, with a message
that names nothing (``JSONDecodeError: Unterminated string``, ``need at least one array to
concatenate``). The problems of single images and annotations are not errors: the data
set skips them and reports them (:mod:`.data_check`).
"""
import json
import os
import os.path as osp
from typing import Optional

from mmengine.fileio import get_local_path

from ..utils.input_file import read_input_file


class DatasetError(ValueError):
    """A data set that cannot be used as it is; the message names the file and the fault."""


def _is_local(path: str, backend_args: Optional[dict]) -> bool:
    return (backend_args or {}).get('backend', 'local') == 'local' and '://' not in path


def _json_problem(err: json.JSONDecodeError, data: bytes) -> str:
    """What a JSON error means for a whole file: cut short, or malformed at a place."""
    where = f'line {err.lineno} column {err.colno}'
    # an unterminated string runs to the end of the data (a raw newline would have ended it
    # with another error), and the other errors at the very end mean the text stops early
    if err.msg.startswith('Unterminated string') or err.pos >= len(data.rstrip()):
        return (f'it ends before its JSON does ({len(data)} bytes; {err.msg} at {where}): '
                'the file is cut short, as by a copy or download that did not finish')
    return f'it is not valid JSON: {err.msg} at {where}'


def load_annotation_file(ann_file: str, backend_args: Optional[dict] = None) -> dict:
    """Reads a COCO annotation file and checks its shape.

    Args:
        ann_file: The annotation file's path (or URI of a file backend).
        backend_args: Arguments of the file backend.

    Returns:
        The file's content: a dict with the lists ``images`` and ``categories`` (and
        ``annotations``, if it has them).

    Raises:
        DatasetError: the file does not exist, cannot be read, is empty, is not JSON (or
            is cut short), or is not a COCO annotation file.
    """
    name = f'annotation file {ann_file}'
    local = _is_local(ann_file, backend_args)
    try:
        with get_local_path(ann_file, backend_args=backend_args) as local_path:
            data = read_input_file(name, local_path, DatasetError, local)
    except OSError as err:  # fetching a remote file
        raise DatasetError(f'{name} cannot be read: {err.strerror or err}') from None
    try:
        raw = json.loads(data)
    except UnicodeDecodeError:
        raise DatasetError(f'{name} is not a JSON text file: its bytes are not UTF-8 '
                           f'(it starts with {data[:8]!r})') from None
    except json.JSONDecodeError as err:
        raise DatasetError(f'{name}: {_json_problem(err, data)}') from None
    if not isinstance(raw, dict):
        raise DatasetError(f'{name} is not a COCO annotation file: it holds a JSON '
                           f'{type(raw).__name__}, not an object with "images", '
                           '"annotations" and "categories"')
    wrong = [key for key in ('images', 'categories') if not isinstance(raw.get(key), list)]
    if not isinstance(raw.get('annotations', []), list):
        wrong.append('annotations')
    if wrong:
        found = ', '.join(f'"{key}"' for key in raw) or 'none'
        raise DatasetError(f'{name} is not a COCO annotation file: it needs the lists '
                           f'"images", "categories" (and "annotations"); '
                           f'{", ".join(repr(key) for key in wrong)} missing or not a list '
                           f'(its keys: {found})')
    return raw


def check_image_folder(img_dir: str, ann_file: str, num_images: int) -> None:
    """Checks that a local image folder exists, can be listed and holds files.

    Args:
        img_dir: The folder that the annotation file's ``file_name`` entries are under
            ('' or a URI: not checked).
        ann_file: The annotation file (named in the error).
        num_images: How many images the annotation file lists.

    Raises:
        DatasetError: the folder is missing, not a folder, unreadable, or empty while the
            annotation file lists images.
    """
    if not img_dir or '://' in img_dir:
        return
    name = f'image folder {img_dir} (of {ann_file})'
    bare = img_dir.rstrip('/' + os.sep) or img_dir  # 'file/' does not exist, 'file' does
    if not osp.exists(bare):
        raise DatasetError(f'{name} does not exist')
    if not osp.isdir(bare):
        raise DatasetError(f'{name} is not a folder')
    try:
        with os.scandir(img_dir) as entries:
            empty = next(entries, None) is None
    except OSError as err:
        raise DatasetError(f'{name} cannot be read: {err.strerror or err}') from None
    if empty and num_images:
        raise DatasetError(f'{name} is empty, and the annotation file lists {num_images} '
                           'images')
