"""Generate the synthetic shapes data set in COCO format (the demo's data).

    python tools/dataset_converters/synthetic_coco.py --out data/synthetic \
        --num-train 2000 --num-val 200 --seed 0

Writes ``OUT/{train,val}/NNNNNN.jpg`` and ``OUT/annotations/{train,val}.json``, then loads
each split back and checks it (``--no-validate`` skips that). The generator, its classes
and its occlusion policy: :mod:`projects.deformable_detr.datasets.synthetic`.

Another class set (the fine-tuning example's: three shapes the demo's set never shows):

    python tools/dataset_converters/synthetic_coco.py --out data/synthetic_newshapes \
        --classes diamond hexagon ring --num-train 1000 --num-val 200
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from projects.deformable_detr.datasets.synthetic import (CLASSES, SHAPES,  # noqa: E402
                                                         GenConfig, generate_split,
                                                         validate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='data/synthetic', help='output folder')
    parser.add_argument('--num-train', type=int, default=2000)
    parser.add_argument('--num-val', type=int, default=200)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--img-size', type=int, default=GenConfig.img_size)
    parser.add_argument('--max-objects', type=int, default=GenConfig.max_objects)
    parser.add_argument('--min-size', type=float, default=GenConfig.min_size)
    parser.add_argument('--max-size', type=float, default=GenConfig.max_size)
    parser.add_argument('--classes', nargs='+', default=list(CLASSES), metavar='SHAPE',
                        help=f'the class set, in category-id order, among: '
                        f'{" ".join(SHAPES)} (default: {" ".join(CLASSES)})')
    parser.add_argument('--workers', type=int, default=min(len(os.sched_getaffinity(0)), 8),
                        help='processes rendering the images (default: one a core, at '
                        'most 8); the data set is the same for any number')
    parser.add_argument('--no-validate', action='store_true',
                        help='skip loading the result back with pycocotools')
    args = parser.parse_args()
    try:
        cfg = GenConfig(img_size=args.img_size, max_objects=args.max_objects,
                        min_size=args.min_size, max_size=args.max_size,
                        classes=tuple(args.classes))
    except ValueError as err:
        parser.error(str(err))
    if args.workers < 1:
        parser.error(f'--workers must be >= 1, got {args.workers}')
    for split, num in (('train', args.num_train), ('val', args.num_val)):
        ann_file = generate_split(args.out, split, num, args.seed, cfg, workers=args.workers)
        if not args.no_validate:
            stats = validate(ann_file, osp.join(args.out, split))
            print(f'[{split}] OK {ann_file}: {stats}')
        else:
            print(f'[{split}] wrote {ann_file}')


if __name__ == '__main__':
    main()
