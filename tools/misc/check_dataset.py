"""Check a config's data set for broken files and annotations, without training.

    python tools/misc/check_dataset.py CONFIG [--split train|val|test] [--decode]

Prints the report that ``ddetr.CocoDataset`` logs when it loads, listing every problem,
and exits with status 1 when there is one. A config, annotation file or image folder that
cannot be used, or a set that its filters leave empty, is the error that training would
stop with: printed on one line (``error: ...``), status 2. ``--decode`` also decodes every image with the
pipeline's decoder (slow: the data set itself only reads headers and file ends).
"""
import argparse
import json
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mmengine.config import DictAction  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from projects.deformable_detr.engine.config_file import ConfigError, load_config  # noqa: E402
from projects.deformable_detr.datasets.input_files import DatasetError  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Check a data set without training')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--split', choices=['train', 'val', 'test'], default='train',
                        help='which dataloader of the config')
    parser.add_argument('--decode', action='store_true',
                        help='also decode every image (finds corrupt image data)')
    parser.add_argument('--max-listed', type=int, default=None,
                        help='list at most this many problems of each kind (default: all)')
    parser.add_argument('--workers', type=int, default=8, help='threads reading files')
    parser.add_argument('--out', help='also write the report(s) to this json file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value pairs')
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    from projects.deformable_detr.datasets import check_dataset
    key = f'{args.split}_dataloader'
    try:
        cfg = load_config(args.config, args.cfg_options, needs=(key,))
        init_default_scope(cfg.get('default_scope', 'mmdet'))
        reports = check_dataset(cfg[key].dataset, decode=args.decode, workers=args.workers,
                                progress=True)
    except (ConfigError, DatasetError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    for report in reports:
        print(report.format(args.max_listed))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump([report.to_dict() for report in reports], f, indent=1)
    return 1 if any(len(report) for report in reports) else 0


if __name__ == '__main__':
    sys.exit(main())
