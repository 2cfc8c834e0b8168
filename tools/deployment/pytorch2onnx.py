"""Export a detector to ONNX, end to end (top-k detections inside the graph).

    python tools/deployment/pytorch2onnx.py CONFIG CHECKPOINT --shape H W --out model.onnx \
        [--dynamic] [--op-mode onnx|custom] [--opset N] [--batch N]

The graph's inputs are ``input`` (N, 3, H, W), images normalised as the config's data
preprocessor does it and zero-padded to one size, and ``img_shapes`` (N, 2) int64, the
(h, w) of each image; its outputs ``dets`` (N, k, 5: x1, y1, x2, y2, score, in pixels of
the input) and ``labels`` (N, k), k = ``test_cfg.max_per_img``. ``--op-mode onnx`` writes
multi-scale deformable attention in standard ONNX (GridSample), which onnxruntime runs;
``--op-mode custom`` writes TensorRT's ``MultiscaleDeformableAttnPlugin_TRT`` node.
See ``projects/deformable_detr/deployment/`` and docs/deployment.md.
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from projects.deformable_detr.checkpoint import (allow_mmengine_checkpoints,  # noqa: E402
                                                 load_weights)
from projects.deformable_detr.engine.config_file import load_config  # noqa: E402
from projects.deformable_detr.deployment import (OP_MODES, ExportError,  # noqa: E402
                                                 build_detector, check_opset, export_onnx)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Export a detector to ONNX, end to end')
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file (loaded strictly)')
    parser.add_argument('--shape', type=int, nargs=2, required=True, metavar=('H', 'W'),
                        help='input height and width (with --dynamic: the size to trace with)')
    parser.add_argument('--out', required=True, help='the .onnx file to write')
    parser.add_argument('--dynamic', action='store_true',
                        help='dynamic batch size, height and width')
    parser.add_argument('--op-mode', choices=OP_MODES, default='onnx',
                        help='multi-scale deformable attention as standard ONNX (onnx) or as '
                        "TensorRT's plugin node (custom)")
    parser.add_argument('--opset', type=int, default=18, help='ONNX opset (18 to 23)')
    parser.add_argument('--batch', type=int, default=1, help='batch size of a static graph')
    parser.add_argument('--plugin-version', choices=('1', '2'), default='1',
                        help='TensorRT plugin version (--op-mode custom): 1 (TensorRT >= 8.x) '
                        'or 2 (its IPluginV3 port, TensorRT >= 10.11)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value pairs')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    allow_mmengine_checkpoints()  # the checkpoint: an MMEngine one, torch>=2.6
    if min(args.shape) <= 0 or args.batch <= 0:
        sys.exit(f'error: --shape and --batch must be positive, got {args.shape}, {args.batch}')
    try:
        check_opset(args.opset)
    except ValueError as err:
        sys.exit(f'error: {err}')
    cfg = load_config(args.config, args.cfg_options)  # imports its custom_imports
    try:
        detector = build_detector(cfg)
        try:
            load_weights(detector, args.checkpoint)
        except (RuntimeError, ValueError) as err:
            sys.exit(f'error: {args.checkpoint} does not fit {args.config}:\n{err}')
        info = export_onnx(detector, args.out, args.shape, batch=args.batch,
                           dynamic=args.dynamic, op_mode=args.op_mode, opset=args.opset,
                           plugin_version=args.plugin_version)
    except ExportError as err:
        sys.exit(f'error: {err}')
    size = os.path.getsize(args.out) / 2**20
    print(f'wrote {args.out} ({size:.1f} MiB): opset {info["opset"]}, op mode {args.op_mode} '
          f'({info["attention_nodes"]} '
          f'{"GridSample" if args.op_mode == "onnx" else "MultiscaleDeformableAttnPlugin_TRT"}'
          ' nodes), torch ' + torch.__version__)
    if args.dynamic:
        ranges = ', '.join(f'{name} {low}..{"" if high is None else high}'
                           for name, (low, high) in info['ranges'].items())
        print(f'dynamic: batch, height and width; the export holds for {ranges}')
    else:
        print(f'static: input {args.batch}x3x{args.shape[0]}x{args.shape[1]}')


if __name__ == '__main__':
    main()
