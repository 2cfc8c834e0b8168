"""CPU latency of the exported detector in onnxruntime against PyTorch, side by side.

    python tools/deployment/benchmark_onnx.py                     # the default cases
    python tools/deployment/benchmark_onnx.py --cases r50:800x1333 --threads 8 --repeat 20

Each case (``NAME:HxW``; NAME ``demo`` for the CPU demo config, ``r50`` for the R50
multi-scale config, or a config path) is exported to ONNX (``--op-mode onnx``, static
shape, batch 1, random weights: latency does not depend on them), then PyTorch (eager, the
same end-to-end module, our C++ op) and onnxruntime (CPU provider, all graph
optimisations) are run alternately on the same input, after warm-up runs, so that a
changing machine load hits both alike. The table gives the median and the fastest run of
each, the ratio of the medians, and the largest score difference between the two outputs.
The command, the machine and the thread counts come first. Export time is not counted.
"""
import argparse
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
            path = osp.join(tmp, f'{name.replace("/", "_")}.onnx')
            print(f'exporting {name} at {shape[0]}x{shape[1]}...', flush=True)
            export_onnx(detector, path, shape, batch=1, opset=args.opset)
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
            module = End2EndDetector(detector).eval()
            images, img_shapes = example_inputs(shape)
            feed = {'input': images.numpy(), 'img_shapes': img_shapes.numpy()}
            outputs = {}

            def run_torch():
                with torch.no_grad():
                    outputs['torch'] = module(images, img_shapes)

            def run_ort():
                outputs['ort'] = session.run(None, feed)

            print(f'timing {name}...', flush=True)
            times = alternate(dict(torch=run_torch, ort=run_ort), args.warmup, args.repeat)
            score_diff = float(np.abs(np.sort(outputs['ort'][0][..., 4], axis=-1) - np.sort(
                outputs['torch'][0][..., 4].numpy(), axis=-1)).max())
            medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rows.append((name, f'{shape[0]}x{shape[1]}', medians['torch'],
                         min(times['torch']) * 1e3, medians['ort'], min(times['ort']) * 1e3,
                         medians['torch'] / medians['ort'], score_diff))
    print('\n| model | input | PyTorch median (min) ms | onnxruntime median (min) ms | '
          'PyTorch / onnxruntime | max score diff |')
    print('|---|---|---|---|---|---|')
    for name, size, tm, tmin, om, omin, ratio, diff in rows:
        print(f'| {name} | 1x3x{size} | {tm:.1f} ({tmin:.1f}) | {om:.1f} ({omin:.1f}) | '
              f'{ratio:.2f} | {diff:.1e} |')


if __name__ == '__main__':
    main()
