"""Times multi-scale deformable attention: ours against mmcv's, side by side in one run.

Forward, and forward + backward, at the shapes Deformable DETR runs: the encoder of a
512x512 and of an 800x1333 image (queries = keys, strides 8/16/32/64) and the 300
decoder queries. On CPU mmcv has only its pure-PyTorch path; on a GPU its CUDA op too.

    python tools/analysis_tools/benchmark_multi_scale_deformable_attn.py                       # CPU, float32
    python tools/analysis_tools/benchmark_multi_scale_deformable_attn.py --device cuda --dtypes float32 float16 bfloat16
"""
import argparse
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ops import multi_scale_deformable_attn

BS, HEADS, DIM, POINTS = 2, 8, 32, 4


def level_shapes(height: int, width: int) -> List[Tuple[int, int]]:
    """Feature map sizes of strides 8, 16, 32, 64 (ResNet C3-C5 plus one stride-2 conv)."""
    shapes, h, w = [], math.ceil(height / 8), math.ceil(width / 8)
    for _ in range(4):
        shapes.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return shapes


CASES = {
    'enc-512x512': (512, 512, None),
    'enc-800x1333': (800, 1333, None),
    'dec-800x1333': (800, 1333, 300),
}


def make_inputs(height: int, width: int, num_queries: Optional[int], device: str,
                dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    shapes = torch.tensor(level_shapes(height, width), device=device)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    keys = int(sizes.sum())
    nq = num_queries or keys
    value = torch.randn(BS, keys, HEADS, DIM, device=device, dtype=dtype)
    loc = torch.rand(BS, nq, HEADS, 4, POINTS, 2, device=device, dtype=dtype)
    weights = torch.rand(BS, nq, HEADS, 4, POINTS, device=device).softmax(-1).to(dtype)
    return dict(value=value, spatial_shapes=shapes, level_start_index=starts,
                sampling_locations=loc, attention_weights=weights)


def traffic_floor_bytes(inputs: Dict[str, torch.Tensor]) -> Tuple[int, int]:
    """Bytes that must move at the least: (forward, forward + backward).

    Forward reads value, locations and weights once and writes the output. Backward
    reads grad_output and the inputs again and writes the three gradients (grad_value
    accumulated in float32 for the half types: zeroed, added, cast).
    """
    value, loc, weights = (inputs[k] for k in ('value', 'sampling_locations',
                                                'attention_weights'))
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    out = value.shape[0] * loc.shape[1] * value.shape[2] * value.shape[3] * value.element_size()
    forward = size(value) + size(loc) + size(weights) + out
    grad_value = value.numel() * 4 * 3 if value.element_size() < 4 else size(value)
    backward = out + size(value) + size(loc) + size(weights) + grad_value + size(loc) + size(weights)
    return forward, forward + backward


def measure_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, min_time=0.5, max_repeat=20)
    return 2 * src.numel() * 4 / seconds


def implementations(device: str) -> Dict[str, Callable]:
    impls = {'ours': multi_scale_deformable_attn}
    if device == 'cuda':  # timed under torch.use_deterministic_algorithms(True)
        impls['ours-deterministic'] = multi_scale_deformable_attn
    try:
        from mmcv.ops import multi_scale_deform_attn as mmcv_op
    except ImportError:
        return impls

    def mmcv_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                     attention_weights):
        return mmcv_op.multi_scale_deformable_attn_pytorch(
            value, spatial_shapes, sampling_locations, attention_weights)

    def mmcv_cuda(value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights):
        return mmcv_op.MultiScaleDeformableAttnFunction.apply(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, 64)

    if device == 'cuda' and hasattr(mmcv_op.ext_module, 'ms_deform_attn_forward'):
        impls['mmcv-cuda'] = mmcv_cuda
    impls['mmcv-pytorch'] = mmcv_pytorch
    return impls


def time_call(fn: Callable, device: str, min_time: float, max_repeat: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""

    def sync():
        if device == 'cuda':
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < max_repeat and (len(times) < 3 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(fn: Callable, inputs: Dict[str, torch.Tensor], device: str, min_time: float,
            max_repeat: int, deterministic: bool = False) -> Tuple[float, float]:
    """(forward, forward + backward) seconds, under torch.use_deterministic_algorithms
    if ``deterministic``."""
    leaves = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
    grad = torch.randn(BS, leaves['sampling_locations'].shape[1], HEADS * DIM, device=device,
                       dtype=leaves['value'].dtype)

    def forward():
        with torch.no_grad():
            fn(**leaves)

    def forward_backward():
        out = fn(**leaves)
        torch.autograd.grad(out, [leaves['value'], leaves['sampling_locations'],
                                  leaves['attention_weights']], grad)

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        return (time_call(forward, device, min_time, max_repeat),
                time_call(forward_backward, device, min_time, max_repeat))
    finally:
        torch.use_deterministic_algorithms(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtypes', nargs='+', default=['float32'],
                        choices=['float32', 'float16', 'bfloat16', 'float64'])
    parser.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    parser.add_argument('--min-time', type=float, default=2.0,
                        help='seconds to spend timing each measurement (at least 3 calls)')
    parser.add_argument('--max-repeat', type=int, default=50)
    args = parser.parse_args()

    impls = implementations(args.device)
    bandwidth = measure_bandwidth(args.device)
    print(f'device: {torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}, '
          f'torch {torch.__version__}, threads {torch.get_num_threads()}; '
          f'bs={BS} heads={HEADS} dim={DIM} levels=4 points={POINTS}; median times in ms; '
          f'copy bandwidth {bandwidth / 1e9:.1f} GB/s')
    print('| case | dtype | impl | fwd ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up '
          '| fwd / floor | fwd+bwd / floor |')
    print('|' + '---|' * 9)
    for case in args.cases:
        height, width, nq = CASES[case]
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            results = {}
            for name, fn in impls.items():
                inputs = make_inputs(height, width, nq, args.device, dtype)
                try:
                    results[name] = measure(fn, inputs, args.device, args.min_time,
                                            args.max_repeat,
                                            deterministic=name == 'ours-deterministic')
                except (RuntimeError, NotImplementedError) as err:  # e.g. no fp16 kernel
                    print(f'| {case} | {dtype_name} | {name} | n/a: '
                          f'{str(err).splitlines()[0][:60]} | | | |')
            floor = [b / bandwidth for b in traffic_floor_bytes(inputs)]
            ours = results.get('ours')
            for name, (fwd, fwd_bwd) in results.items():
                ratio = ('| ' if ours is None else
                         f'{fwd / ours[0]:.2f}x | {fwd_bwd / ours[1]:.2f}x')
                print(f'| {case} | {dtype_name} | {name} | {fwd * 1e3:.2f} | {fwd_bwd * 1e3:.2f} '
                      f'| {ratio} | {fwd / floor[0]:.1f}x | {fwd_bwd / floor[1]:.1f}x |')
    print("speed-up: the implementation's time over ours (> 1: ours is faster); floor: the "
          'least bytes the op must move (inputs read once, outputs written once) over the '
          'copy bandwidth')


if __name__ == '__main__':
    main()
