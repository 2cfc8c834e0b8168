"""Export a detector to ONNX, end to end (top-k detections inside the graph).

    python tools/deployment/pytorch2onnx.py CONFIG CHECKPOINT --shape H W --out model.onnx \
        [--dynamic] [--backend onnxruntime|tensorrt] [--op-mode onnx|gather|custom] \
        [--opset N] [--batch N]

The graph's inputs are ``input`` (N, 3, H, W), images normalised as the config's data
preprocessor does it and zero-padded to one size, and ``img_shapes`` (N, 2) int64, the
(h, w) of each image; its outputs ``dets`` (N, k, 5: x1, y1, x2, y2, score, in pixels of
the input) and ``labels`` (N, k), k = ``test_cfg.max_per_img``. ``--op-mode onnx`` writes
multi-scale deformable attention in standard ONNX with GridSample, ``--op-mode gather``
in standard ONNX with Gather and arithmetic only, ``--op-mode custom`` as TensorRT's
``MultiscaleDeformableAttnPlugin_TRT`` node. ``--backend tensorrt`` picks what is safe
for TensorRT: the gather mode (the plugin with ``--op-mode custom``) at opset 18.
See ``projects/deformable_detr/deployment/`` and ``docs/deployment_op_modes.md``.
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

#: Op mode and opset of each backend when not given. TensorRT: no GridSample, which it
#: has been reported to compile into wrong results without an error (NVIDIA/TensorRT
#: issues 4646 and 4813); opset 18, the lowest the exporter writes, which the most
#: TensorRT releases parse.
BACKEND_DEFAULTS = dict(onnxruntime=('onnx', 18), tensorrt=('gather', 18))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Export a detector to ONNX, end to end')
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file (loaded strictly)')
    parser.add_argument('--shape', type=int, nargs=2, required=True, metavar=('H', 'W'),
                        help='input height and width (with --dynamic: the size to trace with)')
    parser.add_argument('--out', required=True, help='the .onnx file to write')
    parser.add_argument('--dynamic', action='store_true',
                        help='dynamic batch size, height and width')
    parser.add_argument('--backend', choices=tuple(BACKEND_DEFAULTS), default='onnxruntime',
                        help='the runtime the file is for; it sets the defaults of --op-mode '
                        'and --opset. tensorrt: --op-mode gather (custom if asked for; onnx '
                        'is refused: TensorRT has been reported to compile GridSample into '
                        'wrong results, NVIDIA/TensorRT issues 4646 and 4813) and opset 18. '
                        'onnxruntime (default): --op-mode onnx, opset 18')
    parser.add_argument('--op-mode', choices=OP_MODES, default=None,
                        help='multi-scale deformable attention as standard ONNX with '
                        'GridSample (onnx), as standard ONNX with Gather and arithmetic only '
                        "(gather), or as TensorRT's plugin node (custom); default: the "
                        "backend's")
    parser.add_argument('--opset', type=int, default=None,
                        help="ONNX opset (18 to 23); default: the backend's (18)")
    parser.add_argument('--batch', type=int, default=1, help='batch size of a static graph')
    parser.add_argument('--plugin-version', choices=('1', '2'), default='1',
                        help='TensorRT plugin version (--op-mode custom): 1 (TensorRT >= 8.x) '
                        'or 2 (its IPluginV3 port, TensorRT >= 10.11)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value pairs')
    return parser.parse_args()


def resolve_backend(args: argparse.Namespace) -> None:
    """Fills in --op-mode and --opset from --backend; refuses GridSample for TensorRT."""
    op_mode, opset = BACKEND_DEFAULTS[args.backend]
    if args.backend == 'tensorrt' and args.op_mode == 'onnx':
        sys.exit('error: --backend tensorrt with --op-mode onnx: TensorRT has been reported to '
                 'compile the GridSample nodes of that mode into wrong results without an '
                 'error (NVIDIA/TensorRT issues 4646 and 4813); use --op-mode gather (the '
                 "default for TensorRT) or --op-mode custom (TensorRT's plugin)")
    if args.op_mode is None:
        args.op_mode = op_mode
    if args.opset is None:
        args.opset = opset


def main() -> None:
    args = parse_args()
    allow_mmengine_checkpoints()  # the checkpoint: an MMEngine one, torch>=2.6
    if min(args.shape) <= 0 or args.batch <= 0:
        sys.exit(f'error: --shape and --batch must be positive, got {args.shape}, {args.batch}')
    resolve_backend(args)
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
    print(f'wrote {args.out} ({size:.1f} MiB) for {args.backend}: opset {info["opset"]}, '
          f'op mode {args.op_mode} ({info["attention_nodes"]} {info["attention_node"]} nodes'
          f'{"" if args.op_mode == "onnx" else ", no GridSample"}), torch {torch.__version__}')
    if args.dynamic:
        ranges = ', '.join(f'{name} {low}..{"" if high is None else high}'
                           for name, (low, high) in info['ranges'].items())
        print(f'dynamic: batch, height and width; the export holds for {ranges}')
    else:
        print(f'static: input {args.batch}x3x{args.shape[0]}x{args.shape[1]}')


if __name__ == '__main__':
    main()
