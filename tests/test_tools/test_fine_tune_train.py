"""Fine-tuning the demo's model on another class set, with the shipped config.

The demo config trains for one short epoch on a tiny five-shape set (its checkpoint
stands for ``make demo``'s), then the fine-tuning config, shrunk to a few iterations,
starts from it on three new shapes the synthetic generator draws.
"""
import json
import os
import os.path as osp

import pytest
import torch

from projects.deformable_detr.datasets import synthetic as synth

DEMO = 'configs/synthetic/deformable-detr-refine-twostage_r18_1xb8-synthetic.py'
FINETUNE = ('configs/synthetic/'
            'deformable-detr-refine-twostage_r18_1xb8-synthetic-newshapes-finetune.py')
NEW_CLASSES = ('diamond', 'hexagon', 'ring')

# A config on top of a shipped one: tiny data, batch 4, constant lr, a log line per
# iteration, no validation.
TINY = '''
_base_ = {base!r}
load_from = {load_from!r}
data_root = {data!r}
train_dataloader = dict(batch_size=4, dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs={epochs}, val_interval=100)
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=1)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=100, save_best=None))
log_processor = dict(window_size=1)
'''


def _generate(run_tool, out, classes, seed):
    run_tool(['tools/dataset_converters/synthetic_coco.py', '--out', out, '--num-train', '8',
              '--num-val', '2', '--seed', str(seed), '--classes', *classes])


def _config(tmp, name, base, load_from, data, epochs):
    path = osp.join(tmp, name)
    with open(path, 'w') as f:
        f.write(TINY.format(base=osp.abspath(base), load_from=load_from, data=data + '/',
                            epochs=epochs))
    return path


def _losses(work_dir):
    """The training loss of every iteration, from the run's json log."""
    run = next(d for d in sorted(os.listdir(work_dir))
               if osp.isfile(osp.join(work_dir, d, 'vis_data', 'scalars.json')))
    with open(osp.join(work_dir, run, 'vis_data', 'scalars.json')) as f:
        return [line['loss'] for line in map(json.loads, f) if 'loss' in line]


@pytest.fixture(scope='module')
def demo_checkpoint(tmp_path_factory, run_tool):
    """A checkpoint of the demo config (5 shapes) from tools/train.py, as make demo's."""
    tmp = str(tmp_path_factory.mktemp('fine_tune'))
    _generate(run_tool, osp.join(tmp, 'shapes'), synth.CLASSES, seed=0)
    config = _config(tmp, 'demo.py', DEMO, None, osp.join(tmp, 'shapes'), epochs=1)
    run_tool(['tools/train.py', config, '--work-dir', osp.join(tmp, 'demo')])
    return tmp, osp.join(tmp, 'demo', 'epoch_1.pth')


@pytest.fixture(scope='module')
def new_shapes(demo_checkpoint, run_tool):
    """The fine-tuning set: three shapes the demo's set never shows (the command line)."""
    data = osp.join(demo_checkpoint[0], 'newshapes')
    _generate(run_tool, data, NEW_CLASSES, seed=1)
    return data


def test_new_class_set(new_shapes):
    for split, num in (('train', 8), ('val', 2)):
        with open(osp.join(new_shapes, 'annotations', f'{split}.json')) as f:
            coco = json.load(f)
        assert [(c['id'], c['name']) for c in coco['categories']] == [
            (1, 'diamond'), (2, 'hexagon'), (3, 'ring')]
        assert len(coco['images']) == num
        assert {a['category_id'] for a in coco['annotations']} <= {1, 2, 3}
    assert {a['category_id'] for a in coco['annotations']}  # objects in val too
    with pytest.raises(ValueError, match=r'unknown: heart'):
        synth.GenConfig(classes=('circle', 'heart'))
    with pytest.raises(ValueError, match='distinct'):
        synth.GenConfig(classes=('ring', 'ring'))


def test_fine_tune_on_new_classes(demo_checkpoint, new_shapes, tmp_path, run_tool):
    config = _config(str(tmp_path), 'finetune.py', FINETUNE, demo_checkpoint[1], new_shapes,
                     epochs=8)
    proc = run_tool(['tools/train.py', config, '--work-dir', str(tmp_path / 'run')])
    log = proc.stdout + proc.stderr

    # Every class branch named with both shapes; the proposal classifier keeps row 0.
    assert 'FineTuneHook: from 5 classes (circle, square, triangle, cross, star) to 3 ' \
           '(diamond, hexagon, ring)' in log
    for i in range(3):  # the decoder's three layers
        assert (f'bbox_head.cls_branches.{i}.weight: checkpoint (5, 128), model (3, 128): '
                'another class count: not loaded, initialised') in log
        assert (f'bbox_head.cls_branches.{i}.bias: checkpoint (5), model (3): another '
                'class count: not loaded, initialised') in log
    assert ('bbox_head.cls_branches.3.weight: checkpoint (5, 128), model (3, 128): the '
            'two-stage proposal classifier: rows 0-2 loaded') in log
    # ... and MMEngine had nothing left to warn about.
    assert 'size mismatch' not in log and 'missing keys' not in log
    assert 'unexpected key' not in log

    losses = _losses(str(tmp_path / 'run'))
    assert len(losses) == 16
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, losses


def test_fine_tune_refuses_other_mismatches(demo_checkpoint, new_shapes, tmp_path, run_tool):
    tmp, checkpoint = demo_checkpoint
    ckpt = torch.load(checkpoint, weights_only=False)
    state = ckpt['state_dict']
    del state['level_embed']
    state['encoder.layers.0.ffn.layers.1.weight'] = torch.zeros(128, 7)
    broken = str(tmp_path / 'broken.pth')
    torch.save(ckpt, broken)
    # (the new classes' data: on the demo's, the data set check stops the run first,
    # since none of the fine-tuning config's classes is one of its categories)
    config = _config(str(tmp_path), 'finetune.py', FINETUNE, broken, new_shapes, epochs=1)
    proc = run_tool(['tools/train.py', config, '--work-dir', str(tmp_path / 'run')],
                    check=False)
    assert proc.returncode != 0
    assert 'CheckpointMismatchError' in proc.stderr
    assert '1 key of the model missing from the checkpoint:\n  level_embed' in proc.stderr
    assert ('1 tensor of the checkpoint with other shapes than the model\'s:\n  '
            'encoder.layers.0.ffn.layers.1.weight: checkpoint (128, 7), model (128, 256)'
            in proc.stderr)
    assert not osp.exists(tmp_path / 'run' / 'epoch_1.pth')
