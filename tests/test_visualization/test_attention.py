"""The attention drawing: the JSON holds what the op received, mapped right to pixels.

Tiny models of the demo's size (128 px images, d=128) with random, perturbed weights, in
all five variants, on a padded batch of two images that the pipeline resized.
"""
import json
import logging
import os
import os.path as osp

import numpy as np
import pytest
import torch

pytest.importorskip('mmdet')
pytest.importorskip('matplotlib')

from mmcv.transforms import Compose  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import get_test_pipeline_cfg  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from PIL import Image  # noqa: E402

import projects.deformable_detr.models.layers.multi_scale_deformable_attention as msda  # noqa: E402
from projects.deformable_detr.visualization import (capture_attention,  # noqa: E402
                                                    visualize_attention)
from projects.deformable_detr.visualization.attention import load_images  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO_CONFIG = 'configs/synthetic/deformable-detr-refine-twostage_r18_1xb8-synthetic.py'
CLASSES = ('circle', 'square', 'triangle', 'cross', 'star')
# (h, w) of the originals: the pipeline resizes them to fit 128x128 (80x128 and 128x102)
# and the batch pads both to 128x128, one in height and one in width.
IMAGE_SHAPES = ((100, 160), (150, 120))
# init_weights() logs every parameter at INFO: slow, and noise in test output.
MMLogger.get_current_instance().setLevel(logging.WARNING)
VARIANTS = ('singlescale', 'dc5', 'multiscale', 'refine', 'twostage')


def variant_config(variant: str) -> Config:
    """The demo config, as one of the five variants (one level: ResNet's last stage)."""
    cfg = Config.fromfile(osp.join(ROOT, DEMO_CONFIG))
    model = cfg.model
    model.as_two_stage = variant == 'twostage'
    model.with_box_refine = variant in ('refine', 'twostage')
    if variant in ('singlescale', 'dc5'):
        model.num_feature_levels = 1
        model.backbone.out_indices = (3, )
        model.neck.in_channels = [256]
    if variant == 'dc5':  # DilatedResNet needs Bottlenecks: a narrow ResNet-50
        model.backbone.update(type='ddetr.DilatedResNet', depth=50, base_channels=8,
                              strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))
    return cfg


def build_model(cfg: Config, seed: int = 0) -> torch.nn.Module:
    """The config's model, initialised, every weight perturbed (so no two heads, levels
    or points share offsets or weights), in eval mode."""
    init_default_scope('mmdet')
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.cfg, model.dataset_meta = cfg, dict(classes=CLASSES)
    return model.eval()


