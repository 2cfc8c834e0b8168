"""Time our Deformable DETR against mmdet 3.3's, same weights, same inputs.

One training step (forward + backward) and one inference of each model, runs
interleaved (mmdet, ours, mmdet, ours...) so that a machine's changing load hits
both alike; prints the median times side by side with the speed-up and, on a GPU, the
peak memory of each, and checks that the two models agree on the losses.

    python tools/analysis_tools/benchmark_model.py            # 2 images 512x512, R50, CPU
    python tools/analysis_tools/benchmark_model.py --size 800 --repeat 5 --threads 2
    python tools/analysis_tools/benchmark_model.py --device cuda --shape 800 1333 \\
        --variant refine-twostage --amp fp16 --repeat 20

``--memory`` compares instead the peak memory and time of a training step with and
without activation checkpointing (``num_cp`` of our encoder and decoder, the backbone's
``with_cp``), each case in a fresh process, mmdet's model beside ours:

    python tools/analysis_tools/benchmark_model.py --memory --variant refine-twostage \
        --shape 800 1333 --threads 1 --warmup 1 --repeat 3

On the CPU the peak is the peak resident set size of the case's process (``ru_maxrss``:
libraries, model, batch and the steps); "step" is that peak minus the resident size
just before the first step: what a training step (activations, gradients) adds. On a
GPU it is ``torch.cuda.max_memory_allocated`` over the steps, and the step's share is
the peak minus what was allocated before the first step. Dropout stays as configured.

On a GPU mmdet's model runs mmcv's CUDA kernel: mmcv's own CUDA build, or, where mmcv
has CPU ops only, mmcv's kernel compiled standalone from its source distribution
(``MMCV_SDIST``, see ``tools/gpu/mmcv_cuda.py``). ``--amp`` runs both under ``torch.autocast``
(fp16 or bf16); mmcv has no bf16 kernel, so ``--amp bf16`` times ours only.
"""
import argparse
import copy
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import mmdet  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from projects.deformable_detr.checkpoint.converters import mmdet_to_ours  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, 'tools', 'gpu'))  # mmcv_cuda: the reference kernel
from mmcv_cuda import give_mmcv_its_cuda_kernel  # noqa: E402

VARIANTS = {  # ours, mmdet's (file names are the same in both trees)
    'plain': 'deformable-detr_r50_16xb2-50e_coco.py',
    'refine': 'deformable-detr-refine_r50_16xb2-50e_coco.py',
    'refine-twostage': 'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
}
AMP = {'none': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}
# --memory: (model, encoder and decoder layers checkpointed, backbone with_cp). mmdet's
# Deformable DETR encoder and decoder have no checkpointing of their own (its num_cp
# exists in DETR's layers only, and needs fairscale); its ResNet has with_cp, as ours.
MEMORY_CASES = {
    'mmdet': ('mmdet', False, False),
    'mmdet, backbone with_cp': ('mmdet', False, True),
    'ours': ('ours', False, False),
    'ours, num_cp=all': ('ours', True, False),
    'ours, num_cp=all, backbone with_cp': ('ours', True, True),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--variant', default='plain', choices=list(VARIANTS),
                        help='multi-scale R50 variant (both models)')
    parser.add_argument('--size', type=int, default=512, help='square image size')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='image height and width (instead of --size)')
    parser.add_argument('--batch', type=int, default=2, help='images per step')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--amp', default='none', choices=list(AMP),
                        help='autocast dtype of forward and backward')
    parser.add_argument('--repeat', type=int, default=3, help='timed runs of each')
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs of each')
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads')
    parser.add_argument('--memory', action='store_true',
                        help='peak memory and time of a training step with and without '
                        'activation checkpointing, each case in a fresh process')
    parser.add_argument('--cases', nargs='+', choices=list(MEMORY_CASES),
                        default=list(MEMORY_CASES), help='--memory: the cases to run')
    parser.add_argument('--case', choices=list(MEMORY_CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: torch sees no CUDA device')
    args.height, args.width = args.shape or (args.size, args.size)
    return args


def build_models(variant: str, device: str):
    """mmdet's model (random init) and ours with its weights, in eval-free train mode."""
    init_default_scope('mmdet')
    torch.manual_seed(0)
    models = []
    for path in (os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs',
                              'deformable_detr', VARIANTS[variant]),
                 os.path.join(ROOT, 'configs', 'deformable_detr', VARIANTS[variant])):
        cfg = Config.fromfile(path)
        cfg.model.backbone.init_cfg = None  # no download; random weights time the same
        models.append(MODELS.build(cfg.model))
    theirs, ours = models
    theirs.init_weights()
    ours.load_state_dict(mmdet_to_ours(theirs.state_dict()), strict=True)
    # The two must compute the same thing for the comparison to mean anything.
    for model in (theirs, ours):
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            elif isinstance(m, torch.nn.MultiheadAttention):
                m.dropout = 0.0
    return theirs.to(device), ours.to(device)


def build_case(variant: str, case: str, device: str) -> torch.nn.Module:
    """One model of :data:`MEMORY_CASES`, randomly initialised, dropout as configured."""
    init_default_scope('mmdet')
    torch.manual_seed(0)
    which, checkpointed, backbone_cp = MEMORY_CASES[case]
    folder = (os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs',
                           'deformable_detr') if which == 'mmdet'
              else os.path.join(ROOT, 'configs', 'deformable_detr'))
    cfg = Config.fromfile(os.path.join(folder, VARIANTS[variant]))
    cfg.model.backbone.init_cfg = None
    cfg.model.backbone.with_cp = backbone_cp
    if checkpointed:
        for stack in ('encoder', 'decoder'):
            cfg.model[stack] = dict(cfg.model[stack], num_cp=cfg.model[stack].num_layers)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model.to(device)


