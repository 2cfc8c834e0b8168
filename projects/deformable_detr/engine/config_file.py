"""Loading a tool's CONFIG argument with one error that names the file and its fault.

MMEngine's ``Config.fromfile`` says "does not exist" of a directory, loads an empty file
into an empty config (the run then fails deep in the Runner on a missing key), and lets
the errors of the config's own code through without the file's name. :func:`load_config`
checks the file first and names it in every error.
"""
import os.path as osp
from typing import Optional, Sequence

from mmengine.config import Config

from ..utils.input_file import read_input_file

SUFFIXES = ('.py', '.json', '.yaml', '.yml')  # what Config.fromfile reads
# What each tool builds its run from.
TRAIN_KEYS = ('model', 'train_dataloader', 'train_cfg', 'optim_wrapper')
TEST_KEYS = ('model', 'test_dataloader', 'test_evaluator', 'test_cfg')


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the fault."""


def load_config(path: str, cfg_options: Optional[dict] = None,
                needs: Sequence[str] = ()) -> Config:
    """``Config.fromfile(path)``, merged with ``cfg_options``, with errors that name it.

    Args:
        path: The config file.
        cfg_options: ``--cfg-options`` to merge into it.
        needs: Top-level keys the caller builds from (:data:`TRAIN_KEYS`,
            :data:`TEST_KEYS`): a config without one of them is refused.

    Returns:
        The config.

    Raises:
        ConfigError: the file does not exist, is a directory, has a suffix that MMEngine
            does not read, cannot be read, is empty, fails to load (its syntax, its code,
            its ``_base_`` files, its ``custom_imports``) or lacks a key of ``needs``.
    """
    name = f'config file {path}'
    if osp.isfile(path) and not path.endswith(SUFFIXES):
        raise ConfigError(f'{name}: a config is a {", ".join(SUFFIXES)} file')
    read_input_file(name, path, ConfigError)
    try:
        cfg = Config.fromfile(path)
    except ImportError as err:
        # the traceback of the failed import is what tells how to fix it: keep it
        raise ConfigError(f'{name}: an import failed while it loaded: '
                          f'{type(err).__name__}: {err}') from err
    except Exception as err:  # its syntax, its code, a missing _base_ file...
        raise ConfigError(f'{name} fails to load: {type(err).__name__}: {err}') from None
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    missing = [key for key in needs if cfg.get(key) is None]
    if missing:
        defined = ', '.join(sorted(cfg.keys())) or 'nothing'
        raise ConfigError(f'{name} defines no {", ".join(missing)} (it defines: {defined})')
    return cfg
