"""Draw where the deformable attention looks: sampling points and their weights.

    python tools/analysis_tools/visualize_attention.py CONFIG CHECKPOINT IMAGE [IMAGE ...]
        [--out-dir attention] [--layer -1] [--top-k N | --queries ID [ID ...]]
        [--pixels X,Y [X,Y ...]] [--pixel-level 0] [--score-thr 0.3]
        [--batch-size 8] [--device cpu|cuda]

For each image, OUT_DIR/NAME.png has one panel per chosen object query (its predicted
box, its reference point or box, and the sampling points of decoder layer --layer on
every level, coloured by level and sized by attention weight) and one per --pixels
position (the encoder query there, on level --pixel-level, and its sampling points in
encoder layer --layer), all in pixels of the original image. OUT_DIR/attention.json holds
the same points and weights. Without --top-k, --queries or --pixels: the top 3 queries.
See docs/visualize_attention.md.
"""
import argparse
import os.path as osp
import sys
from typing import List, Optional, Sequence

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pixel(text: str) -> List[float]:
    """'x,y' as two numbers (argparse names the argument if it is not)."""
    parts = text.split(',')
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f'{text!r} is not x,y')
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not x,y (two numbers)') from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='model config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files')
    parser.add_argument('--out-dir', default='attention', help='where to write the PNGs '
                        'and attention.json')
    parser.add_argument('--layer', type=int, default=-1, help='decoder layer (and encoder '
                        'layer for --pixels) to draw; negative counts from the last')
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument('--top-k', type=int, help='draw the N queries of highest score')
    choice.add_argument('--queries', type=int, nargs='+', metavar='ID',
                        help='draw these object queries')
    parser.add_argument('--pixels', type=pixel, nargs='+', default=[], metavar='X,Y',
                        help='draw the encoder queries at these positions (pixels of the '
                        'original image)')
    parser.add_argument('--pixel-level', type=int, default=0,
                        help='feature level of the --pixels encoder queries (0: finest)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='queries at or above this score are drawn as detections')
    parser.add_argument('--batch-size', type=int, default=8,
                        help='images per forward (padded to one batch)')
    parser.add_argument('--device', default=None,
                        help='cpu, cuda, cuda:1 ... (default: cuda if available)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    for name, path in (('CONFIG', args.config), ('CHECKPOINT', args.checkpoint),
                       *(('IMAGE', p) for p in args.images)):
        if not osp.isfile(path):
            raise SystemExit(f'error: {name} {path!r} is not a file')
    import torch
    from mmcv.transforms import Compose
    from mmdet.apis import init_detector
    from mmdet.utils import get_test_pipeline_cfg

    from projects.deformable_detr.checkpoint import allow_mmengine_checkpoints
    from projects.deformable_detr.visualization import visualize_attention

    allow_mmengine_checkpoints()  # a checkpoint tools/train.py saved: MMEngine's types
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model = init_detector(args.config, args.checkpoint, device=device)
    pipeline = Compose(get_test_pipeline_cfg(model.cfg))
    try:
        results = visualize_attention(
            model, pipeline, args.images, args.out_dir, batch_size=args.batch_size,
            layer=args.layer, queries=args.queries, top_k=args.top_k, pixels=args.pixels,
            pixel_level=args.pixel_level, score_thr=args.score_thr)
    except ValueError as err:
        raise SystemExit(f'error: {err}') from None
    print(f'{len(results)} images: {args.out_dir}/*.png, '
          f'{osp.join(args.out_dir, "attention.json")}')


if __name__ == '__main__':
    main()