def resident_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def run_memory_case(args: argparse.Namespace) -> None:
    """Builds one case, runs its training steps, prints its peak memory and times."""
    amp = AMP[args.amp]
    model = build_case(args.variant, args.case, args.device)
    inputs, samples = make_batch(args.batch, args.height, args.width, args.device)
    if args.device == 'cuda':
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = resident_bytes()
    times = []
    for i in range(args.warmup + args.repeat):
        t = timed(lambda: train_step(model, inputs, samples, amp), args.device)
        print(f'  {args.case}: step {i + 1}/{args.warmup + args.repeat} {t:.3f}s', flush=True,
              file=sys.stderr)
        if i >= args.warmup:
            times.append(t)
    if args.device == 'cuda':
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print('CASE ' + json.dumps(dict(case=args.case, peak=peak, step=peak - before,
                                    time=statistics.median(times))), flush=True)


def memory_comparison(args: argparse.Namespace) -> None:
    """Runs every case of :data:`MEMORY_CASES` in a fresh process and prints the table."""
    results = {}
    cases = list(args.cases) + ([] if 'ours' in args.cases else ['ours'])  # the reference
    for case in cases:
        cmd = [sys.executable, os.path.abspath(__file__), '--case', case, '--variant',
               args.variant, '--shape', str(args.height), str(args.width), '--batch',
               str(args.batch), '--device', args.device, '--amp', args.amp, '--repeat',
               str(args.repeat), '--warmup', str(args.warmup)]
        if args.threads:
            cmd += ['--threads', str(args.threads)]
        print(f'{case}: a fresh process...', flush=True)
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
        line = next(line for line in out.splitlines() if line.startswith('CASE '))
        results[case] = json.loads(line[len('CASE '):])

    device = torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'
    how = ('torch.cuda.max_memory_allocated' if args.device == 'cuda' else
           'peak RSS of the process (ru_maxrss)')
    print(f'\nDeformable DETR ({args.variant}, R50), training step, {args.batch} x '
          f'{args.height}x{args.width}, {device}, autocast {args.amp}, torch '
          f'{torch.__version__}, {args.threads or torch.get_num_threads()} threads, median '
          f'of {args.repeat} step(s) after {args.warmup} warm-up; peak: {how}; step: peak '
          'minus the memory before the first step')
    print(f'| {"":<36} | {"peak":>9} | {"step":>9} | {"step time":>9} | {"peak vs ours":>12} '
          f'| {"time vs ours":>12} |')
    print(f'|{"-" * 38}|{"-" * 11}|{"-" * 11}|{"-" * 11}|{"-" * 14}|{"-" * 14}|')
    ref = results['ours']
    for case, r in results.items():
        print(f'| {case:<36} | {r["peak"] / 2**30:>5.2f} GiB | {r["step"] / 2**30:>5.2f} GiB '
              f'| {r["time"]:>8.2f}s | {100 * (r["peak"] / ref["peak"] - 1):>+11.1f}% '
              f'| {100 * (r["time"] / ref["time"] - 1):>+11.1f}% |')


def make_batch(batch: int, height: int, width: int, device: str, num_gts: int = 5):
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, 3, height, width, generator=gen)
    samples = []
    for _ in range(batch):
        xy = torch.rand(num_gts, 2, generator=gen) * torch.tensor([width, height]) * 0.6
        wh = (torch.rand(num_gts, 2, generator=gen) * 0.3 + 0.05) * torch.tensor([width, height])
        sample = DetDataSample(metainfo=dict(
            img_shape=(height, width), ori_shape=(height, width), scale_factor=(1.0, 1.0),
            batch_input_shape=(height, width), pad_shape=(height, width)))
        sample.gt_instances = InstanceData(bboxes=torch.cat([xy, xy + wh], 1),
                                           labels=torch.randint(0, 80, (num_gts, ),
                                                                generator=gen))
        samples.append(sample.to(device))
    return inputs.to(device), samples


