"""CPU latency of the exported detector in onnxruntime against PyTorch, side by side.

    python tools/deployment/benchmark_onnx.py                     # the default cases
    python tools/deployment/benchmark_onnx.py --cases r50:800x1333 --threads 8 --repeat 20
    python tools/deployment/benchmark_onnx.py --op-modes gather  # one op mode only

Each case (``NAME:HxW``; NAME ``demo`` for the CPU demo config, ``r50`` for the R50
multi-scale config, or a config path) is exported to ONNX once per op mode (``--op-modes``:
by default ``onnx``, the attention with GridSample, and ``gather``, with Gather and
arithmetic only; static shape, batch 1, random weights: latency does not depend on them),
then PyTorch (eager, the same end-to-end module, our C++ op) and onnxruntime (CPU
provider, all graph optimisations) on each file are run in turn on the same input, after
warm-up runs, so that a changing machine load hits all alike. The table gives the median
and the fastest run of each, PyTorch's median over each onnxruntime median, and the
largest score difference between each onnxruntime output and PyTorch's. The command, the
machine and the thread counts come first. Export time is not counted.
"""
import argparse
import functools
import logging
import os
import os.path as osp
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402

from projects.deformable_detr.deployment import (End2EndDetector, build_detector,  # noqa: E402
                                                 example_inputs, export_onnx)

CONFIGS = {
    'demo': 'configs/synthetic/deformable-detr-refine-twostage_r18_1xb8-synthetic.py',
    'r50': 'configs/deformable_detr/deformable-detr_r50_16xb2-50e_coco.py',
}
DEFAULT_CASES = ['demo:128x128', 'demo:800x1333', 'r50:800x1333']
#: The op modes onnxruntime can run (custom is TensorRT's plugin), as the table names them.
MODE_NAMES = dict(onnx='GridSample', gather='gather')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='onnxruntime vs PyTorch CPU latency')
    parser.add_argument('--cases', nargs='+', default=DEFAULT_CASES,
                        help='NAME:HxW, NAME demo, r50 or a config path '
                        f'(default: {" ".join(DEFAULT_CASES)})')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(),
                        help='intra-op threads of both PyTorch and onnxruntime '
                        '(default: PyTorch\'s default, %(default)s here)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed runs of each')
    parser.add_argument('--repeat', type=int, default=10, help='timed runs of each')
    parser.add_argument('--opset', type=int, default=18, help='ONNX opset of the export')
    parser.add_argument('--op-modes', nargs='+', choices=tuple(MODE_NAMES),
                        default=list(MODE_NAMES),
                        help='op modes to export and time side by side (default: %(default)s)')
    return parser.parse_args()


def parse_case(case: str) -> Tuple[str, str, Tuple[int, int]]:
    """``NAME:HxW`` -> (label, config path, (H, W))."""
    name, _, size = case.rpartition(':')
    try:
        h, w = (int(v) for v in size.lower().split('x'))
    except ValueError:
        sys.exit(f'error: case {case!r} is not NAME:HxW (e.g. r50:800x1333)')
    config = osp.join(ROOT, CONFIGS[name]) if name in CONFIGS else name
    if not osp.isfile(config):
        sys.exit(f'error: case {case!r}: no config {config!r} (names: {", ".join(CONFIGS)})')
    return name, config, (h, w)


def machine() -> str:
    """CPU model, logical CPUs, OS: what the numbers were measured on."""
    cpu = platform.processor() or 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}'


def alternate(runs: Dict[str, Callable[[], None]], warmup: int, repeat: int
              ) -> Dict[str, List[float]]:
    """Seconds of each timed run, the callables run in turn (a, b, a, b...)."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for i in range(warmup + repeat):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    args = parse_args()
    cases = [parse_case(c) for c in args.cases]
    import onnxruntime as ort
    MMLogger.get_current_instance().setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    print('command: ' + ' '.join([osp.basename(sys.executable)] + sys.argv))
    print(f'machine: {machine()}')
    print(f'threads: PyTorch intra-op {torch.get_num_threads()}, onnxruntime intra-op '
          f'{args.threads} (inter-op 1); OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS")}')
    print(f'versions: torch {torch.__version__}, onnxruntime {ort.__version__}; '
          f'{args.warmup} warm-up and {args.repeat} timed runs of each, alternating')
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config, shape in cases:
            cfg = Config.fromfile(config)
            cfg.model.backbone.init_cfg = None  # random weights: no download
            torch.manual_seed(0)
            detector = build_detector(cfg)
            detector.init_weights()
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sessions = {}
            for mode in args.op_modes:
                path = osp.join(tmp, f'{name.replace("/", "_")}_{mode}.onnx')
                print(f'exporting {name} at {shape[0]}x{shape[1]}, op mode {mode}...',
                      flush=True)
                export_onnx(detector, path, shape, batch=1, op_mode=mode, opset=args.opset)
                sessions[mode] = ort.InferenceSession(path, options,
                                                      providers=['CPUExecutionProvider'])
            module = End2EndDetector(detector).eval()
            images, img_shapes = example_inputs(shape)
            feed = {'input': images.numpy(), 'img_shapes': img_shapes.numpy()}
            outputs = {}

            def run_torch():
                with torch.no_grad():
                    outputs['torch'] = module(images, img_shapes)

            def run_ort(mode):
                outputs[mode] = sessions[mode].run(None, feed)

            print(f'timing {name}...', flush=True)
            runs = dict(torch=run_torch)
            runs.update({mode: functools.partial(run_ort, mode) for mode in args.op_modes})
            times = alternate(runs, args.warmup, args.repeat)
            torch_scores = np.sort(outputs['torch'][0][..., 4].numpy(), axis=-1)
            medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            cells = [f'{medians["torch"]:.1f} ({min(times["torch"]) * 1e3:.1f})']
            for mode in args.op_modes:
                cells.append(f'{medians[mode]:.1f} ({min(times[mode]) * 1e3:.1f})')
                cells.append(f'{medians["torch"] / medians[mode]:.2f}')
            for mode in args.op_modes:
                diff = np.abs(np.sort(outputs[mode][0][..., 4], axis=-1) - torch_scores).max()
                cells.append(f'{float(diff):.1e}')
            rows.append([name, f'1x3x{shape[0]}x{shape[1]}'] + cells)
    header = ['model', 'input', 'PyTorch median (min) ms']
    for mode in args.op_modes:
        header += [f'onnxruntime {MODE_NAMES[mode]} median (min) ms',
                   f'PyTorch / {MODE_NAMES[mode]}']
    header += [f'max score diff {MODE_NAMES[mode]}' for mode in args.op_modes]
    print('\n| ' + ' | '.join(header) + ' |')
    print('|' + '---|' * len(header))
    for row in rows:
        print('| ' + ' | '.join(row) + ' |')


if __name__ == '__main__':
    main()
