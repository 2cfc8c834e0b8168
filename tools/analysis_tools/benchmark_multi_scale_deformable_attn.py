"""Times multi-scale deformable attention: ours against mmcv's, side by side in one run.

Forward, and forward + backward, at the shapes Deformable DETR runs: the encoder of a
512x512 and of an 800x1333 image (queries = keys, strides 8/16/32/64) and the 300
decoder queries, at batch 2 (and 8 on a GPU). On a CPU mmcv has only its pure-PyTorch
path; on a GPU its CUDA kernel, from mmcv's own CUDA build or compiled standalone from
its source distribution (``MMCV_SDIST=mmcv-2.1.0.tar.gz``, see ``tools/gpu/mmcv_cuda.py``).

    python tools/analysis_tools/benchmark_multi_scale_deformable_attn.py             # CPU, float32
    MMCV_SDIST=mmcv-2.1.0.tar.gz python tools/analysis_tools/benchmark_multi_scale_deformable_attn.py \
        --device cuda --dtypes float32 float16 bfloat16

Times are medians of repeated calls after warm-up calls (CUDA events on a GPU). Each row
also gives the peak memory that forward + backward allocates beyond its inputs and, on a
GPU, ours with ``torch.use_deterministic_algorithms(True)`` (``ours-deterministic``).
"""
import argparse
import math
import os.path as osp
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402

from ops import multi_scale_deformable_attn  # noqa: E402

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'gpu'))
from mmcv_cuda import load_mmcv_cuda, mmcv_cuda_attention  # noqa: E402

HEADS, DIM, POINTS = 8, 32, 4


def level_shapes(height: int, width: int) -> List[Tuple[int, int]]:
    """Feature map sizes of strides 8, 16, 32, 64 (ResNet C3-C5 plus one stride-2 conv)."""
    shapes, h, w = [], math.ceil(height / 8), math.ceil(width / 8)
    for _ in range(4):
        shapes.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return shapes


# name: (image height, image width, decoder queries or None for the encoder, batch)
CASES = {
    'enc-128x128-b1': (128, 128, None, 1),  # a smoke test's size
    'enc-512x512-b2': (512, 512, None, 2),
    'enc-800x1333-b2': (800, 1333, None, 2),
    'enc-800x1333-b8': (800, 1333, None, 8),
    'dec-800x1333-b2': (800, 1333, 300, 2),
    'dec-800x1333-b8': (800, 1333, 300, 8),
}
DEFAULT_CASES = {
    'cpu': ['enc-512x512-b2', 'enc-800x1333-b2', 'dec-800x1333-b2'],
    'cuda': ['enc-800x1333-b2', 'enc-800x1333-b8', 'dec-800x1333-b2', 'dec-800x1333-b8'],
}