def train_step(model, inputs, samples, amp: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast(inputs.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        losses = model(inputs, copy.deepcopy(samples), mode='loss')
    sum(losses.values()).backward()
    return losses


def inference(model, inputs, samples, amp: Optional[torch.dtype]):
    model.eval()
    with torch.no_grad(), torch.autocast(inputs.device.type, dtype=amp or torch.float32,
                                         enabled=amp is not None):
        return model(inputs, copy.deepcopy(samples), mode='predict')


def timed(fn: Callable, device: str) -> float:
    if device == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory(fn: Callable, device: str) -> float:
    """Bytes allocated at the peak of ``fn`` beyond what was allocated before it."""
    if device != 'cuda':
        return float('nan')
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def interleaved(label: str, fns: Dict[str, Callable], warmup: int, repeat: int,
                device: str) -> Dict[str, List[float]]:
    times = {name: [] for name in fns}
    total = (warmup + repeat) * len(fns)
    done = 0
    for i in range(warmup + repeat):
        for name, fn in fns.items():
            t = timed(fn, device)
            done += 1
            if i >= warmup:
                times[name].append(t)
            kind = 'warm-up' if i < warmup else 'timed'
            print(f'  [{done}/{total}] {label} {name}: {t:.3f}s ({kind})', flush=True)
    return times


def main() -> None:
    args = parse_args()
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights' dump
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        return run_memory_case(args)
    if args.memory:
        return memory_comparison(args)
    amp = AMP[args.amp]
    kernel = give_mmcv_its_cuda_kernel() if args.device == 'cuda' else "mmcv's pure-PyTorch path"
    theirs, ours = build_models(args.variant, args.device)
    inputs, samples = make_batch(args.batch, args.height, args.width, args.device)
    models = {'mmdet': theirs, 'ours': ours}
    if amp == torch.bfloat16 and args.device == 'cuda':
        print('mmcv has no bfloat16 CUDA kernel: timing ours only')
        del models['mmdet']

    shape = f'{args.batch} x {args.height}x{args.width}'
    print(f'{shape}, {args.device}, autocast {args.amp}, {torch.get_num_threads()} threads; '
          f'mmdet runs {kernel}; checking agreement...', flush=True)
    losses = {name: train_step(m, inputs, samples, amp) for name, m in models.items()}
    loss_diff = None
    if len(losses) == 2:
        loss_diff = max((losses['ours'][k] - losses['mmdet'][k].reshape(())).abs().item()
                        for k in losses['mmdet'])

    results, peaks = {}, {}
    for label, fn in (('training step', train_step), ('inference', inference)):
        calls = {name: (lambda fn=fn, m=m: fn(m, inputs, samples, amp))
                 for name, m in models.items()}
        times = interleaved(label, calls, args.warmup, args.repeat, args.device)
        results[label] = {k: statistics.median(v) for k, v in times.items()}
        peaks[label] = {k: peak_memory(call, args.device) for k, call in calls.items()}

    device = torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'
    print(f'\nDeformable DETR ({args.variant}, R50), {shape}, {device}, autocast {args.amp}, '
          f'torch {torch.__version__}, {torch.get_num_threads()} threads, median of '
          f'{args.repeat}; mmdet with {kernel}')
    print(f'| {"":<26} | {"mmdet 3.3":>10} | {"ours":>10} | {"speed-up":>8} '
          f'| {"mmdet peak":>10} | {"ours peak":>10} |')
    print(f'|{"-" * 28}|{"-" * 12}|{"-" * 12}|{"-" * 10}|{"-" * 12}|{"-" * 12}|')
    for label, t in results.items():
        name = 'training step (fwd + bwd)' if label == 'training step' else label
        mm = t.get('mmdet')
        theirs_time = f'{mm:.3f}s' if mm else '-'
        speed_up = f'{mm / t["ours"]:.2f}x' if mm else '-'
        peak = {k: (f'{v / 2**30:.2f} GiB' if v == v else '-') for k, v in peaks[label].items()}
        print(f'| {name:<26} | {theirs_time:>10} | {t["ours"]:>9.3f}s | {speed_up:>8} '
              f'| {peak.get("mmdet", "-"):>10} | {peak["ours"]:>10} |')
    if loss_diff is not None:
        print(f'max |loss difference| over {len(losses["mmdet"])} losses: {loss_diff:.2e}')


if __name__ == '__main__':
    main()
