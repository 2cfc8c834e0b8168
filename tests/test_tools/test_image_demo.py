"""demo/image_demo.py on a checkpoint of the demo config trained for two iterations."""
import json
import os
import os.path as osp

import pytest

CONFIG = 'configs/synthetic/deformable-detr-refine-twostage_r18_1xb8-synthetic.py'


@pytest.fixture(scope='module')
def trained(tmp_path_factory, run_tool):
    """A tiny synthetic data set and a checkpoint trained on it for two iterations."""
    tmp = tmp_path_factory.mktemp('image_demo')
    data = str(tmp / 'data')
    run_tool(['tools/dataset_converters/synthetic_coco.py', '--out', data, '--num-train', '8',
              '--num-val', '3', '--no-validate'])
    ann = osp.join(data, 'annotations', 'val.json')
    run_tool(['tools/train.py', CONFIG, '--work-dir', str(tmp / 'work'), '--cfg-options',
              f'train_dataloader.dataset.data_root={data}/',
              f'val_dataloader.dataset.data_root={data}/',
              f'test_dataloader.dataset.data_root={data}/', f'val_evaluator.ann_file={ann}',
              f'test_evaluator.ann_file={ann}', 'train_cfg.max_epochs=1',
              'train_dataloader.batch_size=4', 'param_scheduler=[]'])
    return tmp, data, str(tmp / 'work' / 'epoch_1.pth')


@pytest.mark.parametrize('inputs', ['folder', 'glob', 'file'])
def test_writes_pngs_and_json(trained, run_tool, inputs):
    tmp, data, ckpt = trained
    images = sorted(os.listdir(osp.join(data, 'val')))
    arg = dict(folder=osp.join(data, 'val'), glob=osp.join(data, 'val', '00000[12].jpg'),
               file=osp.join(data, 'val', images[0]))[inputs]
    expected = dict(folder=images, glob=images[:2], file=images[:1])[inputs]
    out = tmp / f'out_{inputs}'
    # threshold 0: every detection of the model (test_cfg.max_per_img, 100 an image) is
    # listed, so the checks below run on 100 detections of each image, whatever the scores
    # of a model trained for two iterations
    run_tool(['demo/image_demo.py', arg, CONFIG, '--weights', ckpt, '--out-dir', str(out),
              '--score-thr', '0', '--device', 'cpu'])
    assert sorted(os.listdir(out / 'vis')) == [n.replace('.jpg', '.png') for n in expected]
    records = json.loads((out / 'predictions.json').read_text())
    assert [osp.basename(r['image']) for r in records] == expected
    classes = ('circle', 'square', 'triangle', 'cross', 'star')
    for record in records:
        assert (record['height'], record['width']) == (128, 128)
        assert len(record['detections']) == 100
        scores = [det['score'] for det in record['detections']]
        assert scores == sorted(scores, reverse=True) and 0 <= scores[-1] and scores[0] <= 1
        for det in record['detections']:
            x1, y1, x2, y2 = det['bbox']
            assert 0 <= x1 <= x2 <= 128 and 0 <= y1 <= y2 <= 128
            assert det['class_name'] == classes[det['label']]
        # boxes in the original image's pixels, not normalised ones
        assert max(det['bbox'][2] for det in record['detections']) > 1


def test_no_images_is_a_clear_error(trained, run_tool):
    tmp, _, ckpt = trained
    result = run_tool(['demo/image_demo.py', str(tmp / 'nothing*.jpg'), CONFIG, '--weights',
                       ckpt], check=False)
    assert result.returncode != 0 and 'no images found' in result.stderr