def make_inputs(height: int, width: int, num_queries: Optional[int], batch: int, device: str,
                dtype: torch.dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The op's arguments for one case: uniform random locations, softmax weights."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(level_shapes(height, width))
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    keys = int(sizes.sum())
    nq = num_queries or keys
    value = torch.randn(batch, keys, HEADS, DIM, generator=gen)
    loc = torch.rand(batch, nq, HEADS, 4, POINTS, 2, generator=gen)
    weights = torch.rand(batch, nq, HEADS, 4 * POINTS, generator=gen).softmax(-1)
    weights = weights.view(batch, nq, HEADS, 4, POINTS)
    return dict(value=value.to(device, dtype), spatial_shapes=shapes.to(device),
                level_start_index=starts.to(device), sampling_locations=loc.to(device, dtype),
                attention_weights=weights.to(device, dtype))


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


def time_call(fn: Callable, device: str, min_time: float, max_repeat: int,
              warmup: int = 3) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_repeat and (len(times) < 5 or time.perf_counter() - start < min_time):
        if device == 'cuda':
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty(256 * 2**20 if device == 'cuda' else 64 * 2**20, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, min_time=0.5, max_repeat=50)
    return 2 * src.numel() * 4 / seconds


def implementations(device: str) -> Dict[str, Tuple[Callable, bool]]:
    """name: (function, deterministic mode) of every implementation this machine has."""
    impls = {'ours': (multi_scale_deformable_attn, False)}
    if device == 'cuda':
        impls['ours-deterministic'] = (multi_scale_deformable_attn, True)
        ext = load_mmcv_cuda()
        if ext is not None:
            impls['mmcv-cuda'] = (mmcv_cuda_attention(ext), False)
        else:
            print('mmcv CUDA kernel: none (no mmcv CUDA build and no MMCV_SDIST); '
                  'timing ours only')
    try:
        from mmcv.ops import multi_scale_deform_attn as mmcv_op
    except ImportError:
        return impls

    def mmcv_pytorch(value, spatial_shapes, level_start_index, sampling_locations,
                     attention_weights):
        return mmcv_op.multi_scale_deformable_attn_pytorch(
            value, spatial_shapes, sampling_locations, attention_weights)

    if device == 'cpu':
        impls['mmcv-pytorch'] = (mmcv_pytorch, False)
    return impls


def measure(fn: Callable, deterministic: bool, inputs: Dict[str, torch.Tensor], device: str,
            min_time: float, max_repeat: int) -> Tuple[float, float, float]:
    """(forward seconds, forward + backward seconds, forward + backward peak bytes)."""
    leaves = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
    nq = leaves['sampling_locations'].shape[1]
    grad = torch.randn(leaves['value'].shape[0], nq, HEADS * DIM, device=device,
                       dtype=leaves['value'].dtype)
    wrt = [leaves['value'], leaves['sampling_locations'], leaves['attention_weights']]

    def forward():
        with torch.no_grad():
            fn(**leaves)

    def forward_backward():
        torch.autograd.grad(fn(**leaves), wrt, grad)

    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        peak = float('nan')
        if device == 'cuda':
            forward_backward()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            forward_backward()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        return (time_call(forward, device, min_time, max_repeat),
                time_call(forward_backward, device, min_time, max_repeat), peak)
    finally:
        torch.use_deterministic_algorithms(was)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        choices=['cpu', 'cuda'])
    parser.add_argument('--dtypes', nargs='+', default=['float32'],
                        choices=['float32', 'float16', 'bfloat16', 'float64'])
    parser.add_argument('--cases', nargs='+', choices=list(CASES),
                        help='default: ' + '; '.join(f'{d}: {" ".join(c)}'
                                                     for d, c in DEFAULT_CASES.items()))
    parser.add_argument('--min-time', type=float, default=2.0,
                        help='seconds to spend timing each measurement (at least 5 calls)')
    parser.add_argument('--max-repeat', type=int, default=50)
    args = parser.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: torch sees no CUDA device')
    cases = args.cases or DEFAULT_CASES[args.device]

    impls = implementations(args.device)
    bandwidth = measure_bandwidth(args.device)
    name = torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'
    print(f'device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, '
          f'threads {torch.get_num_threads()}; heads={HEADS} dim={DIM} levels=4 '
          f'points={POINTS}; median times in ms; copy bandwidth {bandwidth / 1e9:.1f} GB/s')
    print('| case | dtype | impl | fwd ms | fwd+bwd ms | fwd+bwd peak MiB | fwd speed-up '
          '| fwd+bwd speed-up | fwd+bwd vs mmcv fp32 | fwd / floor | fwd+bwd / floor |')
    print('|' + '---|' * 11)
    for case in cases:
        height, width, nq, batch = CASES[case]
        mmcv_fp32 = None
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            results = {}
            for impl, (fn, deterministic) in impls.items():
                inputs = make_inputs(height, width, nq, batch, args.device, dtype)
                try:
                    results[impl] = measure(fn, deterministic, inputs, args.device,
                                            args.min_time, args.max_repeat)
                except (RuntimeError, NotImplementedError) as err:  # e.g. no bf16 kernel
                    print(f'| {case} | {dtype_name} | {impl} | n/a: '
                          f'{str(err).splitlines()[0][:60]} | | | | | | | |')
                del inputs
                if args.device == 'cuda':
                    torch.cuda.empty_cache()
            if dtype == torch.float32 and 'mmcv-cuda' in results:
                mmcv_fp32 = results['mmcv-cuda'][1]
            floor = [b / bandwidth for b in traffic_floor_bytes(
                make_inputs(height, width, nq, batch, 'meta', dtype))]
            ours = results.get('ours')
            for impl, (fwd, fwd_bwd, peak) in results.items():
                ratio = ('| ' if ours is None else
                         f'{fwd / ours[0]:.2f}x | {fwd_bwd / ours[1]:.2f}x')
                vs_mmcv = f'{mmcv_fp32 / fwd_bwd:.2f}x' if mmcv_fp32 else ''
                peak_mib = f'{peak / 2**20:.1f}' if peak == peak else '-'  # NaN: not measured
                print(f'| {case} | {dtype_name} | {impl} | {fwd * 1e3:.2f} | {fwd_bwd * 1e3:.2f} '
                      f'| {peak_mib} | {ratio} | {vs_mmcv} | {fwd / floor[0]:.1f}x '
                      f'| {fwd_bwd / floor[1]:.1f}x |')
    print("speed-up: the implementation's time over ours in the same dtype (> 1: ours is "
          "faster); vs mmcv fp32: mmcv's float32 forward + backward time over this row's; "
          'peak: memory allocated beyond the inputs by forward + backward (GPU only); floor: '
          'the least bytes the op must move (inputs read once, outputs written once) over '
          'the copy bandwidth')


if __name__ == '__main__':
    main()
