"""Detect objects in images with a trained model: drawn PNGs and a JSON of boxes.

    python demo/image_demo.py IMAGES CONFIG --weights CHECKPOINT [--out-dir outputs]
        [--score-thr 0.3] [--device cpu|cuda] [--batch-size 1] [--show]

IMAGES is an image file, a folder of images, or a glob pattern (quote it). It runs
through MMDetection's ``DetInferencer`` with this project's config; for every image it
writes ``OUT_DIR/vis/NAME.png`` (the detections drawn above the score threshold) and, for
all images, ``OUT_DIR/predictions.json``: per image its path, size and the boxes above
the threshold (x1, y1, x2, y2 in pixels of the original image), scores, labels and class
names.
"""
import argparse
import glob
import json
import os
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import mmcv  # noqa: E402
from mmdet.apis import DetInferencer  # noqa: E402

from projects.deformable_detr.checkpoint import allow_mmengine_checkpoints  # noqa: E402
from projects.deformable_detr.engine.config_file import load_config  # noqa: E402

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Detect objects in images')
    parser.add_argument('inputs', help='an image, a folder of images, or a glob pattern')
    parser.add_argument('config', help='model config file')
    parser.add_argument('--weights', required=True, help='checkpoint file')
    parser.add_argument('--out-dir', default='outputs', help='where to write vis/ and '
                        'predictions.json')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='draw and list detections at or above this score')
    parser.add_argument('--device', default=None, help='cpu, cuda, cuda:1 ... '
                        '(default: cuda if available)')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--show', action='store_true', help='also show each image')
    return parser.parse_args()


def image_paths(inputs: str) -> list:
    """The images an argument names: a file, a folder's images, or a glob's matches."""
    if osp.isdir(inputs):
        paths = [osp.join(inputs, name) for name in os.listdir(inputs)]
    elif osp.isfile(inputs):
        return [inputs]
    else:
        paths = glob.glob(inputs)
    paths = sorted(p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS) and osp.isfile(p))
    if not paths:
        raise SystemExit(f'no images found at {inputs!r} (a file, a folder, or a glob of '
                         f'{", ".join(IMAGE_EXTENSIONS)} files)')
    return paths


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, needs=('model',))
    if not osp.isfile(args.weights):
        raise SystemExit(f'--weights {args.weights!r} is not a file')
    paths = image_paths(args.inputs)
    allow_mmengine_checkpoints()  # the weights: an MMEngine checkpoint, torch>=2.6
    inferencer = DetInferencer(model=cfg, weights=args.weights, device=args.device)
    classes = inferencer.model.dataset_meta.get('classes', ())
    result = inferencer(paths, batch_size=args.batch_size, return_vis=True, no_save_vis=True,
                        show=args.show, pred_score_thr=args.score_thr)
    os.makedirs(osp.join(args.out_dir, 'vis'), exist_ok=True)
    records = []
    for path, pred, vis in zip(paths, result['predictions'], result['visualization']):
        name = osp.splitext(osp.basename(path))[0]
        mmcv.imwrite(mmcv.rgb2bgr(vis), osp.join(args.out_dir, 'vis', name + '.png'))
        keep = [i for i, s in enumerate(pred['scores']) if s >= args.score_thr]
        records.append(dict(
            image=path, height=vis.shape[0], width=vis.shape[1],
            detections=[dict(bbox=[round(v, 2) for v in pred['bboxes'][i]],
                             score=round(pred['scores'][i], 4), label=pred['labels'][i],
                             class_name=classes[pred['labels'][i]]
                             if pred['labels'][i] < len(classes) else None)
                        for i in keep]))
    out_json = osp.join(args.out_dir, 'predictions.json')
    with open(out_json, 'w') as f:  # one image a line
        f.write('[\n' + ',\n'.join(json.dumps(r) for r in records) + '\n]\n')
    found = sum(len(r['detections']) for r in records)
    print(f'{len(records)} images, {found} detections at score >= {args.score_thr}: '
          f'{osp.join(args.out_dir, "vis")}/*.png, {out_json}')


if __name__ == '__main__':
    main()
