"""Draw the training data after its pipeline (augmentations included) with its boxes.

    python tools/analysis_tools/browse_dataset.py CONFIG --output-dir vis --not-show
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from mmengine.config import DictAction  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.utils import ProgressBar  # noqa: E402
from projects.deformable_detr.engine.config_file import load_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Browse a dataset')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--output-dir', help='save the drawn images here')
    parser.add_argument('--not-show', action='store_true', help='do not show the images')
    parser.add_argument('--show-interval', type=float, default=2,
                        help='seconds per shown image')
    parser.add_argument('--max-num', type=int, help='draw at most this many images')
    parser.add_argument('--split', choices=['train', 'val', 'test'], default='train',
                        help='which dataloader of the config')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value pairs')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options)  # imports its custom_imports
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    import mmcv
    from mmdet.registry import DATASETS, VISUALIZERS
    from mmdet.structures.bbox import BaseBoxes

    dataset = DATASETS.build(cfg[f'{args.split}_dataloader'].dataset)
    visualizer = VISUALIZERS.build(cfg.visualizer)
    visualizer.dataset_meta = dataset.metainfo
    num = len(dataset) if args.max_num is None else min(args.max_num, len(dataset))
    bar = ProgressBar(num)
    for i in range(num):
        item = dataset[i]
        sample = item['data_samples'].numpy()
        boxes = sample.gt_instances.get('bboxes')
        if isinstance(boxes, BaseBoxes):
            sample.gt_instances.bboxes = boxes.tensor
        image = mmcv.bgr2rgb(item['inputs'].permute(1, 2, 0).numpy())
        name = osp.basename(sample.get('img_path', f'{i}.jpg'))
        out_file = osp.join(args.output_dir, name) if args.output_dir else None
        visualizer.add_datasample(name, image, data_sample=sample, draw_pred=False,
                                  show=not args.not_show, wait_time=args.show_interval,
                                  out_file=out_file)
        bar.update()
    print()


if __name__ == '__main__':
    main()
