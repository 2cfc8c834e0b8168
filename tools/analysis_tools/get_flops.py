"""FLOPs and parameters of a detector, the deformable attention op included.

    python tools/analysis_tools/get_flops.py CONFIG [--shape 800 1333] [--num-images 100]

Counts with MMEngine's ``FlopAnalyzer`` (the analyzer behind
``mmengine.analysis.get_model_complexity_info``; fvcore's convention: one
multiply-add is one FLOP). Tracing sees our op as one node,
``ddetr::multi_scale_deformable_attn``, that no default handle knows;
:mod:`projects.deformable_detr.utils.flops` counts it (and the decoder's fused
self-attention). Without ``--shape`` the count is averaged over the first
``--num-images`` images of the test set after its pipeline, as the DETR papers report
it; with ``--shape H W`` it is for one H x W input.
"""
import argparse
import os.path as osp
import sys
from functools import partial
from typing import List

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.analysis import FlopAnalyzer, parameter_count  # noqa: E402
from mmengine.analysis.print_helper import _format_size, complexity_stats_table  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import Runner, load_checkpoint  # noqa: E402
from mmengine.utils import ProgressBar  # noqa: E402

from projects.deformable_detr.checkpoint import allow_mmengine_checkpoints  # noqa: E402
from projects.deformable_detr.utils.flops import FLOP_HANDLES  # noqa: E402
from projects.deformable_detr.engine.config_file import load_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='FLOPs and parameters of a detector')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--checkpoint', help='optional weights (FLOPs do not depend on them)')
    parser.add_argument('--shape', type=int, nargs='+',
                        help='input H W (one number: square); default: real test images')
    parser.add_argument('--num-images', type=int, default=100,
                        help='images of the test set to average over (without --shape)')
    parser.add_argument('--show-table', action='store_true',
                        help='print the per-module table')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value pairs')
    return parser.parse_args()


def count(model: torch.nn.Module, data: dict) -> FlopAnalyzer:
    """A FlopAnalyzer of ``model`` on one preprocessed batch, our op handled."""
    data = model.data_preprocessor(data, False)
    forward = model.forward
    model.forward = partial(forward, data_samples=data['data_samples'], mode='tensor')
    try:
        flops = FlopAnalyzer(model, (data['inputs'],))
        flops.set_op_handle(**FLOP_HANDLES)
        flops.total()  # traces now, while forward is patched
    finally:
        model.forward = forward
    return flops


def fixed_shape_batch(shape: List[int]) -> dict:
    """A batch of one random ``H x W`` image with the metainfo DETRs need."""
    from mmdet.structures import DetDataSample
    h, w = (shape * 2)[:2] if len(shape) == 1 else shape
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                batch_input_shape=(h, w), scale_factor=(1., 1.))
    return dict(inputs=[torch.randint(0, 256, (3, h, w), dtype=torch.uint8)],
                data_samples=[DetDataSample(metainfo=meta)])


def main() -> None:
    args = parse_args()
    allow_mmengine_checkpoints()  # --checkpoint: an MMEngine checkpoint, torch>=2.6
    cfg = load_config(args.config, args.cfg_options)  # imports its custom_imports
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    from mmdet.registry import MODELS
    model = MODELS.build(cfg.model)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, map_location='cpu')
    model.eval()
    params = parameter_count(model)['']

    with torch.no_grad():
        if args.shape:
            flops = count(model, fixed_shape_batch(args.shape))
            totals, shapes, analyzer = [flops.total()], [args.shape], flops
        else:
            cfg.test_dataloader.batch_size, cfg.test_dataloader.num_workers = 1, 0
            cfg.test_dataloader.persistent_workers = False
            loader = Runner.build_dataloader(cfg.test_dataloader)
            num = min(args.num_images, len(loader))
            totals, shapes, bar = [], [], ProgressBar(num)
            for i, data in enumerate(loader):
                if i == num:
                    break
                analyzer = count(model, data)
                totals.append(analyzer.total())
                shapes.append(tuple(data['inputs'][0].shape[-2:]))
                bar.update()
            print()
    unsupported = analyzer.unsupported_ops()
    if args.show_table:
        print(complexity_stats_table(analyzer, show_param_shapes=False))
    split = '=' * 30
    mean_shape = tuple(int(x) for x in np.mean(np.array(shapes, dtype=float), axis=0).round())
    # The result goes to stdout, like MMDetection's get_flops.py prints it.
    print(f'\n{split}\n'
                f'Input shape: {mean_shape}'
                f'{" (mean of %d images)" % len(shapes) if not args.shape else ""}\n'
                f'Flops: {np.mean(totals) / 1e9:.2f} G\n'
                f'Params: {params / 1e6:.2f} M\n{split}')
    by_op = analyzer.by_operator()
    print('Flops by operator (last input): ' + ', '.join(
        f'{op}: {_format_size(n)}' for op, n in by_op.most_common()))
    if unsupported:
        print('Not counted (no handle): ' + ', '.join(
            f'{op} x{n}' for op, n in unsupported.most_common()))


if __name__ == '__main__':
    main()