@pytest.fixture
def one_thread():
    """One intra-op thread: the tensors are tiny, and a busy machine's threads wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """Two random images of :data:`IMAGE_SHAPES`."""
    tmp = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(IMAGE_SHAPES):
        path = str(tmp / f'image{i}.png')
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def op_inputs(model, pipeline, paths, monkeypatch):
    """The (locations, weights) of every op call of an ordinary test_step, in call order."""
    calls = []
    real_op = msda.multi_scale_deformable_attn

    def recording_op(value, spatial_shapes, level_start_index, locations, weights):
        calls.append((locations.detach().clone(), weights.detach().clone()))
        return real_op(value, spatial_shapes, level_start_index, locations, weights)

    monkeypatch.setattr(msda, 'multi_scale_deformable_attn', recording_op)
    data = pseudo_collate([pipeline(dict(img_path=p, img_id=i)) for i, p in enumerate(paths)])
    with torch.no_grad():
        samples = model.test_step(data)
    monkeypatch.undo()
    return calls, samples


@pytest.mark.parametrize('variant', VARIANTS)
def test_json_holds_what_the_op_received(variant, images, tmp_path, monkeypatch, one_thread):
    cfg = variant_config(variant)
    model = build_model(cfg)
    pipeline = Compose(get_test_pipeline_cfg(cfg))
    pixels = [(10, 20), (119, 99.5)]  # inside both images
    visualize_attention(model, pipeline, images, str(tmp_path), top_k=3, pixels=pixels)
    results = json.loads((tmp_path / 'attention.json').read_text())
    assert sorted(os.listdir(tmp_path)) == ['attention.json', 'image0.png', 'image1.png']
    assert not any(getattr(m, '_sampling_hooks', None) for m in model.modules())  # removed

    calls, samples = op_inputs(model, pipeline, images, monkeypatch)
    num_enc, num_dec = model.encoder.num_layers, model.decoder.num_layers
    assert len(calls) == num_enc + num_dec  # the encoder's layers, then the decoder's
    enc_locations, enc_weights = calls[num_enc - 1]
    dec_locations, dec_weights = calls[-1]
    levels = model.num_feature_levels
    for i, (result, sample) in enumerate(zip(results, samples)):
        assert result['batch_input_shape'] == [128, 128]
        assert result['img_shape'] == [[80, 128], [128, 102]][i]
        assert (result['decoder_layer'], result['encoder_layer']) == (num_dec - 1, num_enc - 1)
        chosen = result['decoder_queries']
        assert len(chosen) == 3 and len(result['encoder_queries']) == 2
        # the top 3 queries by best class score: the first is the best detection's
        scores = [q['score'] for q in chosen]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] == pytest.approx(float(sample.pred_instances.scores[0]), abs=1e-6)
        # 1e-6: both forwards run the same float32 code on the same inputs
        for entry, locations, weights in (
                *((q, dec_locations, dec_weights) for q in chosen),
                *((e, enc_locations, enc_weights) for e in result['encoder_queries'])):
            got = torch.tensor(entry['sampling_locations'], dtype=torch.float64)
            assert got.shape == (8, levels, 4, 2)
            torch.testing.assert_close(got, locations[i, entry['query']].double(), atol=1e-6,
                                       rtol=0)
            got = torch.tensor(entry['attention_weights'], dtype=torch.float64)
            torch.testing.assert_close(got, weights[i, entry['query']].double(), atol=1e-6,
                                       rtol=0)
        # an encoder query's reference is the centre of the level-0 cell holding the pixel
        for entry, (x, y) in zip(result['encoder_queries'], pixels):
            (vr_w, vr_h), (fh, fw) = (result['levels'][0][k] for k in ('valid_ratio', 'shape'))
            (h, w), (sx, sy) = result['img_shape'], result['scale_factor']
            cell_w, cell_h = w / (vr_w * fw) / sx, h / (vr_h * fh) / sy  # original pixels
            rx, ry = entry['reference']['point']
            # 1e-4 px: float32 arithmetic on values below 200 px (2^-24 * 200 * a few ops)
            assert abs(rx - x) <= cell_w / 2 + 1e-4 and abs(ry - y) <= cell_h / 2 + 1e-4
        if variant in ('refine', 'twostage'):  # box references, drawn as boxes
            assert all('box' in q['reference'] for q in chosen)
        else:
            assert all('box' not in q['reference'] for q in chosen)


def test_pixels_by_hand(images, tmp_path, one_thread):
    """Image 0: 100x160 resized by 0.8 to 80x128, padded to 128x128 in height.

    Level 0 (stride 8) is 16x16, of which the model's mask keeps 10 rows: valid ratio
    (1, 0.625). Level 2 (stride 32) is 4x4; the mask's nearest-neighbour resize keeps
    rows 0, 1, 2 (source rows 0, 32, 64 < 80): valid ratio (1, 0.75), not 0.625. A
    location (x, y) of level k maps to (x / rw * 128 / 0.8, y / rh * 80 / 0.8).
    """
    cfg = variant_config('multiscale')
    model = build_model(cfg)
    pipeline = Compose(get_test_pipeline_cfg(cfg))
    (result, _) = capture_attention(model, load_images(pipeline, images), queries=[7],
                                    pixels=[(80, 48)])
    assert result['scale_factor'] == [0.8, 0.8] and result['ori_shape'] == [100, 160]
    assert [lv['valid_ratio'] for lv in result['levels']] == [
        [1, 0.625], [1, 0.625], [1, 0.75], [1, 1.0]]
    entry = result['decoder_queries'][0]
    for level, (rw, rh) in ((0, (1, 0.625)), (2, (1, 0.75))):
        x, y = entry['sampling_locations'][3][level][1]  # head 3, point 1
        px, py = entry['sampling_pixels'][3][level][1]
        # 1e-4 px: float32 arithmetic on values below 200 px
        assert px == pytest.approx(x / rw * 128 / 0.8, abs=1e-4)
        assert py == pytest.approx(y / rh * 80 / 0.8, abs=1e-4)
    # pixel (80, 48) -> resized (64, 38.4) -> valid level-0 cells 16 x 10: column
    # floor(64 / 128 * 16) = 8, row floor(38.4 / 80 * 10) = 4 -> query 4 * 16 + 8 = 72,
    # whose centre (8.5 / 16 * 128, 4.5 / 10 * 80) / 0.8 = (85, 45)
    pixel = result['encoder_queries'][0]
    assert pixel['query'] == 72 and pixel['level'] == 0
    assert pixel['reference']['point'] == pytest.approx([85, 45], abs=1e-4)


@pytest.mark.parametrize('selection, message', [
    (dict(layer=3), 'layer 3 does not exist: the decoder has 3 layers'),
    (dict(layer=-4), 'layer -4 does not exist: the decoder has 3 layers'),
    (dict(layer=2, pixels=[(1, 1)]), 'layer 2 does not exist: the encoder has 2 layers'),
    (dict(queries=[50]), 'query 50 is out of range: the model has 50 queries'),
    (dict(queries=[-1]), 'query -1 is out of range'),
    (dict(top_k=0), 'top_k 0 is out of range'),
    (dict(pixels=[(160, 10)]), "pixel 160,10 is outside the image '.*image0.png' "
                               r'\(160x100'),
    (dict(pixels=[(10, -1)]), 'pixel 10,-1 is outside the image'),
    (dict(pixels=[(1, 1)], pixel_level=4), 'pixel level 4 does not exist: the model has 4'),
])
def test_bad_selection_is_named(selection, message, images, one_thread):
    cfg = variant_config('twostage')
    model = build_model(cfg)
    items = load_images(Compose(get_test_pipeline_cfg(cfg)), images)
    with pytest.raises(ValueError, match=message):
        capture_attention(model, items, **selection)


def test_command_line(images, tmp_path, run_tool):
    """The tool on a checkpoint of the demo config: files, and a bad query named. The
    checkpoint holds MMEngine's types as tools/train.py's do (the message hub's
    HistoryBuffer), which torch's weights-only load refuses unless allowed."""
    from mmengine.logging import HistoryBuffer
    model = build_model(Config.fromfile(osp.join(ROOT, DEMO_CONFIG)))
    ckpt = str(tmp_path / 'random.pth')
    torch.save(dict(state_dict=model.state_dict(), meta=dict(dataset_meta=dict(
        classes=CLASSES)), message_hub=dict(log_scalars={'train/loss': HistoryBuffer([1.0], [1])})),
        ckpt)
    out = tmp_path / 'out'
    run_tool(['tools/analysis_tools/visualize_attention.py', DEMO_CONFIG, ckpt, *images,
              '--out-dir', str(out), '--queries', '0', '5', '--pixels', '20,30', '--device',
              'cpu'])
    assert sorted(os.listdir(out)) == ['attention.json', 'image0.png', 'image1.png']
    with Image.open(out / 'image0.png') as png:
        assert png.width >= 3 * 300  # three panels
    results = json.loads((out / 'attention.json').read_text())
    assert [q['query'] for q in results[0]['decoder_queries']] == [0, 5]
    assert results[1]['encoder_queries'][0]['pixel'] == [20, 30]

    bad = run_tool(['tools/analysis_tools/visualize_attention.py', DEMO_CONFIG, ckpt,
                    images[0], '--out-dir', str(out), '--queries', '99', '--device', 'cpu'],
                   check=False)
    assert bad.returncode != 0
    assert 'query 99 is out of range: the model has 50 queries' in bad.stderr
    missing = run_tool(['tools/analysis_tools/visualize_attention.py', DEMO_CONFIG, ckpt,
                        str(tmp_path / 'nope.jpg')], check=False)
    assert missing.returncode != 0 and 'nope.jpg' in missing.stderr
