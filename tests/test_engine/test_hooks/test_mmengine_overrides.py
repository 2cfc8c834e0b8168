"""MMEngine internals that ExactResumeHook and FineTuneHook rely on: unchanged since checked.

``ExactResumeHook`` overrides two private methods of MMEngine's ``CheckpointHook`` (no
public hook orders a checkpoint's deletion after its successor's write), and
``FineTuneHook`` reads the Runner's ``_resume``. If one of these tests fails, MMEngine
changed what the overrides replace: compare the overrides
(projects/deformable_detr/engine/hooks/exact_resume_hook.py, the marked section) with
MMEngine's new code, then update ``MMENGINE_CHECKED``, requirements/runtime.txt and the
digests below.
"""
import hashlib
import inspect
import os
import re

import mmengine
from mmengine.hooks import CheckpointHook as MMEngineCheckpointHook
from mmengine.runner import Runner

from projects.deformable_detr.engine.hooks.exact_resume_hook import (MMENGINE_CHECKED,
                                                                     ExactResumeHook)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
# sha256 of the source of each MMEngine function, as MMENGINE_CHECKED has it.
CHECKED_SOURCES = {
    # replaced by ExactResumeHook._save_checkpoint_with_step
    'CheckpointHook._save_checkpoint_with_step':
        'cdbc1b54c7c88d9525ab025a9d51a3d3be6e6e36396c0f1151ecf51281fd3482',
    # wrapped by ExactResumeHook._save_best_checkpoint: its file_backend.remove held back
    'CheckpointHook._save_best_checkpoint':
        '8e1e477297ea08d7125b641c662fc44f5023556b72059986b043b4f147e03f26',
    # the callers of the two: when and with what they are called
    'CheckpointHook._save_checkpoint':
        'ec62a0a4f987522f99c63299bc648d92f4674fbfafddd0aeaf74604547eb2c17',
    'CheckpointHook.after_val_epoch':
        '33bfcf2694855d0b26671d4838ddd6027d27d69eb84cf4dc368a38c4a146c2a4',
    # FineTuneHook reads runner._resume, set here
    'Runner.__init__':
        'cad02923a964ffc47143717217d03d0212a0946f9e911e95d2aeaa3836a71c6a',
}
OWNERS = {'CheckpointHook': MMEngineCheckpointHook, 'Runner': Runner}


def _digest(qualname: str) -> str:
    owner, name = qualname.split('.')
    source = inspect.getsource(getattr(OWNERS[owner], name))
    return hashlib.sha256(source.encode()).hexdigest()


def test_the_mmengine_version_checked_is_the_one_pinned():
    with open(os.path.join(ROOT, 'requirements', 'runtime.txt')) as f:
        pinned = re.search(r'^mmengine==(\S+)$', f.read(), re.M)
    assert pinned and pinned[1] == MMENGINE_CHECKED, (
        f'requirements/runtime.txt pins mmengine {pinned and pinned[1]}, the overrides '
        f'were checked against {MMENGINE_CHECKED}')


def test_mmengine_code_the_overrides_replace_is_unchanged():
    changed = [name for name, digest in CHECKED_SOURCES.items() if _digest(name) != digest]
    assert not changed, (
        f'MMEngine {mmengine.__version__} changed {changed} since {MMENGINE_CHECKED}: review '
        'the overrides of ExactResumeHook (and FineTuneHook\'s use of runner._resume) '
        'against the new code, then update MMENGINE_CHECKED and these digests')
    assert 'self._resume = resume' in inspect.getsource(Runner.__init__)


def test_exactly_the_listed_private_methods_are_overridden():
    """A new override of an MMEngine internal must be listed (and guarded) above."""
    private = {name for name in vars(ExactResumeHook)
               if name.startswith('_') and not name.startswith('__')
               and hasattr(MMEngineCheckpointHook, name)}
    assert private == {'_save_checkpoint_with_step', '_save_best_checkpoint'}
