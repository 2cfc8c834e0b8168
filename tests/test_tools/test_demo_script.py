"""tools/demo.sh, what `make demo` runs, end to end on a tiny set: each of its steps runs
and leaves its files, and the result lines are printed.

One epoch of one batch: the steps are checked, not the model (the mAP bar is the smoke
test's, test_smoke_map.py, and the README's measured run).
"""
import os
import os.path as osp
import pickle

DEMO = 'configs/synthetic/deformable-detr-refine-twostage_r18_1xb8-synthetic.py'


def test_demo_script_runs_every_step(tmp_path, run_tool):
    data, work = tmp_path / 'data', tmp_path / 'work'
    # demo.sh's DATA must be the config's data_root: a config of the demo's with another one
    config = tmp_path / 'demo_here.py'
    config.write_text(f'''_base_ = {osp.abspath(DEMO)!r}
data_root = '{data}/'
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1)
''')
    # train.py's options reach the steps after it too (they use the config as trained):
    # the test keeps 30 detections an image, and a checkpoint of 20 queries loads (into
    # the default 50 queries, image_demo.py refuses it)
    proc = run_tool(['bash', 'tools/demo.sh', '--cfg-options', 'model.num_queries=20',
                     'model.test_cfg.max_per_img=30'], env=dict(
        CONFIG=str(config), DATA=str(data), WORK_DIR=str(work), NUM_TRAIN='8', NUM_VAL='8',
        NICE='0'))
    out = proc.stdout
    assert 'training took' in out and 'COCO bbox mAP' in out, out[-3000:]
    for path in ('epoch_1.pth', 'predictions.png', 'training_curve.png',
                 'image_demo/predictions.json', 'attention/000001.png',
                 'attention/attention.json', 'test/results.pkl'):
        assert osp.isfile(work / path), (path, sorted(os.listdir(work)))
    assert len(os.listdir(work / 'image_demo' / 'vis')) == 8
    with open(work / 'test' / 'results.pkl', 'rb') as f:
        results = pickle.load(f)
    assert len(results) == 8
    assert [len(r['pred_instances']['scores']) for r in results] == [30] * 8
