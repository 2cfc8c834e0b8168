"""Draw detections of ``tools/test.py --out results.pkl`` as one enlarged image grid.

MMDetection's ``--show-dir`` draws every image at its own size; the synthetic images are
128 px, where labels cover the objects. This draws a few of them enlarged, predictions
(class colour, label and score) over the ground truth (thin white), in one PNG.

    python tools/analysis_tools/draw_predictions.py work_dirs/demo/test/results.pkl \
        data/synthetic/annotations/val.json --out work_dirs/demo/predictions.png
"""
from __future__ import annotations

import argparse
import json
import os
import pickle

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(220, 20, 60), (0, 130, 230), (0, 200, 80), (250, 170, 30), (160, 60, 220),
           (0, 200, 200), (250, 100, 200), (140, 140, 0)]


def _array(x) -> np.ndarray:
    return x.numpy() if hasattr(x, 'numpy') else np.asarray(x)


def draw_one(result: dict, gt_boxes: list, names: dict, scale: int,
             score_thr: float) -> Image.Image:
    """One image enlarged ``scale`` times, with its ground truth and predictions."""
    img = Image.open(result['img_path']).convert('RGB')
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for x, y, w, h in gt_boxes:
        draw.rectangle([x * scale, y * scale, (x + w) * scale, (y + h) * scale],
                       outline=(255, 255, 255), width=1)
    pred = result['pred_instances']
    # predictions are in the original image's pixels (test.py rescales them)
    for box, score, label in zip(_array(pred['bboxes']), _array(pred['scores']),
                                 _array(pred['labels'])):
        if score < score_thr:
            continue
        colour = PALETTE[int(label) % len(PALETTE)]
        x1, y1, x2, y2 = (box * scale).tolist()
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        text = f'{names.get(int(label), int(label))} {score:.2f}'
        tw = draw.textlength(text)
        draw.rectangle([x1, y1 - 11, x1 + tw + 2, y1], fill=colour)
        draw.text((x1 + 1, y1 - 11), text, fill=(255, 255, 255))
    return img


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('results', help='pickle from tools/test.py --out')
    parser.add_argument('ann_file', help='COCO json of the same images (ground truth)')
    parser.add_argument('--out', default='predictions.png')
    parser.add_argument('--num', type=int, default=12, help='images to draw')
    parser.add_argument('--cols', type=int, default=4)
    parser.add_argument('--scale', type=int, default=3)
    parser.add_argument('--score-thr', type=float, default=0.3)
    args = parser.parse_args(argv)

    with open(args.results, 'rb') as f:
        results = pickle.load(f)
    with open(args.ann_file) as f:
        coco = json.load(f)
    # model labels are 0-based in the order of the categories
    names = {i: c['name'] for i, c in enumerate(coco['categories'])}
    gts: dict[int, list] = {}
    for a in coco['annotations']:
        gts.setdefault(a['image_id'], []).append(a['bbox'])
    tiles = [draw_one(r, gts.get(r['img_id'], []), names, args.scale, args.score_thr)
             for r in sorted(results, key=lambda r: r['img_id'])[:args.num]]
    if not tiles:
        raise SystemExit('no results to draw')
    w, h = tiles[0].size
    rows = (len(tiles) + args.cols - 1) // args.cols
    grid = Image.new('RGB', (w * min(args.cols, len(tiles)), h * rows), (0, 0, 0))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % args.cols) * w, (i // args.cols) * h))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    print(f'saved {args.out} ({len(tiles)} images)')


if __name__ == '__main__':
    main()
